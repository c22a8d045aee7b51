"""Attention implementation choice and the bfloat16 policy, read off the traced computation."""
import functools
import logging

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import defaults, optim, train
from vit_jax_ft.models import get_model, vit


@pytest.mark.parametrize('backend, dtype, head_dim, want, why', [
    ('gpu', jnp.bfloat16, 64, 'cudnn', None),
    ('gpu', jnp.float16, 128, 'cudnn', None),
    ('cpu', jnp.bfloat16, 64, 'xla', 'backend is cpu'),
    ('tpu', jnp.bfloat16, 64, 'xla', 'backend is tpu'),
    ('gpu', jnp.float32, 64, 'xla', 'dtype is float32'),
    ('gpu', jnp.bfloat16, 12, 'xla', 'head dimension 12'),
    ('gpu', jnp.bfloat16, 256, 'xla', 'head dimension 256'),
])
def test_attention_implementation_follows_cudnn_limits(backend, dtype, head_dim, want, why):
  implementation, reason = vit.attention_implementation(backend, dtype, head_dim)
  assert implementation == want
  assert (reason is None) == (why is None)
  if why:
    assert why in reason


def tiny(dtype, attention='dense', num_classes=5):
  return get_model('testing', num_classes, hidden_size=16, mlp_dim=32, num_heads=2,
                   num_layers=2, patch_size=(8, 8), dropout_rate=0.0, attention=attention,
                   dtype=dtype)


def test_cpu_dot_product_attention_says_once_why_it_is_xla(caplog):
  vit._log_fallback.cache_clear()  # pylint: disable=protected-access
  model = tiny(jnp.bfloat16, attention='dot_product')
  images = jnp.zeros((2, 32, 32, 3))
  with caplog.at_level(logging.INFO):
    params = model.init(jax.random.PRNGKey(0), images)
    model.apply(params, images)
  lines = [r.getMessage() for r in caplog.records if 'uses XLA attention' in r.getMessage()]
  assert lines == ['attention="dot_product" uses XLA attention, not cuDNN: the backend is '
                   'cpu, and cuDNN attention needs an NVIDIA GPU.']


def equations(jaxpr):
  """Every equation of a closed jaxpr, sub-computations (pjit, custom_jvp, remat) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from equations(sub)


def dtypes_of(jaxpr, primitive):
  """The dtypes of the first operand of each `primitive` equation."""
  return [e.invars[0].aval.dtype for e in equations(jaxpr) if e.primitive.name == primitive]


@pytest.mark.parametrize('attention', ['dense', 'dot_product'])
def test_bfloat16_computes_in_bf16_and_keeps_statistics_softmax_logits_fp32(attention):
  model = tiny(jnp.bfloat16, attention)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images)['params']
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, images))(params).jaxpr
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  matmuls = dtypes_of(jaxpr, 'dot_general')
  # The patch embedding, per block q, k, v, out, 2 attention products and 2 MLP layers in
  # bf16; the head in fp32.
  assert matmuls == [bf16] * (1 + 8 * 2) + [f32]
  # LayerNorm means and variances (5 norms x 2 statistics) and the softmax sums: fp32.
  assert set(dtypes_of(jaxpr, 'reduce_sum')) == {f32}
  assert len(dtypes_of(jaxpr, 'reduce_sum')) >= 5 * 2 + 2
  assert set(dtypes_of(jaxpr, 'exp')) == {f32}  # The softmax.
  assert set(dtypes_of(jaxpr, 'reduce_max')) == {f32}
  assert set(dtypes_of(jaxpr, 'tanh')) == {bf16}  # GELU runs in bf16.
  assert model.apply({'params': params}, images).dtype == f32


def test_bfloat16_train_step_keeps_fp32_params_grads_and_loss():
  model = tiny(jnp.bfloat16)
  config = defaults.get_config()
  config.total_steps, config.warmup_steps = 10, 2
  tx = optim.make_optimizer(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, 5, 4).astype(np.int32)}
  params = model.init(jax.random.PRNGKey(0), batch['image'][:1])['params']
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  step = functools.partial(train.train_step, model=model, tx=tx, accum_steps=1,
                           dropout_rng=jax.random.PRNGKey(1))
  new_state, metrics = jax.jit(step)(state, batch)
  assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
  assert metrics['loss'].dtype == jnp.float32 and metrics['grad_norm'].dtype == jnp.float32
  # The loss is the fp32 cross-entropy of the model's fp32 logits.
  logits = np.asarray(model.apply({'params': params}, batch['image']), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -logp[np.arange(4), batch['label']].mean()
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)
