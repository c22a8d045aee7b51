"""DaViT: logits equal timm's on random weights, parameter counts, stochastic depth, weights."""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from conftest import random_params
from vit_jax_ft import checkpoint
from vit_jax_ft.models import MODEL_SPECS, get_model, davit

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# Made by davit() in tests/fixtures/make_timm_fixtures.py with timm (see its docstring).
REFERENCE = json.loads((FIXTURES / 'davit_timm_counts.json').read_text())


@pytest.fixture(scope='module')
def timm_outputs():
  return np.load(FIXTURES / 'davit_timm.npz')


def _state_dict(timm_outputs, case):
  prefix = f'{case}/sd/'
  return {k[len(prefix):]: timm_outputs[k] for k in timm_outputs.files if k.startswith(prefix)}


def _model(case, num_classes=5):
  spec = REFERENCE['cases'][case]
  return get_model('davit_tiny', num_classes, embed_dims=tuple(spec['embed_dims']),
                   depths=tuple(spec['depths']), num_heads=tuple(spec['num_heads']),
                   window_size=spec['window_size'])


@pytest.mark.parametrize('case', sorted(REFERENCE['cases']))
def test_logits_equal_timm_on_random_weights(timm_outputs, case):
  params = davit.from_timm(_state_dict(timm_outputs, case))
  model = _model(case)
  images = jnp.asarray(timm_outputs[f'{case}/images'])
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, expected['params'])
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(model.apply)({'params': params}, images))
  want = timm_outputs[f'{case}/logits']
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4 * np.abs(want).max())


@pytest.mark.parametrize('name', sorted(REFERENCE['counts']))
def test_parameter_counts_equal_timm(name):
  shapes = jax.eval_shape(lambda: get_model(name, 1000).init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 224, 224, 3))))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert count == REFERENCE['counts'][name]


def test_drop_path_rates_are_timms_schedule():
  want = REFERENCE['drop_path_rates']['davit_small@0.1']
  got = davit.drop_path_rates(0.1, MODEL_SPECS['davit_small']['depths'])
  assert [len(stage) for stage in got] == [len(stage) for stage in want]
  np.testing.assert_allclose(sum(got, []), sum(want, []), rtol=1e-6, atol=1e-9)


class _Branch(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, train):
    return davit.drop_path(self.rate, x, train)


def test_drop_path_drops_whole_samples_and_rescales_in_training_only():
  x = jnp.ones((4000, 2, 2, 3))
  y = np.asarray(_Branch(0.25).apply({}, x, True, rngs={'dropout': jax.random.PRNGKey(1)}))
  kept = y.reshape(4000, -1)[:, 0] != 0
  np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
  assert not y[~kept].any()
  assert abs(kept.mean() - 0.75) < 0.03  # Binomial sd 0.007.
  np.testing.assert_array_equal(_Branch(0.25).apply({}, x, False), x)


def test_training_with_drop_path_varies_per_sample_and_evaluation_does_not():
  model = get_model('davit_tiny', 3, embed_dims=(4,), depths=(2,), num_heads=(1,),
                    window_size=2, drop_path_rate=0.2)  # Rates 0 and 0.2.
  images = jnp.broadcast_to(jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 3)),
                            (16, 8, 8, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images[:1]))
  params = random_params(shapes['params'])

  @jax.jit
  def run(rng):
    train = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
    return train, model.apply({'params': params}, images)

  train, evaluation = map(np.asarray, run(jax.random.PRNGKey(2)))
  np.testing.assert_allclose(evaluation, evaluation[:1].repeat(16, 0), rtol=1e-6)
  # Each sample draws which of the second block's 4 branches it keeps: the samples differ, and
  # those that drew the same branches agree (the most likely draw, all kept, has p = 0.41).
  distinct = len(np.unique(np.round(train, 4), axis=0))
  assert 1 < distinct < 16


def test_timm_safetensors_round_trip_and_fine_tune_with_a_new_head_and_size(timm_outputs,
                                                                            tmp_path):
  state_dict = _state_dict(timm_outputs, 'odd3')
  path = str(tmp_path / 'davit.safetensors')
  safetensors.numpy.save_file(state_dict, path)
  variables = checkpoint.load_variables(path)
  assert list(variables) == ['params']
  jax.tree.map(np.testing.assert_array_equal, variables['params'], davit.from_timm(state_dict))
  saved = davit.to_timm(variables)
  assert sorted(saved) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  safetensors.numpy.save_file(saved, str(tmp_path / 'saved.safetensors'))
  jax.tree.map(np.testing.assert_array_equal, variables,
               checkpoint.load_variables(str(tmp_path / 'saved.safetensors')))
  # A new head (3 classes, not 5) at a new size (72 px, not 50): only the classifier changes.
  shapes = jax.eval_shape(lambda: _model('odd3', 3).init(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 72, 72, 3))))
  init = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes['params'])
  params = traverse_util.flatten_dict(checkpoint.load_pretrained(path, init), sep='/')
  restored = traverse_util.flatten_dict(variables['params'], sep='/')
  assert sorted(params) == sorted(restored)
  for key, value in params.items():
    if key.startswith('head/'):
      assert value.shape[-1] == 3 and (value == 7.0).all(), key
    else:
      np.testing.assert_array_equal(value, restored[key], err_msg=key)
  np.testing.assert_array_equal(params['norm/scale'], state_dict['head.norm.weight'])


def test_the_layout_is_told_apart_from_the_other_timm_families(timm_outputs):
  ours = _state_dict(timm_outputs, 'pad7')
  assert davit.is_timm_state_dict(ours)
  for family, (detect, _) in checkpoint.STATE_DICT_FAMILIES.items():
    if family != 'davit':
      assert not detect(ours), family
  for family in ('swin', 'mixer', 'resnet'):
    other = np.load(FIXTURES / f'{family}_timm.npz')
    case = sorted({k.split('/')[0] for k in other.files})[0]
    assert not davit.is_timm_state_dict(_state_dict(other, case)), family
