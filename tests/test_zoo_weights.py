"""Zoo weights: each family saved back in its own layout (timm's state dict, the released .npz)
round trips exactly, with timm's keys, dtypes and shapes; each name's input convention equals
timm's pretrained_cfg and drives the default preprocessing (committed from timm by
tests/fixtures/make_timm_fixtures.py)."""
import json
import math
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf
from ml_collections import ConfigDict

from test_hub import npz_bytes, server  # noqa: F401  pylint: disable=unused-import
from vit_jax_ft import checkpoint, defaults, hub, models, pretrained
from vit_jax_ft.data import preprocess
from vit_jax_ft.models import get_model

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# (fixture family, case): one small timm model of each state-dict family.
CASES = (('swin', 'pad_shift_clamp'), ('resnet', 'tiny'), ('mixer', 'tiny'), ('maxvit', 'p2_64'),
         ('davit', 'pad7'))
# timm's pretrained_cfg of every full-size timm name (its default tag).
TIMM_INPUTS = {name: cfg for family in ('swin', 'resnet', 'mixer', 'maxvit', 'davit')
               for name, cfg in json.loads(
    (FIXTURES / f'{family}_timm_counts.json').read_text())['inputs'].items()}
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
SEED = tf.constant([3, 7], tf.int64)


def timm_state_dict(family, case):
  """The floating-point entries of timm's state dict, and timm's full layout of the model."""
  outputs = np.load(FIXTURES / f'{family}_timm.npz')
  prefix = f'{case}/sd/'
  state = {k[len(prefix):]: outputs[k] for k in outputs.files if k.startswith(prefix)}
  layout = json.loads((FIXTURES / f'{family}_timm_counts.json').read_text())['state_dicts']
  return state, layout[case]


def assert_same_variables(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize('family,case', CASES)
def test_safetensors_round_trip_is_exact_in_timms_layout(family, case, tmp_path):
  state, layout = timm_state_dict(family, case)
  safetensors.numpy.save_file(state, str(tmp_path / 'timm.safetensors'))
  variables = checkpoint.load_variables(str(tmp_path / 'timm.safetensors'))
  checkpoint.save_variables(variables, str(tmp_path / 'saved.safetensors'))
  saved = safetensors.numpy.load_file(str(tmp_path / 'saved.safetensors'))
  assert sorted(saved) == sorted(layout)  # Every key timm's model has (strict loading), no more.
  for key, (dtype, shape) in layout.items():
    assert saved[key].shape == tuple(shape), key
    if dtype == 'int64':  # BatchNorm's num_batches_tracked.
      assert saved[key].dtype == np.int64, key
    else:
      assert saved[key].dtype == np.float32 and np.array_equal(saved[key], state[key]), key
  assert_same_variables(checkpoint.load_variables(str(tmp_path / 'saved.safetensors')), variables)


def test_mixer_npz_round_trip_in_the_official_layout(tmp_path):
  state, _ = timm_state_dict('mixer', 'tiny')
  safetensors.numpy.save_file(state, str(tmp_path / 'timm.safetensors'))
  variables = checkpoint.load_variables(str(tmp_path / 'timm.safetensors'))
  checkpoint.save_variables(variables, str(tmp_path / 'official.npz'))
  with np.load(tmp_path / 'official.npz') as npz:  # The names of vit_jax/models_mixer.py.
    assert {'stem/kernel', 'MixerBlock_1/token_mixing/Dense_0/kernel',
            'MixerBlock_0/LayerNorm_1/scale', 'pre_head_layer_norm/bias', 'head/kernel'
            } <= set(npz.files)
    np.testing.assert_array_equal(npz['MixerBlock_1/token_mixing/Dense_0/kernel'],
                                  state['blocks.1.mlp_tokens.fc1.weight'].T)
  assert_same_variables(checkpoint.load_variables(str(tmp_path / 'official.npz')), variables)


def test_each_family_refuses_a_layout_it_has_not(tmp_path):
  vit = jax.eval_shape(lambda: get_model('testing', 3).init(
      jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)), train=False))['params']
  vit = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), vit)
  with pytest.raises(checkpoint.CheckpointError, match='released as .npz'):
    checkpoint.save(vit, str(tmp_path / 'vit.safetensors'))
  swin = checkpoint.load_variables(_saved('swin', 'odd_merge', tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match='give a path ending in .safetensors'):
    checkpoint.save_variables(swin, str(tmp_path / 'swin.npz'))
  resnet = checkpoint.load_variables(_saved('resnet', 'tiny', tmp_path))
  with pytest.raises(ValueError, match='batch_stats'):
    checkpoint.save(resnet['params'], str(tmp_path / 'resnet.safetensors'))
  assert not list(tmp_path.glob('*.npz')) and not list(tmp_path.glob('resnet.safetensors'))


def _saved(family, case, tmp_path):
  path = str(tmp_path / f'{family}-{case}.safetensors')
  safetensors.numpy.save_file(timm_state_dict(family, case)[0], path)
  return path


def _ops(model_name, train, crop=16, **pp):
  fields = dict(crop=crop, resize=None, train_ops=None, test_ops=None)
  return preprocess.default_ops(ConfigDict(dict(model_name=model_name, pp={**fields, **pp})),
                                train)


def _run(spec, image=IMAGE):
  _, augment = preprocess.build(spec)
  return augment(tf.constant(image), SEED).numpy()


def test_every_name_has_a_convention_and_timm_names_have_timms():
  assert set(models.INPUT_CONVENTIONS) == set(models.MODEL_SPECS)
  assert set(TIMM_INPUTS) <= set(models.MODEL_SPECS)
  for name, cfg in TIMM_INPUTS.items():
    convention = models.input_convention(name)
    assert (convention.mean, convention.std) == (tuple(cfg['mean']), tuple(cfg['std'])), name
    # timm's 'squash' resizes the whole image to the input size: no crop fraction here.
    crop_pct = None if cfg['crop_mode'] == 'squash' else cfg['crop_pct']
    assert (convention.interpolation, convention.crop_pct) == (cfg['interpolation'],
                                                               crop_pct), name
    assert convention.input_size == cfg['input_size'][1], name
  official = [n for n, spec in models.MODEL_SPECS.items()
              if spec['kind'] in ('vit', 'bit') or n.startswith('Mixer-')]
  assert {models.input_convention(n) for n in official} == {models.InputConvention()}
  with pytest.raises(ValueError, match='Unknown model name'):
    models.input_convention('swin_tiny')


@pytest.mark.parametrize('name', ['ViT-B_16', 'R50+ViT-B_16', 'BiT-M-R50x1', 'Mixer-B_16'])
def test_official_names_keep_the_official_pipeline(name):
  assert _ops(name, True) == 'decode|inception_crop(16)|flip_lr|value_range(-1,1)'
  assert _ops(name, False) == 'decode|resize(16)|value_range(-1,1)'
  assert _ops(name, False, resize=20) == (
      'decode|resize_small(20)|central_crop(16)|value_range(-1,1)')
  assert _ops(name, False, test_ops='decode|resize(16)') == 'decode|resize(16)'


def test_normalize_is_timms_to_tensor_then_normalize():
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  want = (IMAGE.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
  np.testing.assert_array_equal(_run(f'normalize({mean}, {std})'), want)


def test_timm_names_evaluate_as_timm_shorter_side_then_central_crop():
  # swin_tiny: bicubic, crop_pct 0.9. torchvision's Resize(17) of 40x60: 17 x int(25.5) = 25,
  # rounded to uint8 as PIL; CenterCrop(16) at round(0.5) = 0, round(4.5) = 4 (half to even).
  spec = _ops('swin_tiny_patch4_window7_224', False)
  assert spec.startswith("decode|timm_eval_crop(16, 0.9, method='bicubic')|normalize(")
  short, long = math.floor(16 / 0.9), int(math.floor(16 / 0.9) * 60 / 40)
  resized = tf.image.resize(IMAGE, [short, long], 'bicubic', antialias=True).numpy()
  resized = np.round(np.clip(resized, 0, 255))
  top, left = round((short - 16) / 2), round((long - 16) / 2)
  mean, std = np.float32((0.485, 0.456, 0.406)), np.float32((0.229, 0.224, 0.225))
  want = (resized[top:top + 16, left:left + 16] / np.float32(255) - mean) / std
  assert (short, long, top, left) == (17, 25, 0, 4)
  np.testing.assert_allclose(_run(spec), want, rtol=0, atol=1e-6)
  # Training keeps the official augmentation with the model's interpolation and normalisation.
  train = _ops('resnet50', True)
  assert train.startswith("decode|inception_crop(16, method='bicubic')|flip_lr|normalize(")
  assert _run(train).shape == (16, 16, 3)
  assert _ops('resnet50', False, resize=20).startswith(
      "decode|resize_small(20, method='bicubic', antialias=True)|central_crop(16)|normalize(")
  # mixer_b16_224's mean = std = 0.5 is the official [-1, 1] map.
  assert _ops('mixer_b16_224', False, crop=224) == (
      "decode|timm_eval_crop(224, 0.875, method='bicubic')|value_range(-1,1)")


def test_model_listing_describes_each_convention():
  from vit_jax_ft.models.__main__ import describe  # pylint: disable=import-outside-toplevel
  assert describe(models.input_convention('ViT-B_16')) == (
      '[-1, 1], bilinear, whole image resized, 224 px')
  assert describe(models.input_convention('swin_base_patch4_window12_384')) == (
      'mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225), bicubic, crop_pct 1.0, 384 px')


def test_hub_names_timms_and_the_mixer_files_by_their_published_urls(monkeypatch):
  monkeypatch.delenv(hub.HUB_URL_ENV, raising=False)
  monkeypatch.delenv('HF_ENDPOINT', raising=False)
  for name, cfg in TIMM_INPUTS.items():  # timm's default tag of each name.
    url = f'https://huggingface.co/{cfg["hf_hub_id"]}/resolve/main/model.safetensors'
    assert hub.checkpoint_url(f'timm/{name}') == url == hub.checkpoint_url(cfg['hf_hub_id'])
    assert hub.lookup(f'timm/{name}').local_path == f'timm/{name}.safetensors'
  assert hub.checkpoint_url('timm/resnet50.tv_in1k') == (
      'https://huggingface.co/timm/resnet50.tv_in1k/resolve/main/model.safetensors')
  gcs = 'https://storage.googleapis.com/mixer_models'
  assert hub.checkpoint_url('imagenet21k/Mixer-B_16') == f'{gcs}/imagenet21k/Mixer-B_16.npz'
  assert hub.checkpoint_url('imagenet1k/Mixer-L_16.npz') == f'{gcs}/imagenet1k/Mixer-L_16.npz'
  assert hub.lookup('imagenet1k/Mixer-L_16').local_path == 'imagenet1k/Mixer-L_16.npz'
  assert {c.model_name for c in hub.INDEX.values()} <= set(models.MODEL_SPECS)
  monkeypatch.setenv('HF_ENDPOINT', 'http://hf-mirror')  # Moves Hugging Face files only.
  assert hub.checkpoint_url('timm/resnet50').startswith('http://hf-mirror/timm/resnet50.a1_in1k/')
  assert hub.checkpoint_url('imagenet1k/Mixer-B_16').startswith(gcs)
  monkeypatch.setenv(hub.HUB_URL_ENV, 'http://mirror')  # A mirror of both.
  assert hub.checkpoint_url('timm/resnet50').startswith('http://mirror/timm/resnet50.a1_in1k/')


def test_fetched_files_are_where_pretrained_dir_finds_them(server, tmp_path):
  weights = _saved('resnet', 'tiny', tmp_path)
  body = pathlib.Path(weights).read_bytes()
  server.files['/timm/resnet50.a1_in1k/resolve/main/model.safetensors'] = body
  server.files['/mixer_models/imagenet21k/Mixer-B_16.npz'] = mixer_npz = npz_bytes()
  dest = tmp_path / 'checkpoints'
  path = hub.fetch('timm/resnet50', dest=str(dest))
  assert pathlib.Path(path).read_bytes() == body and not list(dest.rglob('*.partial'))
  assert (dest / 'imagenet21k' / 'Mixer-B_16.npz') == pathlib.Path(
      hub.fetch('imagenet21k/Mixer-B_16', dest=str(dest)))
  assert (dest / 'imagenet21k' / 'Mixer-B_16.npz').read_bytes() == mixer_npz
  config = defaults.get_config()
  for name, folder in (('resnet50', 'timm'), ('Mixer-B_16', 'imagenet21k')):
    config.model_name, config.pretrained_dir = name, str(dest / folder)
    found = pretrained.pretrained_path(config)
    assert found in (path, str(dest / 'imagenet21k' / 'Mixer-B_16.npz')), found
  assert sorted(checkpoint.load_variables(path)) == ['batch_stats', 'params']
  config.model_name = 'swin_tiny_patch4_window7_224'
  with pytest.raises(FileNotFoundError, match='hub fetch timm/swin_tiny_patch4_window7_224 '
                     '--dest=checkpoints` and set --config.pretrained_dir=checkpoints/timm'):
    pretrained.pretrained_path(config)
  server.files['/timm/mixer_b16_224.goog_in21k/resolve/main/model.safetensors'] = b'<html>'
  with pytest.raises(hub.FetchError, match='did not return an .safetensors file'):
    hub.fetch('timm/mixer_b16_224.goog_in21k', dest=str(dest))
  assert not list(dest.rglob('mixer_b16_224*'))


def test_export_writes_a_swin_workdir_as_timms_state_dict(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import tiny_config  # pylint: disable=import-outside-toplevel
  from vit_jax_ft import export, run_dir  # pylint: disable=import-outside-toplevel
  model = get_model('swin_tiny_patch4_window7_224', 3, embed_dim=8, depths=(2, 2),
                    num_heads=(2, 2), window_size=4)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.2,
                        jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                       np.zeros((1, 32, 32, 3)))['params'])
  config = tiny_config.get_config('unused')
  config.model_name, config.pp.crop = 'swin_tiny_patch4_window7_224', 32
  workdir = tmp_path / 'swin'
  with ocp.CheckpointManager(str(workdir / 'checkpoints')) as manager:
    manager.save(4, args=ocp.args.StandardSave({'params': params, 'step': 4}))
  (workdir / 'config.json').write_text(json.dumps(run_dir.config_record(config, model)))
  (workdir / 'dataset_info.json').write_text(json.dumps({'class_names': ['a', 'b', 'c']}))
  with pytest.raises(checkpoint.CheckpointError, match='ending in .safetensors'):
    export.export(str(workdir), str(tmp_path / 'swin.npz'))
  export.export(str(workdir), str(tmp_path / 'swin.safetensors'))
  saved = safetensors.numpy.load_file(str(tmp_path / 'swin.safetensors'))
  # timm's names and PyTorch's (out, in) Linear layout.
  np.testing.assert_array_equal(saved['layers.1.blocks.1.attn.qkv.weight'],
                                params['layers_1']['blocks_1']['attn']['qkv']['kernel'].T)
  assert saved['head.fc.weight'].shape == (3, 16)
  assert 'layers.1.downsample.reduction.weight' in saved
  assert_same_variables(checkpoint.load_variables(str(tmp_path / 'swin.safetensors')),
                        {'params': params})


def test_nat_files_are_the_authors_urls_and_pretrained_dir_finds_them(monkeypatch, tmp_path):
  monkeypatch.delenv(hub.HUB_URL_ENV, raising=False)
  # The URLs of SHI-Labs/Neighborhood-Attention-Transformer's README.
  assert hub.checkpoint_url('nat/nat_mini') == (
      'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_mini.pth')
  assert hub.checkpoint_url('nat/dinat_base') == (
      'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_base_in1k_224.pth')
  (tmp_path / 'dinat_tiny.pth').write_bytes(b'\x80\x02}q\x00.')  # A pickled empty dict.
  config = defaults.get_config()
  config.model_name, config.pretrained_dir = 'dinat_tiny', str(tmp_path)
  assert pretrained.pretrained_path(config) == str(tmp_path / 'dinat_tiny.pth')
  assert hub.is_torch_file(str(tmp_path / 'dinat_tiny.pth'))
  (tmp_path / 'page.pth').write_text('<html>Not found</html>')
  assert not hub.is_torch_file(str(tmp_path / 'page.pth'))
