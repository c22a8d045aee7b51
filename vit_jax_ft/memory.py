"""Device memory: the fewest micro-batches whose training step fits, and TensorFlow off GPUs."""
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import ml_collections

from vit_jax_ft import parallel

# Share of a device's memory limit a step may plan for: the allocator fragments the rest.
HEADROOM = 0.9


def hide_gpus_from_tensorflow() -> None:
  """TensorFlow only reads data: keeps it from reserving GPU memory that JAX needs."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], 'GPU')


def check_accum_steps(config: ml_collections.ConfigDict) -> None:
  """Rejects an accumulation set-up that cannot split `config.batch`, before any compile."""
  if config.memory_budget_gb is not None and config.memory_budget_gb <= 0:
    raise ValueError(f'config.memory_budget_gb={config.memory_budget_gb} must be positive '
                     '(or None: the device memory limit).')
  if config.auto_accum_steps:
    parallel.check_batch_size(config.batch, 'batch')
    return
  if not isinstance(config.accum_steps, int) or config.accum_steps < 1:
    raise ValueError(f'config.accum_steps={config.accum_steps!r} must be a positive integer; '
                     'or set config.auto_accum_steps=True to fit the device memory.')
  parallel.check_batch_size(config.batch, 'batch', config.accum_steps)


def step_bytes(compiled: Any) -> int:
  """Bytes a compiled step holds at its peak: inputs, outputs not donated into them, scratch."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def memory_budget(config: ml_collections.ConfigDict) -> int:
  """Bytes a step may use on one device: `memory_budget_gb`, else the device's limit."""
  if config.memory_budget_gb:
    return int(config.memory_budget_gb * 2**30)
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if 'bytes_limit' not in stats:
    raise ValueError(f'The {device.platform} device reports no memory limit to fit the step '
                     'into; set config.memory_budget_gb, or config.auto_accum_steps=False '
                     'with config.accum_steps.')
  return int(stats['bytes_limit'] * HEADROOM)


def accum_candidates(batch: int, devices: int) -> List[int]:
  """Micro-batch counts that split each device's share of `batch` evenly, fewest first."""
  per_device = batch // devices
  return [k for k in range(1, per_device + 1) if per_device % k == 0]


def fewest_that_fit(candidates: List[int], need: Callable[[int], int],
                    budget: int) -> Optional[int]:
  """The smallest candidate whose `need` fits `budget`, by bisection (need falls as k grows)."""
  if need(candidates[-1]) > budget:
    return None
  lo, hi = 0, len(candidates) - 1
  while lo < hi:
    mid = (lo + hi) // 2
    if need(candidates[mid]) <= budget:
      hi = mid
    else:
      lo = mid + 1
  return candidates[lo]


def fit_accum_steps(config: ml_collections.ConfigDict,
                    compile_step: Callable[[int, bool], Any]) -> Tuple[int, bool]:
  """(accum_steps, remat): the fewest micro-batches whose step fits, rematerialising only
  when no split fits without it. `compile_step(accum_steps, remat)` compiles that step."""
  budget = memory_budget(config)
  candidates = accum_candidates(config.batch, jax.device_count())
  needs: Dict[Tuple[int, bool], int] = {}
  for remat in (False, True) if not config.model.remat else (True,):
    def need(k, remat=remat):
      needs[k, remat] = step_bytes(compile_step(k, remat))
      logging.info('accum_steps=%d%s: the step needs %.3f GiB of %.3f GiB', k,
                   ' with remat' if remat else '', needs[k, remat] / 2**30, budget / 2**30)
      return needs[k, remat]
    chosen = fewest_that_fit(candidates, need, budget)
    if chosen:
      logging.info('Automatic accum_steps=%d%s: micro-batches of %d per device, %.3f GiB of '
                   'the %.3f GiB budget.', chosen, ' with remat' if remat else '',
                   config.batch // jax.device_count() // chosen, needs[chosen, remat] / 2**30,
                   budget / 2**30)
      return chosen, remat
  smallest = min(needs.values())
  raise ValueError(f'The training step needs at least {smallest / 2**30:.3f} GiB per device '
                   f'even with micro-batches of one example and remat, over the '
                   f'{budget / 2**30:.3f} GiB budget; use more devices, a smaller model or '
                   'image size (config.pp.crop), or raise config.memory_budget_gb.')
