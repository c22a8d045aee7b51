r"""Training-step benchmark: compile time, images/s, peak memory and model-FLOPs utilisation.

  python -m bench.train_step                              # small ViT on CPU + ViT-B/16 at 224
  python -m bench.train_step --models=ViT-B_16 --sizes=224,384 --batch=64 --dtype=bfloat16

Prints one line per (model, size). FLOPs come from XLA's cost analysis of the compiled
step; MFU is reported when `--peak_tflops` (the device's dense peak) is given.
"""
import functools
import resource
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax_ft import defaults, memory, models, optim, parallel, train

_MODELS = flags.DEFINE_list('models', ['testing', 'ViT-B_16'], 'Model names.')
_SIZES = flags.DEFINE_list('sizes', ['224'], 'Image sizes.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch per step.')
_ACCUM = flags.DEFINE_integer('accum_steps', 1, 'Micro-batches per step.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps after the compile.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Computation dtype.')
_ATTENTION = flags.DEFINE_string('attention', 'dense', "'dense' or 'dot_product'.")
_REMAT = flags.DEFINE_bool('remat', False, 'Rematerialise blocks.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Peak dense TFLOP/s of one device (for MFU).')


def bench_one(name: str, size: int) -> str:
  """Compiles and times the train step of `name` at `size` px; returns the report line."""
  overrides = dict(dtype=jnp.dtype(_DTYPE.value))
  if name.startswith(('ViT', 'testing')):
    overrides.update(attention=_ATTENTION.value, remat=_REMAT.value)
  if name == 'testing':
    overrides.update(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=4)
  model = models.get_model(name, 1000, **overrides)
  config = defaults.get_config()
  config.total_steps, config.warmup_steps = 100, 10
  tx = optim.make_optimizer(config)
  mesh = parallel.create_mesh()
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                      train=False)['params'],
                   out_shardings=parallel.replicated(mesh))()
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=jax.jit(tx.init)(params))
  rng = np.random.default_rng(0)
  batch = parallel.to_global(mesh, {
      'image': rng.uniform(-1, 1, (_BATCH.value, size, size, 3)).astype(np.float32),
      'label': rng.integers(0, 1000, _BATCH.value).astype(np.int32)})
  step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                      accum_steps=_ACCUM.value,
                                      dropout_rng=jax.random.PRNGKey(0)), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', 0.0))
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / _STEPS.value
  stats = jax.devices()[0].memory_stats()
  if stats:
    peak, where = stats['peak_bytes_in_use'] / 2**30, 'device'
  else:  # CPU backends keep no statistics: the process's peak resident memory instead.
    peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 'process RSS'
  line = (f'{name:12s} {size:4d}px batch {_BATCH.value:4d} {_DTYPE.value:8s} '
          f'compile {compile_s:6.1f}s  step {step_s:7.3f}s  '
          f'{_BATCH.value / step_s:8.1f} img/s  '
          f'{flops / _BATCH.value / 1e9:7.1f} GFLOP/img(train)  peak {where} mem {peak:5.2f} GiB')
  if _PEAK.value and flops:
    line += f'  MFU {flops / step_s / (_PEAK.value * 1e12 * jax.device_count()):.1%}'
  return line


def main(argv):
  memory.hide_gpus_from_tensorflow()
  del argv
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}')
  for name in _MODELS.value:
    for size in _SIZES.value:
      print(bench_one(name, int(size)), flush=True)


if __name__ == '__main__':
  app.run(main)
