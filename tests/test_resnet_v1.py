"""ResNet v1.5 (timm's resnet50/101/152): logits and counts equal timm's, BatchNorm statistics."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from vit_jax_ft import checkpoint
from vit_jax_ft.models import get_model

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# Made by tests/fixtures/make_timm_fixtures.py with timm (see its docstring).
REFERENCE = json.loads((FIXTURES / 'resnet_timm_counts.json').read_text())


@pytest.fixture(scope='module')
def timm_tiny(tmp_path_factory):
  outputs = np.load(FIXTURES / 'resnet_timm.npz')
  state_dict = {k[len('tiny/sd/'):]: outputs[k] for k in outputs.files
                if k.startswith('tiny/sd/')}
  path = str(tmp_path_factory.mktemp('resnet') / 'resnet.safetensors')
  safetensors.numpy.save_file(state_dict, path)
  spec = REFERENCE['cases']['tiny']
  model = get_model('resnet50', 5, layers=tuple(spec['layers']),
                    channels=tuple(spec['channels']))
  return model, path, state_dict, outputs['tiny/images'], outputs['tiny/logits']


def test_logits_equal_timm_in_evaluation_mode(timm_tiny):
  model, path, _, images, want = timm_tiny
  variables = checkpoint.load_variables(path)
  assert sorted(variables) == ['batch_stats', 'params']
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(images)))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda x: x.shape, expected)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(model.apply(variables, jnp.asarray(images), train=False))
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4 * np.abs(want).max())


def test_training_mode_normalises_with_batch_statistics_and_updates_them(timm_tiny):
  model, path, state_dict, images, _ = timm_tiny
  variables = checkpoint.load_variables(path)
  _, updated = model.apply(variables, jnp.asarray(images), train=True, mutable=['batch_stats'])
  # The stem's BatchNorm sees conv1's output: its new running mean is 0.9 old + 0.1 batch mean.
  conv = jax.lax.conv_general_dilated(
      jnp.asarray(images), variables['params']['conv1']['kernel'], (2, 2), [(3, 3), (3, 3)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')
  batch_mean = np.asarray(conv).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(updated['batch_stats']['bn1']['mean'],
                             0.9 * state_dict['bn1.running_mean'] + 0.1 * batch_mean,
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', sorted(REFERENCE['counts']))
def test_parameter_counts_equal_timm(name):
  model = get_model(name, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params'])) == (
      REFERENCE['counts'][name])
