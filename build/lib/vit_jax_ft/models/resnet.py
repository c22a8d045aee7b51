"""ResNet building blocks: the hybrid stem of `vit_jax` and BiT ResNet-v2.

The two networks differ on purpose (each follows its own official code):
- hybrid stem (`vit_jax/models_resnet.py`): post-activation bottlenecks, SAME
  padding, weight standardisation w / (std + 1e-5), GroupNorm eps 1e-6.
- BiT (`big_transfer/bit_jax`): pre-activation bottlenecks, explicit zero
  padding (also before the root max-pool), w / sqrt(var + 1e-10), GroupNorm
  eps 1e-5.
"""
from typing import Any, Callable, Optional, Sequence, Tuple, Type

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# Per-stage unit counts of the BiT depths.
BIT_BLOCK_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def standardize_std_eps(w: jnp.ndarray) -> jnp.ndarray:
  """vit_jax's weight standardisation: 1e-5 is added to the std."""
  w = w - jnp.mean(w, axis=(0, 1, 2))
  return w / (jnp.std(w, axis=(0, 1, 2)) + 1e-5)


def standardize_var_eps(w: jnp.ndarray) -> jnp.ndarray:
  """BiT's weight standardisation: 1e-10 is added to the variance."""
  w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  return w / jnp.sqrt(jnp.mean(jnp.square(w), axis=(0, 1, 2), keepdims=True) + 1e-10)


class StdConv(nn.Conv):
  """Convolution whose kernel is weight-standardised before use."""

  standardize: Callable[[jnp.ndarray], jnp.ndarray] = standardize_std_eps

  def param(self, name: str, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == 'kernel':
      value = self.standardize(value)
    return value


# ----------------------------------------------------------------------------
# Hybrid stem (vit_jax/models_resnet.py).


class ResidualUnit(nn.Module):
  """Post-activation bottleneck unit of the hybrid stem."""

  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    def conv(features, kernel, strides, name):
      return StdConv(features, kernel, strides, use_bias=False,
                     dtype=self.dtype, name=name)

    def norm(name, **kwargs):
      return nn.GroupNorm(dtype=self.dtype, name=name, **kwargs)

    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = conv(self.features * 4, (1, 1), (1, 1), 'conv3')(y)
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """A stage of `block_size` units; only the first one strides."""

  unit: Type[nn.Module]  # ResidualUnit (hybrid) or BitUnit.
  unit_name: str  # Format of the unit names: 'unit{}' (hybrid: unit1) or 'unit{:02d}' (BiT).
  block_size: int
  features: int
  first_stride: Tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.block_size):
      strides = self.first_stride if i == 0 else (1, 1)
      x = self.unit(self.features, strides, self.dtype, name=self.unit_name.format(i + 1))(x)
    return x


def hybrid_stem(x, num_layers: Sequence[int], width_factor: float, dtype: Dtype):
  """Root conv, GroupNorm, max-pool and stages of the hybrid ViTs.

  Called inside the ViT's compact `__call__`, so its parameters sit at the top
  of the ViT tree (`conv_root`, `gn_root`, `block1/unit1/...`) as released.
  """
  width = int(64 * width_factor)
  x = StdConv(width, (7, 7), (2, 2), use_bias=False, dtype=dtype,
              name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(dtype=dtype, name='gn_root')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(ResidualUnit, 'unit{}', block_size, width * 2**i,
                    (2, 2) if i else (1, 1), dtype, name=f'block{i + 1}')(x)
  return x


# ----------------------------------------------------------------------------
# BiT ResNet-v2 (big_transfer/bit_jax/models.py).


def _pad(x, kernel_size: int):
  """Zero padding of BiT: (k-1)//2 before, the rest after, on H and W."""
  total = kernel_size - 1
  return jnp.pad(x, ((0, 0), (total // 2, total - total // 2),
                     (total // 2, total - total // 2), (0, 0)))


class BitGroupNorm(nn.GroupNorm):
  """GroupNorm of BiT: 32 groups, eps 1e-5, two-pass variance."""

  epsilon: float = 1e-5
  use_fast_variance: bool = False


class BitConv(StdConv):
  """BiT's standardised convolution: no bias, VALID after explicit padding."""

  standardize: Callable[[jnp.ndarray], jnp.ndarray] = standardize_var_eps
  use_bias: bool = False
  padding: Any = 'VALID'


class BitUnit(nn.Module):
  """Pre-activation bottleneck unit of ResNet-v2."""

  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shortcut = x
    x = nn.relu(BitGroupNorm(dtype=self.dtype, name='gn1')(x))
    if shortcut.shape[-1] != self.features * 4 or self.strides != (1, 1):
      shortcut = BitConv(self.features * 4, (1, 1), self.strides,
                         dtype=self.dtype, name='conv_proj')(x)
    x = BitConv(self.features, (1, 1), dtype=self.dtype, name='conv1')(x)
    x = nn.relu(BitGroupNorm(dtype=self.dtype, name='gn2')(x))
    x = BitConv(self.features, (3, 3), self.strides, dtype=self.dtype,
                name='conv2')(_pad(x, 3))
    x = nn.relu(BitGroupNorm(dtype=self.dtype, name='gn3')(x))
    x = BitConv(self.features * 4, (1, 1), dtype=self.dtype, name='conv3')(x)
    return x + shortcut


class BitRoot(nn.Module):
  """Root of BiT: padded 7x7/2 convolution, then a zero-padded 3x3/2 max-pool."""

  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = BitConv(self.width, (7, 7), (2, 2), dtype=self.dtype,
                name='conv_root')(_pad(x, 7))
    return nn.max_pool(_pad(x, 3), (3, 3), strides=(2, 2), padding='VALID')


class BitResNet(nn.Module):
  """BiT ResNet-v2 classifier; with `num_classes=0` it returns the pooled features."""

  num_classes: int
  depth: int = 50
  width_factor: int = 1
  block_sizes: Optional[Sequence[int]] = None  # Overrides the depth's units per stage.
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  remat: bool = False  # Rematerialise each stage to trade compute for memory.
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train  # BiT has no dropout; the argument keeps one model signature.
    width = 64 * self.width_factor
    x = BitRoot(width, self.dtype, name='root_block')(x.astype(self.dtype))
    stage = nn.remat(ResNetStage) if self.remat else ResNetStage
    for i, block_size in enumerate(self.block_sizes or BIT_BLOCK_SIZES[self.depth]):
      x = stage(BitUnit, 'unit{:02d}', block_size, width * 2**i, (2, 2) if i else (1, 1),
                self.dtype, name=f'block{i + 1}')(x)
    x = nn.relu(BitGroupNorm(dtype=self.dtype, name='norm-pre-head')(x))
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, name='head',
                   kernel_init=nn.initializers.zeros)(x)
    return x.astype(jnp.float32)
