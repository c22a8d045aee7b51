"""MaxViT ('tf' configs): logits, training-mode BatchNorm, table resizes and counts equal timm's."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from vit_jax_ft import checkpoint
from vit_jax_ft.models import get_model, maxvit, resnet_v1, swin

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# Made by tests/fixtures/make_timm_fixtures.py with timm (see its docstring).
REFERENCE = json.loads((FIXTURES / 'maxvit_timm_counts.json').read_text())
CASE = REFERENCE['cases']['p2_64']


def _model(num_classes: int = 5):
  return get_model('maxvit_tiny_tf_224', num_classes, embed_dim=tuple(CASE['embed_dim']),
                   depths=tuple(CASE['depths']), stem_width=CASE['stem_width'],
                   head_hidden_size=CASE['head_hidden_size'], head_dim=CASE['dim_head'])


def _prefixed(outputs, prefix: str):
  return {k[len(prefix):]: outputs[k] for k in outputs.files if k.startswith(prefix)}


def _close(got, want):
  assert np.abs(want).max() > 0.3  # The tanh pre-logits keep these logits small.
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4 * np.abs(want).max())


@pytest.fixture(scope='module')
def timm_case(tmp_path_factory):
  outputs = np.load(FIXTURES / 'maxvit_timm.npz')
  extra = np.load(FIXTURES / 'maxvit_timm_extra.npz')
  state_dict = _prefixed(outputs, 'p2_64/sd/')
  path = str(tmp_path_factory.mktemp('maxvit') / 'maxvit.safetensors')
  safetensors.numpy.save_file(state_dict, path)
  return outputs, extra, state_dict, path


def test_logits_equal_timm_in_evaluation_mode(timm_case):
  outputs, _, state_dict, path = timm_case
  assert maxvit.is_timm_state_dict(state_dict)
  assert not swin.is_timm_state_dict(state_dict) and not resnet_v1.is_timm_state_dict(state_dict)
  variables = checkpoint.load_variables(path)
  assert sorted(variables) == ['batch_stats', 'params']
  images = jnp.asarray(outputs['p2_64/images'])
  model = _model()
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda x: x.shape, expected)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(model.apply)(variables, images))
  _close(got, outputs['p2_64/logits'])


def test_training_mode_uses_batch_statistics_and_moves_the_running_means(timm_case):
  outputs, extra, _, path = timm_case
  variables = checkpoint.load_variables(path)
  step = jax.jit(lambda v, x: _model().apply(v, x, train=True, mutable=['batch_stats']))
  with jax.default_matmul_precision('highest'):
    got, updated = step(variables, jnp.asarray(outputs['p2_64/images']))
  _close(np.asarray(got), extra['p2_64/train/logits'])
  # timm's running means after the step (PyTorch's momentum 0.1 is Flax's 0.9).
  want = traverse_util.flatten_dict(
      maxvit.from_timm(_prefixed(extra, 'p2_64/train/sd/'))['batch_stats'])
  means = {k: v for k, v in traverse_util.flatten_dict(updated['batch_stats']).items()
           if k[-1] == 'mean'}
  assert sorted(means) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(means[key], value, rtol=1e-4, atol=1e-5, err_msg=str(key))


def test_weights_at_a_new_size_resize_the_tables_and_equal_timm(timm_case):
  """The 64 px weights (partitions of 2) fine-tuned at 96 px (3), as timm loads them."""
  _, extra, state_dict, path = timm_case
  images = jnp.asarray(extra['p2_64/resized/images'])
  model = _model()
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
  variables = checkpoint.load_variables(path)
  params = checkpoint.adapt(variables['params'], init['params'], keep_head=True)
  want_tables = maxvit.from_timm(_prefixed(extra, 'p2_64/resized/sd/'))['params']
  got_tables = {k: v for k, v in traverse_util.flatten_dict(params).items()
                if k[-1] == 'relative_position_bias_table'}
  assert sorted(got_tables) == sorted(traverse_util.flatten_dict(want_tables))
  for key, value in traverse_util.flatten_dict(want_tables).items():
    assert value.shape[1:] == (5, 5)
    np.testing.assert_allclose(got_tables[key], value, rtol=1e-5, atol=1e-6, err_msg=str(key))
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(model.apply)(
        {'params': params, 'batch_stats': variables['batch_stats']}, images))
  _close(got, extra['p2_64/resized/logits'])
  # A new task: the classifier from the new model's init (here ones); timm keeps the head's
  # norm and pre-logits.
  init = jax.eval_shape(lambda: _model(3).init(jax.random.PRNGKey(0), images))['params']
  fresh = checkpoint.load_pretrained(path, jax.tree.map(lambda s: np.ones(s.shape, s.dtype), init))
  np.testing.assert_array_equal(fresh['head']['fc']['kernel'],
                                np.ones((CASE['head_hidden_size'], 3)))
  np.testing.assert_array_equal(fresh['head']['pre_logits']['fc']['bias'],
                                state_dict['head.pre_logits.fc.bias'])
  np.testing.assert_array_equal(fresh['head']['norm']['scale'], state_dict['head.norm.weight'])


def test_table_resize_for_384_px_equals_timm():
  tables = np.load(FIXTURES / 'maxvit_timm_extra.npz')
  resized = maxvit.resize_relative_position_bias(tables['table7'], (12, 12))
  np.testing.assert_allclose(resized, tables['table12'], rtol=1e-5, atol=1e-6)


def test_relative_position_bias_is_indexed_by_key_minus_query():
  table = np.random.RandomState(0).randn(2, 3, 5)  # A (2, 3) window, two heads.
  bias = np.asarray(maxvit.relative_position_bias(jnp.asarray(table), (2, 3)))
  positions = [(r, c) for r in range(2) for c in range(3)]
  for q, (qr, qc) in enumerate(positions):
    for k, (kr, kc) in enumerate(positions):
      np.testing.assert_allclose(bias[:, q, k], table[:, kr - qr + 1, kc - qc + 2])


def test_grid_partition_groups_positions_strided_across_the_map():
  x = jnp.arange(2 * 6 * 4 * 1.0).reshape(2, 6, 4, 1)
  groups = maxvit.grid_partition(x, (3, 2))  # Strides 2 and 2.
  assert groups.shape == (2 * 2 * 2, 3, 2, 1)
  np.testing.assert_array_equal(groups[1], x[0, 0::2, 1::2])  # Group (0, 1) of image 0.
  np.testing.assert_array_equal(groups[4], x[1, 0::2, 0::2])
  np.testing.assert_array_equal(maxvit.grid_unpartition(groups, (3, 2), 6, 4), x)


def test_drop_path_drops_whole_samples_in_training_only():
  x = jnp.ones((64, 2, 2, 3))
  layer = maxvit.DropPath(0.5)
  np.testing.assert_array_equal(layer.apply({}, x, False), x)
  y = np.asarray(layer.apply({}, x, True, rngs={'dropout': jax.random.PRNGKey(0)}))
  per_sample = y.reshape(64, -1)
  assert set(np.unique(per_sample)) == {0.0, 2.0}  # Kept samples are scaled by 1 / 0.5.
  assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()


def test_to_timm_inverts_from_timm(timm_case):
  _, _, state_dict, _ = timm_case
  back = maxvit.to_timm(maxvit.from_timm(state_dict))
  tracked = [k for k in back if k.endswith('num_batches_tracked')]
  assert tracked and sorted(set(back) - set(tracked)) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_image_size_not_a_multiple_of_the_partitions_is_a_clear_error():
  with pytest.raises(ValueError, match='multiple of 32'):
    jax.eval_shape(lambda: _model().init(jax.random.PRNGKey(0), jnp.zeros((1, 80, 80, 3))))


@pytest.mark.parametrize('name', sorted(REFERENCE['counts']))
def test_parameter_counts_equal_timm(name):
  size = 384 if name.endswith('384') else 224
  shapes = jax.eval_shape(lambda: get_model(name, 1000).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert count == REFERENCE['counts'][name]
