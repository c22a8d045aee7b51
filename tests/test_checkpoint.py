"""Checkpoints: released layouts in, released layout out, adaptation to a new task, errors."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.interpolate
from flax import traverse_util

from conftest import random_params
from numpy_reference import bit_forward
from vit_jax_ft import checkpoint, defaults, paths, train
from vit_jax_ft.models import get_model

SIZE = 32
# Linen -> pre-Linen module names inside `encoderblock_N`, as the released ViT files have them.
PRE_LINEN = {'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
             'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}


def tiny_vit(num_classes=5, **overrides):
  spec = dict(patch_size=(8, 8), hidden_size=16, num_layers=2, mlp_dim=24, num_heads=2)
  spec.update(overrides)
  return get_model('testing', num_classes, **spec)


def tiny_hybrid(num_classes=5):
  return tiny_vit(num_classes, patch_size=(1, 1), resnet_layers=(1, 1), resnet_width=0.5)


def tiny_bit(num_classes=5):
  return get_model('BiT-M-R50x1', num_classes, block_sizes=(1, 1))


def init(model, size=SIZE, seed=0):
  """Random params in the model's tree (shapes only: no compilation, fast on small CPUs)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))['params']
  return random_params(shapes, seed)


def flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def assert_same_tree(got, want):
  got, want = flat(got), flat(want)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def pre_linen_names(flat_params):
  """The test's own renaming of a Linen ViT tree to the released pre-Linen names."""
  out = {}
  for key, value in flat_params.items():
    parts = key.split('/')
    if parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      parts[2] = PRE_LINEN.get(parts[2], parts[2])
    out['/'.join(parts)] = value
  return out


def bit_release_names(flat_params):
  """The test's own renaming of a BiT tree to the released names (those timm's resnetv2 reads)."""
  out = {}
  for key, value in flat_params.items():
    parts = key.split('/')
    if parts[0] == 'root_block':
      out['resnet/root_block/standardized_conv2d/kernel'] = value
    elif parts[0] == 'norm-pre-head':
      out['resnet/group_norm/' + {'scale': 'gamma', 'bias': 'beta'}[parts[1]]] = value
    elif parts[0] == 'head':
      out[f'resnet/head/conv2d/{parts[1]}'] = (
          value.reshape((1, 1) + value.shape) if parts[1] == 'kernel' else value)
    else:
      block, unit, layer, leaf = parts
      unit_prefix = f'resnet/{block}/{unit}'
      if layer == 'conv_proj':
        out[f'{unit_prefix}/a/proj/standardized_conv2d/kernel'] = value
      elif layer.startswith('conv'):
        out[f'{unit_prefix}/{"abc"[int(layer[-1]) - 1]}/standardized_conv2d/kernel'] = value
      else:
        group = 'abc'[int(layer[-1]) - 1]
        out[f'{unit_prefix}/{group}/group_norm/{ {"scale": "gamma", "bias": "beta"}[leaf]}'] = value
  return out


def timm_vit_keys(num_layers, hybrid_units=()):
  """The keys timm's `_load_weights` (timm/models/vision_transformer.py) reads from a ViT npz."""
  keys = {'embedding/kernel', 'embedding/bias', 'cls', 'Transformer/posembed_input/pos_embedding',
          'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias', 'head/kernel',
          'head/bias'}
  for i in range(num_layers):
    block = f'Transformer/encoderblock_{i}/'
    for leaf in ('scale', 'bias'):
      keys |= {block + f'LayerNorm_0/{leaf}', block + f'LayerNorm_2/{leaf}'}
    for leaf in ('kernel', 'bias'):
      keys |= {block + f'MultiHeadDotProductAttention_1/{n}/{leaf}'
               for n in ('query', 'key', 'value', 'out')}
      keys |= {block + f'MlpBlock_3/Dense_{r}/{leaf}' for r in (0, 1)}
  if hybrid_units:
    keys |= {'conv_root/kernel', 'gn_root/scale', 'gn_root/bias'}
    for b, units in enumerate(hybrid_units):
      for u in range(units):
        unit = f'block{b + 1}/unit{u + 1}/'
        for r in (1, 2, 3):
          keys |= {unit + f'conv{r}/kernel', unit + f'gn{r}/scale', unit + f'gn{r}/bias'}
        if u == 0:
          keys |= {unit + 'conv_proj/kernel', unit + 'gn_proj/scale', unit + 'gn_proj/bias'}
  return keys


# ---------------------------------------------------------------------------
# load / save


@pytest.mark.parametrize('make', [tiny_vit, tiny_hybrid, tiny_bit], ids=['vit', 'hybrid', 'bit'])
def test_load_save_load_round_trip(tmp_path, make):
  params = init(make())
  checkpoint.save(params, str(tmp_path / 'a.npz'))
  loaded = checkpoint.load(str(tmp_path / 'a.npz'))
  assert_same_tree(loaded, params)
  checkpoint.save(loaded, str(tmp_path / 'b.npz'))
  assert_same_tree(checkpoint.load(str(tmp_path / 'b.npz')), params)
  first, second = np.load(tmp_path / 'a.npz'), np.load(tmp_path / 'b.npz')
  assert sorted(first.files) == sorted(second.files)
  assert not list(tmp_path.glob('*.tmp'))  # The atomic write left nothing behind.


def test_gfile_filesystems_round_trip_without_touching_local_disk(tmp_path):
  params = init(tiny_vit())
  checkpoint.save(params, 'ram://checkpoints/vit.npz')
  assert not list(tmp_path.iterdir()) and not pathlib.Path('ram:').exists()
  assert_same_tree(checkpoint.load('ram://checkpoints/vit.npz'), params)
  with pytest.raises(FileNotFoundError, match='ram://checkpoints/missing.npz'):
    checkpoint.load('ram://checkpoints/missing.npz')


def test_paths_tell_local_files_from_urls_and_gfile_filesystems():
  assert [paths.is_remote(p) for p in ['gs://b/x.npz', 'ram://x', 'https://h/x', 'x.npz',
                                       '/abs/x.npz', 'c:/x', 'dir/a://b']] == [
                                           True, True, True, False, False, False, False]
  assert paths.is_url('https://h/x') and paths.is_url('http://h/x')
  assert not paths.is_url('gs://b/x.npz')


def test_pre_linen_and_linen_names_load_to_the_same_params(tmp_path):
  params = init(tiny_vit(num_layers=3))
  linen = flat(params)
  pre_linen = pre_linen_names(linen)
  assert 'Transformer/encoderblock_2/MlpBlock_3/Dense_1/kernel' in pre_linen
  np.savez(tmp_path / 'linen.npz', **linen)
  np.savez(tmp_path / 'pre_linen.npz', **pre_linen)
  assert_same_tree(checkpoint.load(str(tmp_path / 'linen.npz')), params)
  assert_same_tree(checkpoint.load(str(tmp_path / 'pre_linen.npz')), params)


def test_save_writes_the_released_vit_layout_that_timm_reads(tmp_path):
  params = init(tiny_vit(num_layers=2))
  checkpoint.save(params, str(tmp_path / 'vit.npz'))
  saved = dict(np.load(tmp_path / 'vit.npz'))
  assert set(saved) == set(pre_linen_names(flat(params)))
  assert set(saved) == timm_vit_keys(2)
  d, heads = 16, 2
  attention = 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/'
  assert saved[attention + 'query/kernel'].shape == (d, heads, d // heads)
  assert saved[attention + 'out/kernel'].shape == (heads, d // heads, d)
  assert saved['embedding/kernel'].shape == (8, 8, 3, d)  # HWIO, as timm transposes it.
  assert saved['cls'].shape == (1, 1, d)

  hybrid = init(tiny_hybrid())
  checkpoint.save(hybrid, str(tmp_path / 'hybrid.npz'))
  assert set(np.load(tmp_path / 'hybrid.npz').files) == timm_vit_keys(2, hybrid_units=(1, 1))


def test_save_writes_bit_release_names(tmp_path):
  params = init(tiny_bit())
  checkpoint.save(params, str(tmp_path / 'bit.npz'))
  saved = dict(np.load(tmp_path / 'bit.npz'))
  want = bit_release_names(flat(params))
  assert sorted(saved) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_bit_release_names_and_old_group_norm_shapes_load(tmp_path):
  model = tiny_bit()
  params = init(model)
  release = bit_release_names(flat(params))
  assert release['resnet/head/conv2d/kernel'].shape[:2] == (1, 1)
  np.savez(tmp_path / 'release.npz', **release)
  # bit_jax's own Flax trees: `conv_head`, GroupNorm scale/bias of shape (1, 1, 1, C).
  old = {(k.replace('head/', 'conv_head/', 1) if k.startswith('head/') else k):
         (v.reshape(1, 1, 1, -1) if k.split('/')[-2].startswith(('gn', 'norm-pre-head')) else v)
         for k, v in flat(params).items()}
  assert old['block1/unit01/gn1/scale'].shape[:3] == (1, 1, 1)
  np.savez(tmp_path / 'old.npz', **old)
  images = np.random.default_rng(3).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  want = bit_forward(params, images, (1, 1))
  for name in ('release.npz', 'old.npz'):
    loaded = checkpoint.load(str(tmp_path / name))
    assert_same_tree(loaded, params)
    got = model.apply({'params': loaded}, images, train=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_hybrid_old_group_norm_shapes_load(tmp_path):
  params = init(tiny_hybrid())
  old = {k: (v.reshape(1, 1, 1, -1) if k.split('/')[-2:][0].startswith('gn') else v)
         for k, v in pre_linen_names(flat(params)).items()}
  assert old['gn_root/scale'].ndim == 4
  np.savez(tmp_path / 'old.npz', **old)
  assert_same_tree(checkpoint.load(str(tmp_path / 'old.npz')), params)


def test_optimizer_checkpoint_keeps_the_parameters(tmp_path):
  params = init(tiny_vit())
  with_optimizer = {f'opt/target/{k}': v for k, v in pre_linen_names(flat(params)).items()}
  with_optimizer['opt/state/step'] = np.array(3)
  np.savez(tmp_path / 'opt.npz', **with_optimizer)
  assert_same_tree(checkpoint.load(str(tmp_path / 'opt.npz')), params)


# ---------------------------------------------------------------------------
# load_pretrained


def test_load_pretrained_takes_the_head_from_init_params(tmp_path):
  pretrained = init(tiny_vit(num_classes=5), seed=1)
  checkpoint.save(pretrained, str(tmp_path / 'p.npz'))
  fresh = init(tiny_vit(num_classes=3), seed=2)
  got = checkpoint.load_pretrained(str(tmp_path / 'p.npz'), fresh)
  assert_same_tree(got, dict(pretrained, head=fresh['head']))


def test_load_pretrained_drops_or_keeps_pre_logits(tmp_path):
  pretrained = init(tiny_vit(representation_size=8), seed=1)
  checkpoint.save(pretrained, str(tmp_path / 'p.npz'))
  without = init(tiny_vit(num_classes=3))
  got = checkpoint.load_pretrained(str(tmp_path / 'p.npz'), without)
  assert 'pre_logits' not in got
  assert_same_tree(got, dict({k: v for k, v in pretrained.items() if k != 'pre_logits'},
                             head=without['head']))
  with_layer = init(tiny_vit(num_classes=3, representation_size=8))
  got = checkpoint.load_pretrained(str(tmp_path / 'p.npz'), with_layer)
  assert_same_tree(got['pre_logits'], pretrained['pre_logits'])
  assert_same_tree(got['head'], with_layer['head'])


def resized_grid(grid, new):
  """Bilinear resize of an (n, n, C) grid whose corners stay put (independent of scipy.ndimage)."""
  n = grid.shape[0]
  interpolator = scipy.interpolate.RegularGridInterpolator(
      (np.arange(n), np.arange(n)), grid, method='linear')
  rows, cols = np.meshgrid(np.linspace(0, n - 1, new), np.linspace(0, n - 1, new),
                           indexing='ij')
  return interpolator(np.stack([rows, cols], axis=-1))


@pytest.mark.parametrize('classifier', ['token', 'gap'])
@pytest.mark.parametrize('new_size', [384, 160])
def test_load_pretrained_resizes_position_embeddings(tmp_path, classifier, new_size):
  options = dict(patch_size=(16, 16), num_layers=1, classifier=classifier)
  pretrained = init(tiny_vit(**options), size=224, seed=1)
  checkpoint.save(pretrained, str(tmp_path / 'p.npz'))
  fresh = init(tiny_vit(num_classes=3, **options), size=new_size)
  got = checkpoint.load_pretrained(str(tmp_path / 'p.npz'), fresh)

  old = pretrained['Transformer']['posembed_input']['pos_embedding']
  new = got['Transformer']['posembed_input']['pos_embedding']
  extra = 1 if classifier == 'token' else 0
  grid_old, grid_new = 224 // 16, new_size // 16
  assert new.shape == (1, extra + grid_new**2, 16)
  np.testing.assert_array_equal(new[:, :extra], old[:, :extra])  # The class token is kept.
  want = resized_grid(old[0, extra:].reshape(grid_old, grid_old, 16), grid_new)
  np.testing.assert_allclose(new[0, extra:].reshape(grid_new, grid_new, 16), want,
                             atol=1e-5, rtol=0)
  # Corners of the grid are kept exactly (align-corners zoom).
  np.testing.assert_allclose(new[0, extra], old[0, extra], atol=1e-6)
  np.testing.assert_allclose(new[0, -1], old[0, -1], atol=1e-6)
  assert_same_tree(got['embedding'], pretrained['embedding'])


def test_load_pretrained_bit_takes_the_new_head(tmp_path):
  pretrained = init(tiny_bit(num_classes=5), seed=1)
  np.savez(tmp_path / 'release.npz', **bit_release_names(flat(pretrained)))
  fresh = init(tiny_bit(num_classes=2))
  got = checkpoint.load_pretrained(str(tmp_path / 'release.npz'), fresh)
  assert_same_tree(got, dict(pretrained, head=fresh['head']))


# ---------------------------------------------------------------------------
# Errors


def test_missing_file_names_the_fetch_command(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m vit_jax_ft.hub fetch'):
    checkpoint.load(str(tmp_path / 'absent.npz'))
  with pytest.raises(FileNotFoundError, match='python -m vit_jax_ft.hub fetch'):
    checkpoint.load_pretrained(str(tmp_path / 'absent.npz'), init(tiny_vit()))


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
  pretrained = init(tiny_vit(mlp_dim=24))
  checkpoint.save(pretrained, str(tmp_path / 'p.npz'))
  fresh = init(tiny_vit(mlp_dim=40))
  have, need = flat(pretrained), flat(fresh)
  mismatched = {k for k in need if k in have and have[k].shape != need[k].shape}
  assert len(mismatched) == 6  # Dense_0 kernel and bias, Dense_1 kernel, in both blocks.
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load_pretrained(str(tmp_path / 'p.npz'), fresh)
  message = str(error.value)
  named = [k for k in mismatched if repr(k) in message]
  assert len(named) == 1, message
  assert f'{have[named[0]].shape}' in message and f'{need[named[0]].shape}' in message


def test_pre_logits_missing_from_checkpoint_says_what_to_change(tmp_path):
  checkpoint.save(init(tiny_vit()), str(tmp_path / 'p.npz'))
  with pytest.raises(checkpoint.CheckpointError, match='representation_size=None'):
    checkpoint.load_pretrained(str(tmp_path / 'p.npz'),
                               init(tiny_vit(representation_size=8)))


def test_truncated_and_non_npz_files_are_clear_errors(tmp_path):
  checkpoint.save(init(tiny_vit()), str(tmp_path / 'p.npz'))
  data = (tmp_path / 'p.npz').read_bytes()
  (tmp_path / 'truncated.npz').write_bytes(data[:len(data) // 2])
  (tmp_path / 'text.npz').write_text('<html>Not Found</html>')
  np.save(tmp_path / 'array.npy', np.zeros(3))
  for name, pattern in [('truncated.npz', 'truncated'), ('text.npz', 'not a readable .npz'),
                        ('array.npy', 'single array')]:
    with pytest.raises(checkpoint.CheckpointError, match=pattern):
      checkpoint.load(str(tmp_path / name))
  with pytest.raises(checkpoint.CheckpointError, match='folder'):
    checkpoint.load(str(tmp_path))


def test_bit_checkpoint_into_a_vit_is_a_clear_error(tmp_path):
  np.savez(tmp_path / 'bit.npz', **bit_release_names(flat(init(tiny_bit()))))
  with pytest.raises(checkpoint.CheckpointError, match='BiT ResNet checkpoint but the model is a ViT'):
    checkpoint.load_pretrained(str(tmp_path / 'bit.npz'), init(tiny_vit()))


def test_non_square_grid_is_a_clear_error(tmp_path):
  checkpoint.save(init(tiny_vit(patch_size=(16, 16), num_layers=1)), str(tmp_path / 'p.npz'))
  fresh = init(tiny_vit(patch_size=(16, 16), num_layers=1), size=48)
  fresh['Transformer']['posembed_input']['pos_embedding'] = np.zeros((1, 1 + 6, 16), np.float32)
  with pytest.raises(checkpoint.CheckpointError, match='square'):
    checkpoint.load_pretrained(str(tmp_path / 'p.npz'), fresh)


@pytest.mark.parametrize('pretrained', [True, False])
def test_training_starts_from_the_file_and_the_head_of_the_whole_init(tmp_path, pretrained):
  model = tiny_vit(head_hidden=(8,))  # A hidden head layer: random init, unlike the head.
  config = defaults.get_config()
  config.pp.crop, config.seed = SIZE, 7
  path = str(tmp_path / 'start.npz')
  checkpoint.save(init(model, seed=3), path)
  config.pretrained_path = path if pretrained else ''
  got = train.initial_variables(config, model)
  whole = jax.device_get(jax.jit(lambda rng: model.init(
      rng, jnp.zeros((1, SIZE, SIZE, 3)), train=False))(jax.random.PRNGKey(7)))
  want = checkpoint.load_pretrained_variables(path, whole) if pretrained else whole
  assert sorted(got) == ['params']
  assert_same_tree(got['params'], want['params'])
  file_head = flat(checkpoint.load(path))['head_hidden_0/kernel']
  assert not np.array_equal(flat(got['params'])['head_hidden_0/kernel'], file_head)
