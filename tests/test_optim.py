"""The optimisation recipe against the official formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vit_jax_ft import defaults, optim


def official_lr(step, total, warmup, base, decay_type):
  """`vit_jax/utils.create_learning_rate_schedule`, written out."""
  progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  if decay_type == 'cosine':
    lr = base * 0.5 * (1 + math.cos(math.pi * progress))
  else:
    lr = 1e-5 + (base - 1e-5) * (1 - progress)
  return lr * min(1.0, step / warmup) if warmup else lr


@pytest.mark.parametrize('decay_type', ['cosine', 'linear'])
@pytest.mark.parametrize('warmup', [0, 50])
def test_schedule_matches_official_formula(decay_type, warmup):
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 500, warmup, 0.03
  config.decay_type = decay_type
  schedule = optim.learning_rate_schedule(config)
  for step in [0, 1, 10, 49, 50, 51, 120, 250, 499, 500, 600]:
    assert float(schedule(step)) == pytest.approx(
        official_lr(step, 500, warmup, 0.03, decay_type), rel=1e-5, abs=1e-9), step


def test_bad_schedule_keys_are_errors():
  config = defaults.get_config()
  config.decay_type = 'cosin'
  with pytest.raises(ValueError, match="decay_type='cosin'"):
    optim.learning_rate_schedule(config)
  config.decay_type, config.warmup_steps = 'cosine', config.total_steps
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.learning_rate_schedule(config)


def _params():
  rng = np.random.default_rng(0)
  return {'a': {'kernel': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
          'b': {'bias': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}


def test_first_updates_are_clipped_sgd_with_momentum():
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 100, 0, 0.1
  config.optim_dtype = 'float32'
  tx = optim.make_optimizer(config)
  params = _params()
  grads = jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), params)  # global norm > 1
  state = tx.init(params)
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  clipped = jax.tree.map(lambda g: np.asarray(g) / norm, grads)
  updates, state = tx.update(grads, state, params)
  lr0 = official_lr(0, 100, 0, 0.1, 'cosine')
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(clipped)):
    np.testing.assert_allclose(u, -lr0 * g, rtol=1e-5)
  updates, state = tx.update(grads, state, params)
  lr1 = official_lr(1, 100, 0, 0.1, 'cosine')
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(clipped)):
    np.testing.assert_allclose(u, -lr1 * (0.9 * g + g), rtol=1e-5)


def test_momentum_is_kept_in_bfloat16_by_default():
  config = defaults.get_config()
  state = optim.make_optimizer(config).init(_params())
  dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_frozen_parameters_get_no_update():
  config = defaults.get_config()
  config.freeze = ('^a/',)
  tx = optim.make_optimizer(config)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
  assert not np.any(updates['a']['kernel'])
  assert np.all(updates['b']['bias'] != 0)
  config.freeze = ('^c/',)
  with pytest.raises(ValueError, match="pattern '\\^c/' matches no parameter"):
    optim.make_optimizer(config).init(params)


def _named_params():
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  return {'Dense_0': {'kernel': normal(3, 4), 'bias': normal(4)},
          'LayerNorm_0': {'scale': normal(4), 'bias': normal(4)},
          'posembed_input': {'pos_embedding': normal(1, 5, 4)}}


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
def test_weight_decay_is_decoupled_and_skips_biases_norms_and_position_embeddings(optimizer):
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 100, 0, 0.1
  config.optimizer, config.optim_dtype, config.grad_norm_clip = optimizer, 'float32', 0.0
  config.weight_decay = 0.05
  tx = optim.make_optimizer(config)
  params = _named_params()
  grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p) + 0.1 * p, params)
  state = tx.init(params)
  # Independent: the optimiser's update from the gradients alone, plus lr * wd * kernel.
  momentum = jax.tree.map(np.zeros_like, params)
  mu, nu = jax.tree.map(np.zeros_like, params), jax.tree.map(np.zeros_like, params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    lr = official_lr(step, 100, 0, 0.1, 'cosine')
    for path in [('Dense_0', 'kernel'), ('Dense_0', 'bias'), ('LayerNorm_0', 'scale'),
                 ('LayerNorm_0', 'bias'), ('posembed_input', 'pos_embedding')]:
      g, p = np.asarray(grads[path[0]][path[1]]), np.asarray(params[path[0]][path[1]])
      if optimizer == 'sgd':
        m = momentum[path[0]][path[1]] = 0.9 * momentum[path[0]][path[1]] + g
        direction = m
      else:
        m = mu[path[0]][path[1]] = 0.9 * mu[path[0]][path[1]] + 0.1 * g
        v = nu[path[0]][path[1]] = 0.999 * nu[path[0]][path[1]] + 0.001 * g * g
        direction = (m / (1 - 0.9**(step + 1))) / (np.sqrt(v / (1 - 0.999**(step + 1))) + 1e-8)
      decay = 0.05 * p if path[1] == 'kernel' else 0.0
      np.testing.assert_allclose(updates[path[0]][path[1]], -lr * (direction + decay),
                                 rtol=2e-5, atol=1e-7, err_msg=f'{optimizer} {path} {step}')


def test_weight_decay_pattern_that_matches_nothing_is_an_error():
  config = defaults.get_config()
  config.weight_decay, config.weight_decay_params = 0.1, 'kernal$'
  with pytest.raises(ValueError, match="weight_decay_params='kernal\\$' matches no parameter"):
    optim.make_optimizer(config).init(_named_params())


def test_exponential_and_step_schedules_follow_their_formulas():
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 200, 20, 0.1
  config.decay_type, config.decay_rate = 'exponential', 0.98
  schedule = optim.learning_rate_schedule(config)
  for step in [0, 10, 20, 21, 57, 199]:
    expected = 0.1 * step / 20 if step < 20 else 0.1 * 0.98**(step - 20)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5), step
  config.decay_type, config.decay_milestones, config.decay_factor = 'step', (50, 120), 0.5
  schedule = optim.learning_rate_schedule(config)
  for step in [20, 49, 50, 51, 119, 120, 121, 199]:
    expected = 0.1 * 0.5**sum(step >= m for m in (50, 120))  # From each milestone on.
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step


@pytest.mark.parametrize('key, value, message', [
    ('decay_rate', 1.5, 'decay_rate=1.5 must be in'),
    ('decay_milestones', (120, 50), 'must be increasing steps'),
    ('decay_milestones', (10,), 'must be increasing steps'),
])
def test_bad_schedule_values_are_errors(key, value, message):
  config = defaults.get_config()
  config.total_steps, config.warmup_steps = 200, 20
  config.decay_type = 'exponential' if key == 'decay_rate' else 'step'
  config[key] = value
  with pytest.raises(ValueError, match=message):
    optim.learning_rate_schedule(config)


def _vit_like_params():
  leaf = lambda: jnp.ones((2,))  # noqa: E731
  return {'embedding': {'kernel': leaf()}, 'cls': leaf(),
          'Transformer': {'posembed_input': {'pos_embedding': leaf()},
                          'encoderblock_0': {'LayerNorm_0': {'scale': leaf()}},
                          'encoderblock_1': {'MlpBlock_0': {'Dense_0': {'kernel': leaf()}}},
                          'encoderblock_2': {'LayerNorm_1': {'bias': leaf()}},
                          'encoder_norm': {'scale': leaf()}},
          'head': {'kernel': leaf()}}


def test_layer_decay_scales_each_layer_as_timm():
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 100, 0, 0.1
  config.grad_norm_clip, config.momentum, config.layer_decay = 0.0, 0.0, 0.75
  params = _vit_like_params()
  tx = optim.make_optimizer(config)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  lr = official_lr(0, 100, 0, 0.1, 'cosine')
  # timm: layer id 0 for patch/cls/pos embeddings, i + 1 for block i, depth + 1 = 4 after.
  expected = {('embedding', 'kernel'): 0, ('cls',): 0,
              ('Transformer', 'posembed_input', 'pos_embedding'): 0,
              ('Transformer', 'encoderblock_0', 'LayerNorm_0', 'scale'): 1,
              ('Transformer', 'encoderblock_1', 'MlpBlock_0', 'Dense_0', 'kernel'): 2,
              ('Transformer', 'encoderblock_2', 'LayerNorm_1', 'bias'): 3,
              ('Transformer', 'encoder_norm', 'scale'): 4, ('head', 'kernel'): 4}
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(updates).items()}
  assert set(flat) == set(expected)
  for path, layer in expected.items():
    np.testing.assert_allclose(flat[path], -lr * 0.75**(4 - layer), rtol=1e-6, err_msg=path)
  config.layer_decay = 1.5
  with pytest.raises(ValueError, match='layer_decay=1.5'):
    optim.make_optimizer(config)


def test_backbone_freezes_everything_but_the_head_and_its_hidden_layers():
  params = dict(_vit_like_params(), head_hidden_0={'kernel': jnp.ones((2,))})
  frozen = traverse_util.flatten_dict(optim.frozen_mask(('backbone',), params), sep='/')
  trained = sorted(name for name, is_frozen in frozen.items() if not is_frozen)
  assert trained == ['head/kernel', 'head_hidden_0/kernel']
  assert len(frozen) == 9  # The 8 leaves of _vit_like_params and the hidden layer.
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.freeze = 100, 0, ('backbone',)
  tx = optim.make_optimizer(config)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  moved = sorted(n for n, u in traverse_util.flatten_dict(updates, sep='/').items() if np.any(u))
  assert moved == trained
