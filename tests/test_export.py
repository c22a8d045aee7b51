"""Export: a fine-tuned workdir written as a released .npz, read back by our loader, by the
official loader's own conversion (flax's pre-Linen renaming) and in timm's layout, each giving
the workdir model's logits; BiT in its release names."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from flax.training import checkpoints as flax_checkpoints
from PIL import Image
from sklearn.datasets import load_digits

import tiny_config
from conftest import fresh_process_env
from numpy_reference import bit_forward, gelu_tanh, vit_forward
from vit_jax_ft import checkpoint, export, models, run_dir, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> pathlib.Path:
  """Three fine-tuning steps of the tiny ViT on scikit-learn's real digits."""
  root = tmp_path_factory.mktemp('digits')
  digits = load_digits()
  for i, (image, label) in enumerate(zip(digits.images[:120], digits.target[:120])):
    folder = root / ('test' if i % 4 == 0 else 'train') / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f'{i}.png')
  config = tiny_config.get_config(str(root))
  config.total_steps, config.warmup_steps, config.eval_every = 3, 1, 0
  config.checkpoint_every, config.batch, config.batch_eval = 2, 8, 16
  config.model.representation_size = 8  # Exports the pre_logits layer too.
  run = tmp_path_factory.mktemp('run')
  train.train_and_evaluate(config, str(run))
  return run


def run_export(*flags):
  return subprocess.run([sys.executable, '-m', 'vit_jax_ft.export', *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=fresh_process_env())


def official_shapes(spec, image_size):
  """Names and shapes of a released ViT .npz, from the official models_vit.py tree."""
  h, heads, mlp, p = spec['hidden_size'], spec['num_heads'], spec['mlp_dim'], spec['patch_size']
  tokens = 1 + (image_size // p[0]) * (image_size // p[1])
  shapes = {'embedding/kernel': (p[0], p[1], 3, h), 'embedding/bias': (h,), 'cls': (1, 1, h),
            'Transformer/posembed_input/pos_embedding': (1, tokens, h),
            'Transformer/encoder_norm/scale': (h,), 'Transformer/encoder_norm/bias': (h,),
            'pre_logits/kernel': (h, spec['representation_size']),
            'pre_logits/bias': (spec['representation_size'],),
            'head/kernel': (spec['representation_size'], spec['num_classes']),
            'head/bias': (spec['num_classes'],)}
  for i in range(spec['num_layers']):
    block = f'Transformer/encoderblock_{i}/'
    for norm in ('LayerNorm_0', 'LayerNorm_2'):
      shapes.update({block + norm + '/scale': (h,), block + norm + '/bias': (h,)})
    for name in ('query', 'key', 'value'):
      shapes[f'{block}MultiHeadDotProductAttention_1/{name}/kernel'] = (h, heads, h // heads)
      shapes[f'{block}MultiHeadDotProductAttention_1/{name}/bias'] = (heads, h // heads)
    shapes[f'{block}MultiHeadDotProductAttention_1/out/kernel'] = (heads, h // heads, h)
    shapes[f'{block}MultiHeadDotProductAttention_1/out/bias'] = (h,)
    shapes.update({f'{block}MlpBlock_3/Dense_0/kernel': (h, mlp),
                   f'{block}MlpBlock_3/Dense_0/bias': (mlp,),
                   f'{block}MlpBlock_3/Dense_1/kernel': (mlp, h),
                   f'{block}MlpBlock_3/Dense_1/bias': (h,)})
  return shapes


def timm_forward(w, images, num_heads, num_layers):
  """ViT logits from the npz the way timm's `_load_weights` lays it out in torch
  (OIHW patch conv, fused qkv Linear, (out, in) weights), computed in numpy."""
  def linear(x, weight, bias):  # torch.nn.Linear: weight is (out, in).
    return x @ weight.T + bias

  def norm(x, prefix):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * w[prefix + '/scale'] + w[prefix + '/bias']

  conv = w['embedding/kernel'].transpose(3, 2, 0, 1)  # timm's _n2p for a 4-d kernel.
  out_ch, _, ph, pw = conv.shape
  n, height, width, _ = images.shape
  patches = images.reshape(n, height // ph, ph, width // pw, pw, 3).transpose(0, 1, 3, 5, 2, 4)
  x = patches.reshape(n, -1, 3 * ph * pw) @ conv.reshape(out_ch, -1).T + w['embedding/bias']
  x = np.concatenate([np.broadcast_to(w['cls'].reshape(1, 1, -1), (n, 1, out_ch)), x], 1)
  x = x + w['Transformer/posembed_input/pos_embedding']
  for i in range(num_layers):
    block, mha = f'Transformer/encoderblock_{i}/', f'Transformer/encoderblock_{i}/' \
        'MultiHeadDotProductAttention_1/'
    qkv_w = np.concatenate([w[f'{mha}{k}/kernel'].reshape(out_ch, -1).T
                            for k in ('query', 'key', 'value')])
    qkv_b = np.concatenate([w[f'{mha}{k}/bias'].reshape(-1) for k in ('query', 'key', 'value')])
    proj_w = w[f'{mha}out/kernel'].transpose(2, 0, 1).reshape(out_ch, -1)
    y = linear(norm(x, block + 'LayerNorm_0'), qkv_w, qkv_b)
    q, k, v = y.reshape(n, -1, 3, num_heads, out_ch // num_heads).transpose(2, 0, 3, 1, 4)
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, out_ch)
    x = x + linear(y, proj_w, w[f'{mha}out/bias'])
    y = norm(x, block + 'LayerNorm_2')
    mlp = block + 'MlpBlock_3/'
    y = gelu_tanh(linear(y, w[mlp + 'Dense_0/kernel'].T, w[mlp + 'Dense_0/bias']))
    x = x + linear(y, w[mlp + 'Dense_1/kernel'].T, w[mlp + 'Dense_1/bias'])
  x = norm(x, 'Transformer/encoder_norm')[:, 0]
  x = np.tanh(linear(x, w['pre_logits/kernel'].T, w['pre_logits/bias']))
  return linear(x, w['head/kernel'].T, w['head/bias'])


def test_exported_vit_gives_the_workdir_logits_in_every_loader(workdir, tmp_path):
  out = tmp_path / 'model.npz'
  result = run_export(f'--workdir={workdir}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'testing with 10 classes (step 3)' in result.stdout
  assert "'hidden_size': 32" in result.stdout and "'representation_size': 8" in result.stdout
  spec = json.loads((workdir / 'config.json').read_text())[run_dir.MODEL_SPEC_KEY]
  assert spec['representation_size'] == 8 and spec['hidden_size'] == 32
  loaded = run_dir.load(str(workdir))
  params = jax.tree.map(np.asarray, loaded.params)
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  logits = np.asarray(loaded.model.apply({'params': loaded.params}, images))
  assert np.abs(logits).max() > 1e-3  # A trained head: the comparisons below can fail.

  with np.load(out) as npz:
    raw = {k: npz[k] for k in npz.files}
  assert {k: v.shape for k, v in raw.items()} == official_shapes(spec, 16)
  # Our loader gives back the workdir's parameters exactly.
  for key, value in traverse_util.flatten_dict(checkpoint.load(str(out)), sep='/').items():
    np.testing.assert_array_equal(value, traverse_util.flatten_dict(params, sep='/')[key])
  # The official `vit_jax.checkpoint.load`: flax's pre-Linen renaming of the nested names.
  official = flax_checkpoints.convert_pre_linen(traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in raw.items()}))
  np.testing.assert_allclose(vit_forward(official, images.astype(np.float64), num_heads=2,
                                         patch=4), logits, atol=1e-5)
  # timm's npz loader layout.
  np.testing.assert_allclose(timm_forward(raw, images.astype(np.float64), 2, 2), logits,
                             atol=1e-5)


def test_an_earlier_step_and_bad_input(workdir, tmp_path):
  loaded = export.export(str(workdir), str(tmp_path / 'step2.npz'), step=2)
  assert loaded.step == 2
  step2 = run_dir.load(str(workdir), step=2).params
  for a, b in zip(jax.tree.leaves(checkpoint.load(str(tmp_path / 'step2.npz'))),
                  jax.tree.leaves(step2)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='must name an .npz file .* or a .safetensors'):
    export.export(str(workdir), str(tmp_path / 'model.pt'))
  with pytest.raises(FileNotFoundError, match=r'complete checkpoints: \[2, 3\]'):
    export.export(str(workdir), str(tmp_path / 'x.npz'), step=1)


def test_bit_workdir_exports_the_release_names(tmp_path):
  model = models.get_model('BiT-M-R50x1', 3, block_sizes=(1, 1))  # Two stages of one unit.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32) + 1.0 * (x.ndim == 1),
      jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params'])
  config = tiny_config.get_config('unused')
  config.model_name, config.pp.crop = 'BiT-M-R50x1', 32
  workdir = tmp_path / 'bit'
  with ocp.CheckpointManager(str(workdir / 'checkpoints')) as manager:
    manager.save(5, args=ocp.args.StandardSave({'params': params, 'step': 5}))
  (workdir / 'config.json').write_text(json.dumps(run_dir.config_record(config, model)))
  (workdir / 'dataset_info.json').write_text(json.dumps({'class_names': ['a', 'b', 'c']}))
  out = tmp_path / 'bit.npz'
  export.export(str(workdir), str(out))
  with np.load(out) as npz:
    raw = {k: npz[k] for k in npz.files}
  # big_transfer's names: pre-activation units `a`, `b`, `c` with their GroupNorm first.
  width = 64
  expected = {'resnet/root_block/standardized_conv2d/kernel': (7, 7, 3, width),
              'resnet/group_norm/gamma': (8 * width,), 'resnet/group_norm/beta': (8 * width,),
              'resnet/head/conv2d/kernel': (1, 1, 8 * width, 3), 'resnet/head/conv2d/bias': (3,)}
  in_ch = width
  for b in range(2):
    mid, unit = width * 2**b, f'resnet/block{b + 1}/unit01/'
    for group, (cin, k, cout) in zip('abc', [(in_ch, 1, mid), (mid, 3, mid), (mid, 1, 4 * mid)]):
      expected[f'{unit}{group}/group_norm/gamma'] = (cin,)
      expected[f'{unit}{group}/group_norm/beta'] = (cin,)
      expected[f'{unit}{group}/standardized_conv2d/kernel'] = (k, k, cin, cout)
    expected[f'{unit}a/proj/standardized_conv2d/kernel'] = (1, 1, in_ch, 4 * mid)
    in_ch = 4 * mid
  assert {k: v.shape for k, v in raw.items()} == expected
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(
      bit_forward(checkpoint.load(str(out)), images.astype(np.float64), (1, 1)),
      jax.jit(model.apply)({'params': params}, images), rtol=1e-4, atol=1e-4)
