"""Neighbourhood attention (NAT, DiNAT) in pure JAX, computed as NATTEN 0.14 computes it.

Each query attends to exactly kernel x kernel keys: its neighbourhood, shifted inward where it
would cross the border. With dilation d the map splits into d x d interleaved sub-grids
(positions r, r + d, r + 2d, ... along each axis); each query's neighbourhood lies in its own
sub-grid, every d-th position. The relative position bias (heads, 2k - 1, 2k - 1) is indexed by
the offset from query to key in sub-grid steps, plus k - 1. The neighbours are gathered by
static index arrays, so time and memory grow as O(H W k^2 C), never as (H W)^2.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def axis_neighbours(length: int, kernel: int, dilation: int) -> Tuple[np.ndarray, np.ndarray]:
  """(length, kernel) key positions of each position along one axis, and their bias rows."""
  positions = np.arange(length)
  residue, step = positions % dilation, positions // dilation
  sub_length = -(-(length - residue) // dilation)  # Positions in each one's sub-grid.
  start = np.clip(step - kernel // 2, 0, sub_length - kernel)  # Shifted inward at borders.
  keys = (residue + dilation * start)[:, None] + dilation * np.arange(kernel)
  return keys, (keys - positions[:, None]) // dilation + kernel - 1


def neighborhood_attention(q, k, v, rpb, dilation: int = 1):
  """Attention of each query to its k x k neighbours; q, k, v (B, H, W, heads, head_dim).

  `q` comes scaled; `rpb` is the (heads, 2k - 1, 2k - 1) relative position bias. H and W must
  be at least kernel x dilation (`NeighborhoodAttention2D` pads smaller maps).
  """
  b, h, w, heads, head_dim = q.shape
  kernel = (rpb.shape[-1] + 1) // 2
  if min(h, w) < kernel * dilation:
    raise ValueError(f'Neighbourhood attention needs a map of at least kernel x dilation = '
                     f'{kernel * dilation} per side, got {h}x{w}; pad it first.')
  rows, row_bias = axis_neighbours(h, kernel, dilation)
  cols, col_bias = axis_neighbours(w, kernel, dilation)
  # (H W, k k) flat index of each query's keys, row-major over the k x k window.
  index = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(h * w, kernel**2)
  keys = k.reshape(b, h * w, heads, head_dim)[:, index]  # (B, H W, k k, heads, head_dim)
  values = v.reshape(b, h * w, heads, head_dim)[:, index]
  logits = jnp.einsum('bqnd,bqknd->bqnk', q.reshape(b, h * w, heads, head_dim), keys)
  bias = jnp.moveaxis(rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]], 0, 2)
  logits = logits + bias.reshape(h * w, heads, kernel**2).astype(logits.dtype)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(values.dtype)
  return jnp.einsum('bqnk,bqknd->bqnd', weights, values).reshape(b, h, w, heads, head_dim)


class NeighborhoodAttention2D(nn.Module):
  """NATTEN 0.14's module: qkv, neighbourhood attention with `rpb`, proj; NHWC in and out.

  Maps smaller than kernel x dilation are zero-padded on the right and bottom before the qkv
  projection (so the padded keys are its bias, as in NATTEN) and cropped after attention.
  """

  num_heads: int
  kernel_size: int = 7
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    head_dim = c // self.num_heads
    window = self.kernel_size * self.dilation
    x = jnp.pad(x, ((0, 0), (0, max(0, window - h)), (0, max(0, window - w)), (0, 0)))
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(qkv.shape[:3] + (3, self.num_heads, head_dim))
    rpb = self.param('rpb', nn.initializers.truncated_normal(0.02),
                     (self.num_heads, 2 * self.kernel_size - 1, 2 * self.kernel_size - 1))
    y = neighborhood_attention(qkv[..., 0, :, :] * head_dim**-0.5, qkv[..., 1, :, :],
                               qkv[..., 2, :, :], rpb, self.dilation)
    y = y[:, :h, :w].reshape(b, h, w, c)
    return nn.Dense(c, dtype=self.dtype, name='proj')(y)
