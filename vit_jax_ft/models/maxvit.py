"""MaxViT equal to timm's `MaxxVit` in its TensorFlow-port configs (`maxvit_*_tf_*`), timm's names.

Tree (timm's state-dict names with '.' as '/', indices as `_N`): `stem/{conv1,norm1,conv2}`,
`stages_S/blocks_B/conv/{shortcut/expand, pre_norm, conv1_1x1, norm1, conv2_kxk, norm2,
se/{fc1,fc2}, conv3_1x1}`, `stages_S/blocks_B/{attn_block,attn_grid}/{norm1, attn/{qkv,
rel_pos/relative_position_bias_table, proj}, norm2, mlp/{fc1,fc2}}`, `head/{norm,
pre_logits/fc, fc}`; BatchNorm statistics in `batch_stats` under the same paths. As timm's
'tf' configs: TensorFlow 'SAME' padding, BatchNorm eps 1e-3, LayerNorm eps 1e-5, tanh GELU,
an MBConv (pre-norm, 1x1 expansion to 4x the output width, strided depthwise 3x3,
squeeze-excitation, 1x1 projection; average-pool + 1x1 shortcut where the shape changes),
then window (block) attention and grid attention over partitions of image_size / 32, each
with a TensorFlow-style relative position bias indexed by (key - query), 32 channels per
head, and the head: average pool, LayerNorm, tanh pre-logits, classifier.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vit_jax_ft.models import swin

Dtype = Any
# timm's `_tf_cfg`: BatchNorm eps of the TensorFlow models, PyTorch's momentum 0.1 (Flax: 0.9).
BATCH_NORM_EPS = 1e-3
BATCH_NORM_MOMENTUM = 0.9
LAYER_NORM_EPS = 1e-5
# The partitions (window and grid) are image_size // PARTITION_RATIO on a side.
PARTITION_RATIO = 32
# MBConv: expansion of the output width; squeeze-excitation width as a fraction of the output.
EXPAND_RATIO = 4
SE_RATIO = 0.25


def make_divisible(value: float, divisor: int = 8) -> int:
  """timm's `make_divisible`: the nearest multiple of `divisor`, never below 90% of `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def relative_position_bias(table, window: Tuple[int, int]):
  """(heads, N, N) bias of a window of N positions from a (heads, 2h - 1, 2w - 1) table.

  The TensorFlow layout: the entry of query (i, j) and key (x, y) is at row x - i + h - 1,
  column y - j + w - 1.
  """
  rows = np.arange(window[0])[None, :] - np.arange(window[0])[:, None] + window[0] - 1
  cols = np.arange(window[1])[None, :] - np.arange(window[1])[:, None] + window[1] - 1
  bias = table[:, rows[:, None, :, None], cols[None, :, None, :]]  # (heads, i, j, x, y)
  n = window[0] * window[1]
  return bias.reshape(table.shape[0], n, n)


def grid_partition(x, grid: Tuple[int, int]):
  """(B, H, W, C) -> (B * H/gh * W/gw, gh, gw, C): each group strided H/gh, W/gw apart."""
  b, h, w, c = x.shape
  x = x.reshape(b, grid[0], h // grid[0], grid[1], w // grid[1], c)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(-1, grid[0], grid[1], c)


def grid_unpartition(groups, grid: Tuple[int, int], h: int, w: int):
  """Inverse of `grid_partition` for maps of size (h, w)."""
  c = groups.shape[-1]
  x = groups.reshape(-1, h // grid[0], w // grid[1], grid[0], grid[1], c)
  return x.transpose(0, 3, 1, 4, 2, 5).reshape(-1, h, w, c)


def resize_relative_position_bias(table: np.ndarray, window: Tuple[int, int]) -> np.ndarray:
  """A (heads, 2h - 1, 2w - 1) table of a square partition resized to `window`, as timm does.

  timm resizes these tables with the same interpolation as Swin's (flat) tables.
  """
  heads, rows, cols = table.shape
  flat = np.moveaxis(np.asarray(table), 0, -1).reshape(rows * cols, heads)
  resized = swin.resize_relative_position_bias(flat, window)
  return np.moveaxis(resized.reshape(2 * window[0] - 1, 2 * window[1] - 1, heads), -1, 0)


def batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm as the TensorFlow MaxViT: eps 1e-3, statistics in `batch_stats`."""
  return nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
                      epsilon=BATCH_NORM_EPS, dtype=dtype, name=name)


class DropPath(nn.Module):
  """Stochastic depth: the whole residual branch of a sample dropped with probability `rate`."""

  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not self.rate or not train:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)


class Stem(nn.Module):
  """3x3 stride-2 conv, BatchNorm + GELU, 3x3 conv; 'SAME' padding, with biases."""

  width: int
  train: bool
  dtype: Dtype = jnp.float32
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), (2, 2), padding='SAME', dtype=self.dtype, name='conv1')(x)
    x = nn.gelu(batch_norm(self.train and not self.frozen_batch_norm, self.dtype, 'norm1')(x),
                approximate=True)
    return nn.Conv(self.width, (3, 3), padding='SAME', dtype=self.dtype, name='conv2')(x)


class Downsample(nn.Module):
  """The shortcut of a strided MBConv: 2x2 average pool ('SAME'), 1x1 conv if widths differ."""

  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(x, (2, 2), (2, 2), padding='SAME')  # Zero padding counted, as timm's.
    if x.shape[-1] != self.out_dim:
      x = nn.Conv(self.out_dim, (1, 1), dtype=self.dtype, name='expand')(x)
    return x


class SqueezeExcite(nn.Module):
  """Global average, 1x1 conv to `width`, SiLU, 1x1 conv back, sigmoid gate."""

  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(nn.Conv(self.width, (1, 1), dtype=self.dtype, name='fc1')(s))
    s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name='fc2')(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """Pre-norm inverted bottleneck; the depthwise 3x3 carries the stride."""

  out_dim: int
  stride: int
  train: bool
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    norm_train = self.train and not self.frozen_batch_norm
    mid = make_divisible(self.out_dim * EXPAND_RATIO)
    shortcut = Downsample(self.out_dim, self.dtype, name='shortcut')(x) if self.stride > 1 else x
    y = batch_norm(norm_train, self.dtype, 'pre_norm')(x)
    y = nn.Conv(mid, (1, 1), use_bias=False, dtype=self.dtype, name='conv1_1x1')(y)
    y = nn.gelu(batch_norm(norm_train, self.dtype, 'norm1')(y), approximate=True)
    y = nn.Conv(mid, (3, 3), (self.stride,) * 2, padding='SAME', feature_group_count=mid,
                use_bias=False, dtype=self.dtype, name='conv2_kxk')(y)
    y = nn.gelu(batch_norm(norm_train, self.dtype, 'norm2')(y), approximate=True)
    y = SqueezeExcite(int(SE_RATIO * self.out_dim), self.dtype, name='se')(y)
    y = nn.Conv(self.out_dim, (1, 1), dtype=self.dtype, name='conv3_1x1')(y)
    return DropPath(self.drop_path)(y, self.train) + shortcut


class RelPosBiasTf(nn.Module):
  """The learned (heads, 2h - 1, 2w - 1) table of timm's `RelPosBiasTf`."""

  num_heads: int
  window: Tuple[int, int]

  @nn.compact
  def __call__(self):
    table = self.param('relative_position_bias_table', nn.initializers.normal(0.02),
                       (self.num_heads, 2 * self.window[0] - 1, 2 * self.window[1] - 1))
    return relative_position_bias(table, self.window)


class Attention(nn.Module):
  """Multi-head self-attention within each partition, heads interleaved as TensorFlow's."""

  head_dim: int
  window: Tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    heads = c // self.head_dim
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, heads, self.head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.head_dim**-0.5, qkv[1], qkv[2]
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k)
    bias = RelPosBiasTf(heads, self.window, name='rel_pos')()
    weights = nn.softmax((logits + bias.astype(logits.dtype)).astype(jnp.float32))
    out = jnp.einsum('bhqk,bhkd->bqhd', weights.astype(v.dtype), v).reshape(b, n, c)
    return nn.Dense(c, dtype=self.dtype, name='proj')(out)


class PartitionAttention(nn.Module):
  """Attention over windows (`grid=False`) or strided grids, then the MLP; pre-norm residuals."""

  grid: bool
  partition: Tuple[int, int]
  head_dim: int
  train: bool
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    split, merge = ((grid_partition, grid_unpartition) if self.grid
                    else (swin.partition, swin.unpartition))
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm1')(x)
    y = split(y, self.partition).reshape(-1, self.partition[0] * self.partition[1], c)
    y = Attention(self.head_dim, self.partition, self.dtype, name='attn')(y)
    y = merge(y.reshape(-1, *self.partition, c), self.partition, h, w)
    x = x + DropPath(self.drop_path)(y, self.train)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm2')(x)
    y = swin.Mlp(EXPAND_RATIO * c, self.dtype, approximate_gelu=True, name='mlp')(y)
    return x + DropPath(self.drop_path)(y, self.train)


class MaxVitBlock(nn.Module):
  """MBConv, then block (window) attention, then grid attention."""

  out_dim: int
  stride: int
  partition: Tuple[int, int]
  head_dim: int
  train: bool
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    x = MBConv(self.out_dim, self.stride, self.train, self.drop_path, self.dtype,
               self.frozen_batch_norm, name='conv')(x)
    for grid, name in ((False, 'attn_block'), (True, 'attn_grid')):
      x = PartitionAttention(grid, self.partition, self.head_dim, self.train, self.drop_path,
                             self.dtype, name=name)(x)
    return x


class Stage(nn.Module):
  """`depth` MaxViT blocks, the first one strided."""

  out_dim: int
  depth: int
  partition: Tuple[int, int]
  head_dim: int
  train: bool
  drop_paths: Sequence[float]
  dtype: Dtype = jnp.float32
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    for block in range(self.depth):
      x = MaxVitBlock(self.out_dim, 1 if block else 2, self.partition, self.head_dim,
                      self.train, self.drop_paths[block], self.dtype, self.frozen_batch_norm,
                      name=f'blocks_{block}')(x)
    return x


class Head(nn.Module):
  """timm's `NormMlpClassifierHead`: average pool, LayerNorm, tanh pre-logits, classifier."""

  num_classes: int
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(
        jnp.mean(x, axis=(1, 2)))
    x = PreLogits(self.hidden_size, self.dtype, name='pre_logits')(x)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='fc')(x)
    return x


class PreLogits(nn.Module):
  """Dense `fc` then tanh."""

  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(self.hidden_size, dtype=self.dtype, name='fc')(x))


class MaxVit(nn.Module):
  """timm's MaxViT ('tf' configs); with `num_classes=0` it returns the tanh pre-logits."""

  num_classes: int
  embed_dim: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 5, 2)
  stem_width: int = 64
  head_hidden_size: int = 512
  head_dim: int = 32
  # Window and grid side; None: image_size // 32 (timm's partition_ratio).
  partition_size: Optional[int] = None
  drop_path_rate: float = 0.0  # Stochastic depth, rising linearly over the blocks from 0 (timm).
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  # BatchNorm normalises with the stored statistics even when training, and keeps them.
  frozen_batch_norm: bool = False
  model_name: Optional[str] = None

  def partition(self, image: Tuple[int, int]) -> Tuple[int, int]:
    """The window (and grid) size for images of size `image`."""
    if self.partition_size:
      return (self.partition_size,) * 2
    return (image[0] // PARTITION_RATIO, image[1] // PARTITION_RATIO)

  def check_size(self, image: Tuple[int, int]) -> None:
    """A clear error before compiling when a stage's map is not a whole number of partitions."""
    partition = self.partition(image)
    size = image
    for stage in range(len(self.depths) + 1):  # The stem halves the size, then each stage.
      size = tuple(-(-s // 2) for s in size)
      if stage and (min(partition) < 1 or size[0] % partition[0] or size[1] % partition[1]):
        raise ValueError(
            f'{self.model_name}: image size {image} gives a {size} map in stage {stage - 1}, '
            f'not a whole number of {partition} partitions (image_size // {PARTITION_RATIO}); '
            f'set pp.crop to a multiple of {PARTITION_RATIO}, e.g. 224 or 384.')

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self.check_size(images.shape[1:3])
    partition = self.partition(images.shape[1:3])
    x = Stem(self.stem_width, train, self.dtype, self.frozen_batch_norm, name='stem')(
        images.astype(self.dtype))
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    for stage, (depth, width) in enumerate(zip(self.depths, self.embed_dim)):
      start = sum(self.depths[:stage])
      x = Stage(width, depth, partition, self.head_dim, train, tuple(rates[start:start + depth]),
                self.dtype, self.frozen_batch_norm, name=f'stages_{stage}')(x)
    x = Head(self.num_classes, self.head_hidden_size, self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def is_params_tree(params: Mapping[str, Any]) -> bool:
  """Whether `params` is this module's tree (to write back in timm's layout)."""
  return 'stages_0' in params and 'conv1' in params.get('stem', {})


def is_timm_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are timm's MaxViT layout."""
  return any('.attn_grid.attn.rel_pos.' in k for k in state_dict) and any(
      k.startswith('stem.conv1.') for k in state_dict)


# timm's BatchNorm statistics <-> the Flax `batch_stats` leaves.
_STATS = {'running_mean': 'mean', 'running_var': 'var'}


def from_timm(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """timm's MaxViT state dict (numpy arrays) -> `{'params': ..., 'batch_stats': ...}`."""
  params, stats = {}, {}
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    path = re.sub(r'\.(\d+)\.', r'_\1.', key).split('.')
    value, leaf, path = np.asarray(value), path[-1], tuple(path[:-1])
    if leaf in _STATS:
      stats[path + (_STATS[leaf],)] = value
    elif leaf == 'weight' and value.ndim == 4:  # Conv (out, in, h, w) -> (h, w, in, out).
      params[path + ('kernel',)] = value.transpose(2, 3, 1, 0)
    elif leaf == 'weight' and value.ndim == 2:  # Linear (out, in) -> (in, out).
      params[path + ('kernel',)] = value.T
    else:  # Norm weight -> scale; biases and bias tables as they are.
      params[path + ('scale' if leaf == 'weight' else leaf,)] = value
  return {'params': traverse_util.unflatten_dict(params),
          'batch_stats': traverse_util.unflatten_dict(stats)}


def to_timm(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """`{'params', 'batch_stats'}` -> timm's MaxViT state dict (the inverse of `from_timm`).

  Each BatchNorm gets `num_batches_tracked` 0, so that timm loads the file strictly.
  """
  out = {}
  named = lambda path: re.sub(r'(stages|blocks)_(\d+)', r'\1.\2', '.'.join(path))  # noqa: E731
  for path, value in traverse_util.flatten_dict(dict(variables['params'])).items():
    value, leaf, prefix = np.asarray(value), path[-1], named(path[:-1])
    if leaf == 'kernel' and value.ndim == 4:
      out[f'{prefix}.weight'] = value.transpose(3, 2, 0, 1)
    elif leaf == 'kernel':
      out[f'{prefix}.weight'] = value.T
    else:
      out[f'{prefix}.{"weight" if leaf == "scale" else leaf}'] = value
  inverse = {v: k for k, v in _STATS.items()}
  for path, value in traverse_util.flatten_dict(dict(variables.get('batch_stats', {}))).items():
    prefix = named(path[:-1])
    out[f'{prefix}.{inverse[path[-1]]}'] = np.asarray(value)
    out[f'{prefix}.num_batches_tracked'] = np.zeros((), np.int64)
  return out
