"""train_step: gradient accumulation and data parallelism give the plain large-batch update."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import run_on_eight_devices
from vit_jax_ft import defaults, models, optim, train


def tiny_setup(batch=16, num_classes=5, seed=0):
  model = models.get_model('testing', num_classes, hidden_size=16, mlp_dim=32, num_heads=2,
                           num_layers=2, patch_size=(8, 8), dropout_rate=0.0)
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 10, 2, 0.1
  tx = optim.make_optimizer(config)
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch).astype(np.int32)
  params = model.init(jax.random.PRNGKey(seed), images[:1], train=False)['params']
  # A non-zero head so that all parameters get gradients.
  params['head']['kernel'] = jnp.asarray(rng.normal(0, 0.1, params['head']['kernel'].shape),
                                         jnp.float32)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  return model, tx, state, {'image': images, 'label': labels}


def run_steps(model, tx, state, batch, accum_steps, steps=2):
  step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                      accum_steps=accum_steps,
                                      dropout_rng=jax.random.PRNGKey(1)))
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
  return state, metrics


def test_gradient_accumulation_equals_one_large_batch():
  model, tx, state, batch = tiny_setup()
  want, want_metrics = run_steps(model, tx, state, batch, accum_steps=1)
  got, got_metrics = run_steps(model, tx, state, batch, accum_steps=4)
  assert int(got.step) == 2
  np.testing.assert_allclose(got_metrics['loss'], want_metrics['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, atol=2e-6)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(want.params),
                                                jax.tree.leaves(state.params))]
  assert min(moved) > 0  # Every parameter was updated.


def test_loss_is_the_batch_mean_cross_entropy():
  model, tx, state, batch = tiny_setup()
  _, metrics = run_steps(model, tx, state, batch, accum_steps=2, steps=1)
  logits = np.asarray(model.apply({'params': state.params}, batch['image']), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -logp[np.arange(len(batch['label'])), batch['label']].mean()
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)


def test_loss_weights_weight_each_example():
  model, tx, state, batch = tiny_setup()
  weights = np.zeros(len(batch['label']), np.float32)
  weights[:4] = 1.0  # Only the first four examples count.
  _, weighted = run_steps(model, tx, state, dict(batch, weight=weights), accum_steps=4,
                          steps=1)
  _, first4 = run_steps(model, tx, state, {k: v[:4] for k, v in batch.items()},
                        accum_steps=1, steps=1)
  np.testing.assert_allclose(weighted['loss'], first4['loss'], rtol=1e-5)
  np.testing.assert_allclose(weighted['grad_norm'], first4['grad_norm'], rtol=1e-4)


EIGHT_DEVICE_SCRIPT = '''
import functools, jax, numpy as np
from jax.sharding import Mesh
import test_train_step as t
from vit_jax_ft import parallel, train
assert jax.device_count() == 8, jax.devices()
model, tx, state, batch = t.tiny_setup()
results = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  s = parallel.replicate(mesh, state)
  b = parallel.to_global(mesh, batch)
  assert len(b['image'].sharding.device_set) == len(devices)
  s, _ = t.run_steps(model, tx, s, b, accum_steps=2)
  results.append(jax.device_get(s.params))
for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
  np.testing.assert_allclose(a, b, atol=2e-6)
print('SAME')
'''


def test_one_step_on_eight_devices_equals_one_device():
  run_on_eight_devices(EIGHT_DEVICE_SCRIPT)


def test_frozen_parameters_stay_and_grad_norm_covers_only_trained_ones():
  model, _, state, batch = tiny_setup()
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 10, 0, 0.1
  config.freeze = ('^(?!head/)',)  # Everything but the head.
  tx = optim.make_optimizer(config)
  state = state.replace(opt_state=tx.init(state.params))
  frozen = optim.frozen_mask(config.freeze, state.params)
  step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, accum_steps=2,
                                      dropout_rng=jax.random.PRNGKey(1), frozen=frozen))
  new_state, metrics = step_fn(state, batch)
  for path, value in jax.tree_util.tree_leaves_with_path(new_state.params):
    old = state.params
    for key in path:
      old = old[key.key]
    assert np.array_equal(value, old) != (path[0].key == 'head'), path

  def loss(head):
    params = dict(state.params, head=head)
    logits = model.apply({'params': params}, batch['image'])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), batch['label']])
  head_grads = jax.grad(loss)(state.params['head'])
  want = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(head_grads)))
  np.testing.assert_allclose(metrics['grad_norm'], want, rtol=1e-4)
