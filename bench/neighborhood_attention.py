r"""Neighbourhood attention against dense attention: the op, and NAT's step beside a dense ViT's.

  python -m bench.neighborhood_attention --maps=14,28,56 --sizes=224,320 --batch=8

Two tables. The op: forward and backward of `neighborhood_attention` (7 x 7 neighbours) and
of dense softmax attention over the same H x W map of `--channels` in `--heads` heads, per
map side; neighbourhood attention grows as H W k^2, dense as (H W)^2. The model: the training
step (`bench.steps.our_step`: forward, backward, optimizer update) of `--nat` beside the dense
ViT `--vit` of similar size (nat_mini 20M, ViT-S_16 22M), per image size; NAT has 4x4
tokens at its first level, the ViT 16x16 patches.
"""
import time
from typing import Callable

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import steps
from vit_jax_ft.models import neighborhood_attention

_MAPS = flags.DEFINE_list('maps', ['14', '28', '56'], 'Map sides for the op table.')
_CHANNELS = flags.DEFINE_integer('channels', 64, 'Channels of the op table.')
_HEADS = flags.DEFINE_integer('heads', 2, 'Heads of the op table.')
_KERNEL = flags.DEFINE_integer('kernel', 7, 'Neighbourhood side.')
_SIZES = flags.DEFINE_list('sizes', ['224', '320'], 'Image sizes for the model table.')
_NAT = flags.DEFINE_string('nat', 'nat_mini', 'The NAT/DiNAT name.')
_VIT = flags.DEFINE_string('vit', 'ViT-S_16', 'The dense ViT name.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Images (op table: maps) per step.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps after the compile.')


def seconds_per_call(run: Callable[[], None], repeats: int) -> float:
  """Median wall time of `run` (already compiled)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def dense_attention(q, k, v, rpb, dilation):
  """Softmax attention of every position to every other (the bias is unused)."""
  del rpb, dilation
  b, h, w, heads, d = q.shape
  q, k, v = (x.reshape(b, h * w, heads, d) for x in (q, k, v))
  weights = jax.nn.softmax(jnp.einsum('bqnd,bknd->bnqk', q, k), axis=-1)
  return jnp.einsum('bnqk,bknd->bqnd', weights, v).reshape(b, h, w, heads, d)


def op_step(attention, side: int) -> Callable[[], None]:
  """A compiled forward and backward of `attention` on one random map."""
  rng = np.random.default_rng(0)
  shape = (_BATCH.value, side, side, _HEADS.value, _CHANNELS.value // _HEADS.value)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  rpb = jnp.zeros((_HEADS.value, 2 * _KERNEL.value - 1, 2 * _KERNEL.value - 1))
  grad = jax.jit(jax.grad(lambda q, k, v, rpb: attention(q, k, v, rpb, 1).sum(),
                          argnums=(0, 1, 2, 3)))
  compiled = grad.lower(q, k, v, rpb).compile()
  return lambda: jax.block_until_ready(compiled(q, k, v, rpb))


def main(argv):
  del argv
  print(f'op: forward + backward, batch {_BATCH.value}, {_CHANNELS.value} channels, '
        f'{_HEADS.value} heads, {_KERNEL.value}x{_KERNEL.value} neighbours; ms per step')
  print(f'{"map":>7s} {"tokens":>7s} {"neighbourhood":>14s} {"dense":>10s} {"dense/NA":>9s}')
  for side in map(int, _MAPS.value):
    na = seconds_per_call(op_step(neighborhood_attention.neighborhood_attention, side),
                          _STEPS.value)
    dense = seconds_per_call(op_step(dense_attention, side), _STEPS.value)
    print(f'{side:>3d}x{side:<3d} {side * side:7d} {1e3 * na:14.1f} {1e3 * dense:10.1f} '
          f'{dense / na:9.2f}')
  print(f'\nmodel: training step, batch {_BATCH.value}, float32; ms per step')
  print(f'{"image":>7s} {_NAT.value:>12s} {_VIT.value:>12s} {"ViT/NAT":>8s}')
  for size in map(int, _SIZES.value):
    batch = steps.data(_BATCH.value, size, 1000)
    times = [seconds_per_call(steps.our_step(name, 1000, 1, batch)[0], _STEPS.value)
             for name in (_NAT.value, _VIT.value)]
    print(f'{size:>7d} {1e3 * times[0]:12.1f} {1e3 * times[1]:12.1f} {times[1] / times[0]:8.2f}')


if __name__ == '__main__':
  app.run(main)
