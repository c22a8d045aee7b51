"""Swin Transformer: logits equal timm's on random weights, parameter counts equal timm's."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from vit_jax_ft import checkpoint
from vit_jax_ft.models import get_model, swin

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# Made by tests/fixtures/make_swin_fixtures.py with timm (see its docstring).
REFERENCE = json.loads((FIXTURES / 'swin_timm_counts.json').read_text())


@pytest.fixture(scope='module')
def timm_outputs():
  return np.load(FIXTURES / 'swin_timm.npz')


@pytest.mark.parametrize('case', sorted(REFERENCE['cases']))
def test_logits_equal_timm_on_random_weights(timm_outputs, case):
  spec = REFERENCE['cases'][case]
  prefix = f'{case}/sd/'
  state_dict = {k[len(prefix):]: timm_outputs[k] for k in timm_outputs.files
                if k.startswith(prefix)}
  params = swin.from_timm(state_dict)
  model = get_model('swin_tiny_patch4_window7_224', 5, embed_dim=spec['embed_dim'],
                    depths=tuple(spec['depths']), num_heads=tuple(spec['num_heads']),
                    window_size=spec['window_size'])
  images = timm_outputs[f'{case}/images']
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(images)))
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, expected['params'])
  with jax.default_matmul_precision('highest'):
    got = np.asarray(model.apply({'params': params}, jnp.asarray(images)))
  want = timm_outputs[f'{case}/logits']
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4 * np.abs(want).max())


@pytest.mark.parametrize('name', sorted(REFERENCE['counts']))
def test_parameter_counts_equal_timm(name):
  size = 384 if name.endswith('384') else 224
  model = get_model(name, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, 3))))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert count == REFERENCE['counts'][name]


def test_relative_position_index_is_the_offset_between_positions():
  index = swin.relative_position_index((3, 2))
  positions = [(r, c) for r in range(3) for c in range(2)]
  for q, (qr, qc) in enumerate(positions):
    for k, (kr, kc) in enumerate(positions):
      assert index[q, k] == (qr - kr + 2) * 3 + (qc - kc + 1)


def test_image_size_not_a_multiple_of_the_patch_is_a_clear_error():
  model = get_model('swin_tiny_patch4_window7_224', 3, embed_dim=8, depths=(2,),
                    num_heads=(2,))
  with pytest.raises(ValueError, match='multiple of the 4 px patches'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 3)))


def _state_dict(timm_outputs, case):
  prefix = f'{case}/sd/'
  return {k[len(prefix):]: timm_outputs[k] for k in timm_outputs.files if k.startswith(prefix)}


def test_timm_safetensors_load_as_variables_and_fine_tune_with_a_new_head(timm_outputs,
                                                                          tmp_path):
  state_dict = _state_dict(timm_outputs, 'odd_merge')
  path = str(tmp_path / 'swin.safetensors')
  safetensors.numpy.save_file(state_dict, path)
  variables = checkpoint.load_variables(path)
  assert list(variables) == ['params']
  jax.tree.map(np.testing.assert_array_equal, variables['params'], swin.from_timm(state_dict))
  spec = REFERENCE['cases']['odd_merge']
  model = get_model('swin_tiny_patch4_window7_224', 3, embed_dim=spec['embed_dim'],
                    depths=tuple(spec['depths']), num_heads=tuple(spec['num_heads']))
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 56, 56, 3)))['params']
  params = checkpoint.load_pretrained(path, init)
  head = params['head']['fc']['kernel']
  assert head.shape == (64, 3) and not head.any()
  np.testing.assert_array_equal(params['norm']['scale'], state_dict['norm.weight'])


def test_unknown_layouts_and_pickles_without_torch_are_clear_errors(tmp_path):
  safetensors.numpy.save_file({'encoder.conv9.weight': np.ones((2, 2), np.float32)},
                              str(tmp_path / 'other.safetensors'))
  with pytest.raises(checkpoint.CheckpointError, match="no supported family.*encoder.conv9"):
    checkpoint.load_variables(str(tmp_path / 'other.safetensors'))
  (tmp_path / 'model.pth').write_bytes(b'not read')
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    with pytest.raises(checkpoint.CheckpointError, match='needs torch.*safetensors'):
      checkpoint.load_variables(str(tmp_path / 'model.pth'))


def test_bias_tables_resize_as_timm_for_a_new_window(timm_outputs, tmp_path):
  tables = np.load(FIXTURES / 'swin_timm_table_resize.npz')
  resized = swin.resize_relative_position_bias(tables['window7'], (12, 12))
  np.testing.assert_allclose(resized, tables['window12'], rtol=1e-5, atol=1e-6)
  # Fine-tuning a window-7 checkpoint with window 8 resizes every table, nothing else.
  state_dict = _state_dict(timm_outputs, 'odd_merge')
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'swin.safetensors'))
  spec = REFERENCE['cases']['odd_merge']
  model = get_model('swin_tiny_patch4_window7_224', 3, embed_dim=spec['embed_dim'],
                    depths=tuple(spec['depths']), num_heads=tuple(spec['num_heads']),
                    window_size=8)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))['params']
  params = checkpoint.load_pretrained(str(tmp_path / 'swin.safetensors'), init)
  table = params['layers_0']['blocks_1']['attn']['relative_position_bias_table']
  assert table.shape == (15 * 15, 2)
  np.testing.assert_allclose(table, swin.resize_relative_position_bias(
      state_dict['layers.0.blocks.1.attn.relative_position_bias_table'], (8, 8)))
