r"""Training-step benchmark: images/s per device, MFU, memory, ours and the official step.

  python -m bench.train_step --models=ViT-B_16 --sizes=224,384 --batch=128 \
      --dtype=bfloat16 --attention=dense,dot_product --official=/tmp/official \
      --official_batch=32

One line per (model, size, attention) with the compile time, step time, images/s per
device, model FLOPs per image (XLA's cost analysis of the compiled step), MFU against the
device's peak (`PEAK_TFLOPS` by device kind, or `--peak_tflops`), the memory the compiled
step needs and the device's peak memory in use; with `--official` (a checkout of
google-research/vision_transformer) the official step (float32, dense attention: all it
has) on one device with `--official_batch` follows. `--batch` is per device.
"""
import pathlib
import resource
import time
from typing import Any, Optional

from absl import app, flags
import jax
import numpy as np

from bench import steps
from vit_jax_ft import memory

_MODELS = flags.DEFINE_list('models', ['ViT-B_16'], 'Model names.')
_SIZES = flags.DEFINE_list('sizes', ['224'], 'Image sizes.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Batch per device per step.')
_ACCUM = flags.DEFINE_integer('accum_steps', 1, 'Micro-batches per step.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps after the compile.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', "Computation dtype ('bfloat16' on GPU/TPU).")
_ATTENTION = flags.DEFINE_list('attention', ['dense'], "Attention kinds: 'dense', 'dot_product'.")
_REMAT = flags.DEFINE_bool('remat', False, 'Rematerialise blocks.')
_CLASSES = flags.DEFINE_integer('classes', 1000, 'Number of classes.')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak dense TFLOP/s of one device in the '
                           'benchmarked dtype; default: PEAK_TFLOPS of the device kind.')
_OFFICIAL = flags.DEFINE_string('official', None, 'A google-research/vision_transformer '
                                'checkout: also time its step.')
_OFFICIAL_BATCH = flags.DEFINE_integer('official_batch', None, 'Batch of the official step '
                                       '(float32 needs about twice the memory); default --batch.')

# Dense bfloat16 peak TFLOP/s of one device (vendor sheets), by a substring of device_kind.
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'V100': 125.0,
               'TPU v6': 918.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0,
               'TPU v4': 275.0, 'TPU v3': 123.0}


def peak_tflops(device_kind: str) -> Optional[float]:
  """`--peak_tflops`, else the table's entry for `device_kind`, else None (no MFU)."""
  if _PEAK.value:
    return _PEAK.value
  return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device_kind.lower()), None)


def report(label: str, run: Any, compiled: Any, compile_s: float, batch: int,
           devices: int) -> str:
  """Times `--steps` steps of `run` and formats the line (FLOPs and memory of `compiled`)."""
  run()  # Warm-up.
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    run()
  step_s = (time.perf_counter() - t0) / _STEPS.value
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', 0.0))  # Per device.
  per_device = batch / devices / step_s
  line = (f'{label:44s} compile {compile_s:6.1f}s step {step_s:7.3f}s '
          f'{per_device:8.1f} img/s/device {flops * devices / batch / 1e9:6.1f} GFLOP/img')
  peak = peak_tflops(jax.devices()[0].device_kind)
  if peak and flops:
    line += f'  MFU {flops / step_s / (peak * 1e12):5.1%}'
  line += f'  step needs {memory.step_bytes(compiled) / 2**30:5.2f} GiB'
  stats = jax.local_devices()[0].memory_stats()
  if stats:
    line += f'  device peak {stats["peak_bytes_in_use"] / 2**30:5.2f} GiB'
  else:  # CPU backends keep no statistics: the process's peak resident memory instead.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    line += f'  process peak RSS {rss:5.2f} GiB'
  return line


def main(argv):
  memory.hide_gpus_from_tensorflow()
  del argv
  devices = jax.device_count()
  kind = jax.devices()[0].device_kind
  print(f'devices: {devices} x {kind}; jax {jax.__version__}; peak {peak_tflops(kind)} '
        f'TFLOP/s per device; batch {_BATCH.value} per device, accum_steps {_ACCUM.value}')
  for name in _MODELS.value:
    for size in map(int, _SIZES.value):
      batch = steps.data(_BATCH.value * devices, size, _CLASSES.value)
      for attention in _ATTENTION.value:
        run, compiled, seconds = steps.compile_seconds(
            lambda: steps.our_step(name, _CLASSES.value, _ACCUM.value, batch,
                                              _DTYPE.value, attention, _REMAT.value))
        print(report(f'ours {name} {size}px {_DTYPE.value} {attention}', run, compiled,
                     seconds, _BATCH.value * devices, devices), flush=True)
        del run, compiled
      if _OFFICIAL.value:
        size_one = _OFFICIAL_BATCH.value or _BATCH.value
        one = steps.data(size_one, size, _CLASSES.value)
        root = pathlib.Path(_OFFICIAL.value).expanduser().resolve()
        run, compiled, seconds = steps.compile_seconds(
            lambda: steps.official_step(root, name, _CLASSES.value, _ACCUM.value, one))
        print(report(f'official {name} {size}px float32 dense', run, compiled, seconds,
                     size_one, 1), flush=True)


if __name__ == '__main__':
  app.run(main)
