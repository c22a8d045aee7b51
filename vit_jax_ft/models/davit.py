"""DaViT (Dual Attention Vision Transformer) equal to timm's `DaVit`, with timm's parameter names.

Tree (timm's state-dict names with '.' as '/', indices as `_N`): `stem/{conv,norm}`,
`stages_S/downsample/{norm,conv}` (stages 1-3), `stages_S/blocks_B/{spatial_block,
channel_block}/{cpe1/proj, norm1, attn/{qkv,proj}, cpe2/proj, norm2, mlp/{fc1,fc2}}` (timm's
`blocks.B.0` and `blocks.B.1`), `norm` (timm's `head.norm`: outside `head` so that fine-tuning
restarts only the classifier), `head/fc`. As timm: a 7x7 stride-4 stem on the input padded
right/bottom to a multiple of 4, then LayerNorm; LayerNorm then a 2x2 stride-2 convolution
(odd maps padded right/bottom) between stages; each block a depthwise 3x3 position encoding
added before its attention and before its MLP; window attention without a position bias, on
maps zero-padded to a multiple of the window (never clamped); channel attention over the
head_dim x head_dim channel pairs; LayerNorm eps 1e-5, exact (erf) GELU; average pool, norm,
classifier. No parameter depends on the resolution.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vit_jax_ft.models.swin import (LAYER_NORM_EPS, ClassifierHead, Mlp, WindowAttention,
                                    flax_leaf, partition, torch_leaf, unpartition)

Dtype = Any
# timm's `blocks.B.I` index I -> the attention kind of that half of the dual block.
_HALVES = ('spatial_block', 'channel_block')


def drop_path_rates(rate: float, depths: Sequence[int]) -> List[List[float]]:
  """timm's stochastic depth schedule: linear from 0 to `rate` over all blocks, per stage."""
  rates = np.linspace(0.0, rate, sum(depths)).tolist()
  starts = np.cumsum([0, *depths])
  return [rates[a:b] for a, b in zip(starts[:-1], starts[1:])]


def drop_path(rate: float, x, train: bool):
  """Stochastic depth: the whole residual branch of a sample dropped, the rest rescaled."""
  return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=not train)


class ConvPosEnc(nn.Module):
  """A depthwise 3x3 convolution of the map added to it (timm's ConvPosEnc, no activation)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    return x + nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=c,
                       dtype=self.dtype, name='proj')(x)


class ChannelAttention(nn.Module):
  """timm's ChannelAttention: per head, the channels attend to the channels.

  The logits are scaled keys against values (head_dim^-0.5, summed over positions), the
  softmax runs over the value channels, and the weights mix the query channels.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1] * head_dim**-0.5, qkv[:, :, 2]
    logits = jnp.einsum('bnhi,bnhj->bhij', k, v)
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum('bhij,bnhj->bnhi', weights, q).reshape(b, n, c)
    return nn.Dense(c, dtype=self.dtype, name='proj')(out)


class SpatialBlock(nn.Module):
  """Position encoding, window attention, position encoding, MLP; NHWC in and out."""

  num_heads: int
  window: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h, w, c = x.shape[1:]
    window = (self.window, self.window)
    x = ConvPosEnc(self.dtype, name='cpe1')(x)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm1')(x)
    padded = (-(-h // window[0]) * window[0], -(-w // window[1]) * window[1])
    y = jnp.pad(y, ((0, 0), (0, padded[0] - h), (0, padded[1] - w), (0, 0)))
    windows = partition(y, window).reshape(-1, window[0] * window[1], c)
    windows = WindowAttention(self.num_heads, window, self.dtype, relative_position_bias=False,
                              name='attn')(windows, None)
    y = unpartition(windows.reshape(-1, *window, c), window, *padded)[:, :h, :w]
    x = ConvPosEnc(self.dtype, name='cpe2')(x + drop_path(self.drop_path, y, train))
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name='mlp')(y)
    return x + drop_path(self.drop_path, y, train)


class ChannelBlock(nn.Module):
  """Position encoding, channel attention, position encoding, MLP; NHWC in and out."""

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, h, w, c = x.shape
    x = ConvPosEnc(self.dtype, name='cpe1')(x)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm1')(x)
    y = ChannelAttention(self.num_heads, self.dtype, name='attn')(y.reshape(b, h * w, c))
    x = x + drop_path(self.drop_path, y.reshape(b, h, w, c), train)
    x = ConvPosEnc(self.dtype, name='cpe2')(x)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name='mlp')(y)
    return x + drop_path(self.drop_path, y, train)


class DualAttentionBlock(nn.Module):
  """A spatial block then a channel block, with the same stochastic depth rate."""

  num_heads: int
  window: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = SpatialBlock(self.num_heads, self.window, self.mlp_ratio, self.drop_path, self.dtype,
                     name=_HALVES[0])(x, train)
    return ChannelBlock(self.num_heads, self.mlp_ratio, self.drop_path, self.dtype,
                        name=_HALVES[1])(x, train)


class Stem(nn.Module):
  """7x7 stride-4 convolution (input padded right/bottom to a multiple of 4), LayerNorm."""

  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    h, w = images.shape[1:3]
    padding = ((3, 3 + -h % 4), (3, 3 + -w % 4))
    x = nn.Conv(self.out_dim, (7, 7), strides=(4, 4), padding=padding, dtype=self.dtype,
                name='conv')(images)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)


class Downsample(nn.Module):
  """LayerNorm, then a 2x2 stride-2 convolution (odd maps padded right/bottom)."""

  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1:3]
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)
    return nn.Conv(self.out_dim, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)),
                   dtype=self.dtype, name='conv')(x)


class DaVitStage(nn.Module):
  """The downsample first (stages 1-3, as timm lays them out), then the dual blocks."""

  out_dim: int
  num_heads: int
  window_size: int
  drop_paths: Sequence[float]
  downsample: bool
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.downsample:
      x = Downsample(self.out_dim, self.dtype, name='downsample')(x)
    for i, rate in enumerate(self.drop_paths):
      x = DualAttentionBlock(self.num_heads, self.window_size, self.mlp_ratio, rate, self.dtype,
                             name=f'blocks_{i}')(x, train)
    return x


class DaVit(nn.Module):
  """timm's DaViT; with `num_classes=0` it returns the pooled, normalised features."""

  num_classes: int
  embed_dims: Sequence[int] = (96, 192, 384, 768)
  depths: Sequence[int] = (1, 1, 3, 1)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0  # Stochastic depth at the last block (timm's schedule).
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if not len(self.embed_dims) == len(self.depths) == len(self.num_heads):
      raise ValueError(f'{self.model_name}: embed_dims {self.embed_dims}, depths {self.depths} '
                       f'and num_heads {self.num_heads} must have one entry per stage.')
    x = Stem(self.embed_dims[0], self.dtype, name='stem')(images.astype(self.dtype))
    rates = drop_path_rates(self.drop_path_rate, self.depths)
    for stage, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
      x = DaVitStage(dim, heads, self.window_size, rates[stage], stage > 0, self.mlp_ratio,
                     self.dtype, name=f'stages_{stage}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)
    if self.num_classes:
      x = ClassifierHead(self.num_classes, self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def is_params_tree(params: Mapping[str, Any]) -> bool:
  """Whether `params` is this module's tree (to write back in timm's layout)."""
  return 'stages_0' in params and 'conv' in params.get('stem', {})


def is_timm_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are timm's DaViT layout."""
  return 'stem.conv.weight' in state_dict and any('.cpe1.proj.' in k for k in state_dict)


def _flax_path(key: str) -> List[str]:
  """timm's `stages.1.blocks.0.1.attn.qkv.weight` -> this module's path (leaf unrenamed)."""
  key = re.sub(r'^head\.norm\.', 'norm.', key)
  key = re.sub(r'\.blocks\.(\d+)\.([01])\.', lambda m: f'.blocks_{m[1]}.{_HALVES[int(m[2])]}.',
               key)
  return re.sub(r'^stages\.(\d+)\.', r'stages_\1.', key).split('.')


def from_timm(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """timm's DaViT state dict (numpy arrays) -> this module's params tree."""
  flat = {}
  for key, value in state_dict.items():
    *path, leaf = _flax_path(key)
    leaf, value = flax_leaf(leaf, np.asarray(value))
    flat[(*path, leaf)] = value
  return traverse_util.unflatten_dict(flat)


def to_timm(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """This module's `{'params': ...}` -> timm's DaViT state dict (the inverse of `from_timm`)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(variables['params'])).items():
    *modules, leaf = path
    leaf, value = torch_leaf(leaf, np.asarray(value))
    names = [str(_HALVES.index(m)) if m in _HALVES else re.sub(r'^(stages|blocks)_(\d+)$',
                                                                r'\1.\2', m) for m in modules]
    if names == ['norm']:
      names = ['head', 'norm']
    out['.'.join(names + [leaf])] = np.ascontiguousarray(value)
  return out
