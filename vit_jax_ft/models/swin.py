"""Swin Transformer (v1) equal to timm's `SwinTransformer`, with timm's parameter names.

Tree (timm's state-dict names with '.' as '/', indices as `_N`): `patch_embed/{proj,norm}`,
`layers_S/downsample/{norm,reduction}` (stages 1-3), `layers_S/blocks_B/{norm1, attn/{qkv,
proj, relative_position_bias_table}, norm2, mlp/{fc1,fc2}}`, `norm`, `head/fc`. As timm:
LayerNorm eps 1e-5, exact (erf) GELU, a learned relative position bias per head indexed by
the offset between two positions of a window, shifted windows masked with -100, the window
clamped to the feature map (and no shift) where a stage is no larger than it, zero padding
to a multiple of the window, patch merging of the 2x2 neighbourhood, average pooling.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Dtype = Any
# timm's LayerNorm epsilon (PyTorch's default).
LAYER_NORM_EPS = 1e-5
# What timm adds to the logits of position pairs from different regions of a shifted window.
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window: Tuple[int, int]) -> np.ndarray:
  """(N, N) row of the bias table for each (query, key) pair of a window of N positions."""
  coords = np.stack(np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing='ij'))
  coords = coords.reshape(2, -1)
  offsets = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  offsets = offsets + np.array([window[0] - 1, window[1] - 1])
  return offsets[..., 0] * (2 * window[1] - 1) + offsets[..., 1]


def window_and_shift(resolution: Tuple[int, int], window: int, shift: int
                     ) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """timm's clamp: a side no larger than the window is one window, unshifted."""
  windows = tuple(r if r <= window else window for r in resolution)
  shifts = tuple(0 if r <= w else shift for r, w in zip(resolution, windows))
  return windows, shifts


def shift_mask(padded: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int]
               ) -> np.ndarray:
  """(windows, N, N): 0 within a region of the rolled map, SHIFT_MASK_VALUE across regions."""
  regions = np.zeros(padded, np.int32)
  count = 0
  for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
    for cols in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
      regions[rows[0]:rows[1], cols[0]:cols[1]] = count
      count += 1
  windows = partition(regions[None, ..., None], window)[..., 0]
  windows = windows.reshape(windows.shape[0], -1)
  return np.where(windows[:, None, :] != windows[:, :, None], SHIFT_MASK_VALUE, 0.0)


def partition(x, window: Tuple[int, int]):
  """(B, H, W, C) -> (B * windows, wh, ww, C), windows in row-major order per image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window[0], window[1], c)


def unpartition(windows, window: Tuple[int, int], h: int, w: int):
  """Inverse of `partition` for maps of size (h, w)."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window[0], w // window[1], window[0], window[1], c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _source_offsets(source: int, target: int) -> np.ndarray:
  """timm's (BEiT's) source positions: spaced by a geometric progression that spans `target`."""
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    ratio = (left + right) / 2.0
    if (1.0 - ratio**(source // 2)) / (1.0 - ratio) > target // 2:
      right = ratio
    else:
      left = ratio
  distances = np.cumsum([1.0] + [ratio**(i + 1) for i in range(source // 2 - 1)])
  return np.concatenate([-distances[::-1], [0.0], distances])


def resize_relative_position_bias(table: np.ndarray, window: Tuple[int, int]) -> np.ndarray:
  """A (positions, heads) bias table of a square window resized to `window`, as timm does.

  The old offsets are spread by a geometric progression over the new range, then each head's
  grid is interpolated linearly (clamped at the edges) at the new integer offsets.
  """
  side = int(round(np.sqrt(table.shape[0])))
  new = (2 * window[0] - 1, 2 * window[1] - 1)
  if side * side != table.shape[0]:
    raise ValueError(f'A relative position bias table of {table.shape[0]} positions is not '
                     'from a square window; it cannot be resized.')
  if (side, side) == new:
    return table
  rows, cols = _source_offsets(side, new[0]), _source_offsets(side, new[1])
  new_rows = np.arange(-(new[0] // 2), new[0] // 2 + 0.1)
  new_cols = np.arange(-(new[1] // 2), new[1] // 2 + 0.1)
  heads = []
  for grid in np.moveaxis(np.asarray(table, np.float64).reshape(side, side, -1), -1, 0):
    along_cols = np.stack([np.interp(new_cols, cols, row) for row in grid])
    heads.append(np.stack([np.interp(new_rows, rows, col) for col in along_cols.T], axis=1))
  return np.stack(heads, axis=-1).reshape(new[0] * new[1], -1).astype(table.dtype)


class WindowAttention(nn.Module):
  """Multi-head self-attention within each window, with (Swin) or without (DaViT) the bias."""

  num_heads: int
  window: Tuple[int, int]
  dtype: Dtype = jnp.float32
  relative_position_bias: bool = True

  @nn.compact
  def __call__(self, x, mask: Optional[np.ndarray]):
    n_windows, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(n_windows, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * head_dim**-0.5, qkv[1], qkv[2]
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k)
    if self.relative_position_bias:
      table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                         ((2 * self.window[0] - 1) * (2 * self.window[1] - 1), self.num_heads))
      bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, -1)
      logits = logits + bias.transpose(2, 0, 1).astype(logits.dtype)
    if mask is not None:
      logits = logits.reshape(-1, mask.shape[0], self.num_heads, n, n)
      logits = (logits + jnp.asarray(mask, logits.dtype)[None, :, None]).reshape(
          -1, self.num_heads, n, n)
    weights = nn.softmax(logits.astype(jnp.float32)).astype(v.dtype)
    out = jnp.einsum('bhqk,bhkd->bqhd', weights, v).reshape(n_windows, n, c)
    return nn.Dense(c, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """timm's Mlp: fc1, GELU (exact; tanh for the TensorFlow ports), fc2."""

  hidden: int
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x),
                approximate=self.approximate_gelu)
    return nn.Dense(width, dtype=self.dtype, name='fc2')(x)


class SwinBlock(nn.Module):
  """(Shifted) window attention then the MLP, each pre-norm with a residual; NHWC in and out."""

  num_heads: int
  window: int
  shift: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    window, shift = window_and_shift((h, w), self.window, self.shift)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm1')(x)
    if any(shift):
      y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
    padded = (-(-h // window[0]) * window[0], -(-w // window[1]) * window[1])
    y = jnp.pad(y, ((0, 0), (0, padded[0] - h), (0, padded[1] - w), (0, 0)))
    mask = shift_mask(padded, window, shift) if any(shift) else None
    windows = partition(y, window).reshape(-1, window[0] * window[1], c)
    windows = WindowAttention(self.num_heads, window, self.dtype, name='attn')(windows, mask)
    y = unpartition(windows.reshape(-1, window[0], window[1], c), window, *padded)[:, :h, :w]
    if any(shift):
      y = jnp.roll(y, shift, axis=(1, 2))
    x = x + y
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm2')(x)
    return x + Mlp(int(c * self.mlp_ratio), self.dtype, name='mlp')(y)


class PatchMerging(nn.Module):
  """Each 2x2 neighbourhood (zero-padded to even sides) concatenated, normalised, projected."""

  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # timm's order of the four: (0, 0), (1, 0), (0, 1), (1, 1) as (row, column) offsets.
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                         x[:, 1::2, 1::2]], axis=-1)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)
    return nn.Dense(self.out_dim, use_bias=False, dtype=self.dtype, name='reduction')(x)


class PatchEmbed(nn.Module):
  """Non-overlapping patches projected by a convolution, then LayerNorm."""

  embed_dim: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    patch = (self.patch_size, self.patch_size)
    x = nn.Conv(self.embed_dim, patch, strides=patch, padding='VALID', dtype=self.dtype,
                name='proj')(images)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)


class SwinStage(nn.Module):
  """Patch merging first (stages 1-3, as timm lays them out), then the blocks."""

  out_dim: int
  depth: int
  num_heads: int
  window_size: int
  downsample: bool
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.downsample:
      x = PatchMerging(self.out_dim, self.dtype, name='downsample')(x)
    for i in range(self.depth):
      shift = 0 if i % 2 == 0 else self.window_size // 2
      x = SwinBlock(self.num_heads, self.window_size, shift, self.mlp_ratio, self.dtype,
                    name=f'blocks_{i}')(x)
    return x


class ClassifierHead(nn.Module):
  """timm's head: the classifier `fc` (pooling happens before)."""

  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='fc')(x)


class SwinTransformer(nn.Module):
  """timm's Swin Transformer v1; with `num_classes=0` it returns the pooled features."""

  num_classes: int
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # Dropout and stochastic depth are not ported: fine-tuning runs without them.
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f'{self.model_name}: image size {images.shape[1:3]} must be a multiple '
                       f'of the {self.patch_size} px patches; set pp.crop accordingly.')
    x = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name='patch_embed')(
        images.astype(self.dtype))
    for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      x = SwinStage(self.embed_dim * 2**stage, depth, heads, self.window_size, stage > 0,
                    self.mlp_ratio, self.dtype, name=f'layers_{stage}')(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = ClassifierHead(self.num_classes, self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def flax_leaf(name: str, value: np.ndarray) -> Tuple[str, np.ndarray]:
  """A PyTorch leaf as Flax holds it: conv and linear weights transposed, norm weights `scale`."""
  if name != 'weight':
    return name, value
  if value.ndim == 4:  # Conv (out, in / groups, h, w) -> (h, w, in / groups, out).
    return 'kernel', value.transpose(2, 3, 1, 0)
  if value.ndim == 2:  # Linear (out, in) -> (in, out).
    return 'kernel', value.T
  return 'scale', value  # LayerNorm.


def torch_leaf(name: str, value: np.ndarray) -> Tuple[str, np.ndarray]:
  """The inverse of `flax_leaf`: a Flax leaf as PyTorch holds it."""
  if name == 'kernel':
    return 'weight', value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return ('weight' if name == 'scale' else name), value


def is_timm_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are timm's Swin layout."""
  return any(k.endswith('attn.relative_position_bias_table') for k in state_dict) and any(
      k.startswith('patch_embed.proj.') for k in state_dict)


def from_timm(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """timm's Swin state dict (numpy arrays) -> this module's params tree."""
  flat = {}
  for key, value in state_dict.items():
    if key.endswith(('relative_position_index', 'attn_mask')):
      continue  # Buffers that timm recomputes; so does this module.
    *path, leaf = re.sub(r'\.(\d+)\.', r'_\1.', key).split('.')
    leaf, value = flax_leaf(leaf, np.asarray(value))
    flat[(*path, leaf)] = value
  return traverse_util.unflatten_dict(flat)


def is_params_tree(params: Mapping[str, Any]) -> bool:
  """Whether `params` is this module's tree (to write back in timm's layout)."""
  return 'patch_embed' in params and 'layers_0' in params


def to_timm(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """This module's params tree -> timm's Swin state dict (the inverse of `from_timm`)."""
  state = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    value = np.asarray(value)
    *modules, leaf = (re.sub(r'_(\d+)$', r'.\1', name) for name in path)
    if leaf == 'kernel':  # Conv (h, w, in, out) -> (out, in, h, w); Linear (in, out) -> (out, in).
      leaf, value = 'weight', value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    elif leaf == 'scale':
      leaf = 'weight'
    state['.'.join(modules + [leaf])] = np.ascontiguousarray(value)
  return state
