"""Zoo weights: each family saved back in its own layout (timm's state dict, the released .npz)
round trips exactly, with timm's keys, dtypes and shapes (committed from timm by
tests/fixtures/make_timm_fixtures.py)."""
import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy

from vit_jax_ft import checkpoint
from vit_jax_ft.models import get_model

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# (fixture family, case): one small timm model of each state-dict family.
CASES = (('swin', 'pad_shift_clamp'), ('resnet', 'tiny'), ('mixer', 'tiny'))


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
