"""NAT and DiNAT, the Neighborhood Attention Transformers, with the authors' parameter names.

As SHI-Labs/Neighborhood-Attention-Transformer (classification/nat.py, dinat.py) with NATTEN
0.14: a tokenizer of two 3x3 stride-2 convolutions (no activation between) and LayerNorm;
levels of pre-norm blocks (neighbourhood attention, MLP; layer scale where the variant has it),
each level but the last ending in a 3x3 stride-2 convolution (no bias) doubling the width, then
LayerNorm; a final LayerNorm, average pooling and the head. LayerNorm eps 1e-5, exact GELU.
DiNAT is NAT with a dilation per block. Tree (the authors' state-dict names with '.' as '/',
indices as `_N`): `patch_embed/{proj_0, proj_1, norm}`, `levels_L/blocks_B/{norm1, attn/{qkv,
rpb, proj}, norm2, mlp/{fc1, fc2}, gamma1, gamma2}`, `levels_L/downsample/{reduction, norm}`,
`norm`, `head`.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vit_jax_ft.models.neighborhood_attention import NeighborhoodAttention2D
from vit_jax_ft.models.swin import Mlp

Dtype = Any
# PyTorch's LayerNorm epsilon, which the authors' models use.
LAYER_NORM_EPS = 1e-5


class NATLayer(nn.Module):
  """Neighbourhood attention then the MLP, each pre-norm with a residual; NHWC in and out."""

  num_heads: int
  kernel_size: int = 7
  dilation: int = 1
  mlp_ratio: float = 4.0
  layer_scale: Optional[float] = None  # Initial value of gamma1/gamma2; None: no layer scale.
  dtype: Dtype = jnp.float32

  def _scaled(self, name: str, y):
    """`y` times the learned per-channel layer scale `name`, where the variant has one."""
    if self.layer_scale is None:
      return y
    gamma = self.param(name, nn.initializers.constant(self.layer_scale), (y.shape[-1],))
    return gamma.astype(y.dtype) * y

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm1')(x)
    y = NeighborhoodAttention2D(self.num_heads, self.kernel_size, self.dilation, self.dtype,
                                name='attn')(y)
    x = x + self._scaled('gamma1', y)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name='mlp')(y)
    return x + self._scaled('gamma2', y)


def _conv3x3_stride2(features: int, use_bias: bool, dtype: Dtype, name: str) -> nn.Conv:
  """PyTorch's Conv2d(kernel 3, stride 2, padding 1)."""
  return nn.Conv(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                 use_bias=use_bias, dtype=dtype, name=name)


class ConvTokenizer(nn.Module):
  """Two 3x3 stride-2 convolutions (width/2, then width), then LayerNorm: 4x downsampling."""

  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = _conv3x3_stride2(self.embed_dim // 2, True, self.dtype, 'proj_0')(images)
    x = _conv3x3_stride2(self.embed_dim, True, self.dtype, 'proj_1')(x)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)


class ConvDownsampler(nn.Module):
  """A 3x3 stride-2 convolution without bias doubling the width, then LayerNorm."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv3x3_stride2(2 * x.shape[-1], False, self.dtype, 'reduction')(x)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)


class NATLevel(nn.Module):
  """The blocks of one level, then (all levels but the last) the downsampler."""

  num_heads: int
  dilations: Sequence[int]
  kernel_size: int
  downsample: bool
  mlp_ratio: float
  layer_scale: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, dilation in enumerate(self.dilations):
      x = NATLayer(self.num_heads, self.kernel_size, dilation, self.mlp_ratio, self.layer_scale,
                   self.dtype, name=f'blocks_{i}')(x)
    if self.downsample:
      x = ConvDownsampler(self.dtype, name='downsample')(x)
    return x


class NAT(nn.Module):
  """The authors' NAT, DiNAT with `dilations`; `num_classes=0` returns the pooled features."""

  num_classes: int
  embed_dim: int = 64
  depths: Sequence[int] = (3, 4, 6, 5)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  mlp_ratio: float = 3.0
  kernel_size: int = 7
  # Per level, the dilation of each block (DiNAT); None: all 1 (NAT).
  dilations: Optional[Sequence[Sequence[int]]] = None
  layer_scale: Optional[float] = None
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # Dropout and stochastic depth are not ported: fine-tuning runs without them.
    dilations = self.dilations or [(1,) * depth for depth in self.depths]
    if [len(d) for d in dilations] != list(self.depths):
      raise ValueError(f'{self.model_name}: dilations {dilations} must give one dilation per '
                       f'block of depths {tuple(self.depths)}.')
    x = ConvTokenizer(self.embed_dim, self.dtype, name='patch_embed')(images.astype(self.dtype))
    for level, (heads, level_dilations) in enumerate(zip(self.num_heads, dilations)):
      x = NATLevel(heads, tuple(level_dilations), self.kernel_size,
                   level < len(self.depths) - 1, self.mlp_ratio, self.layer_scale, self.dtype,
                   name=f'levels_{level}')(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='head')(x)
    return x.astype(jnp.float32)


def is_authors_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are the authors' NAT/DiNAT layout."""
  return any(k.endswith('.attn.rpb') for k in state_dict) and any(
      k.startswith('levels.') for k in state_dict)


def from_authors(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """The authors' NAT/DiNAT state dict (numpy arrays) -> this module's params tree."""
  flat = {}
  for key, value in state_dict.items():
    path = re.sub(r'\.(\d+)(?=\.)', r'_\1', key).split('.')
    value = np.asarray(value)
    if path[-1] == 'weight':
      if value.ndim == 4:  # Conv (out, in, h, w) -> (h, w, in, out).
        path[-1], value = 'kernel', value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:  # Linear (out, in) -> (in, out).
        path[-1], value = 'kernel', value.T
      else:  # LayerNorm.
        path[-1] = 'scale'
    flat[tuple(path)] = value
  return traverse_util.unflatten_dict(flat)
