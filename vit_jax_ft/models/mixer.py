"""MLP-Mixer with the parameter tree of the official `vit_jax` release (`Mixer-B_16`, ...).

Tree: `stem` (patch convolution), `MixerBlock_N/{LayerNorm_0, token_mixing, LayerNorm_1,
channel_mixing}` with `Dense_0`/`Dense_1` in each MLP, `pre_head_layer_norm`, `head`. As
in the official code: tanh-approximate GELU, LayerNorm eps 1e-6, global average pooling.
The token MLP is as wide as the number of patches, so a Mixer runs at one resolution only.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class MlpBlock(nn.Module):
  """Dense to `mlp_dim`, GELU, Dense back to the input width."""

  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(x), approximate=True)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
  """Token mixing across patches, then channel mixing, each pre-norm with a residual."""

  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = MlpBlock(self.tokens_mlp_dim, self.dtype, name='token_mixing')(y.swapaxes(1, 2))
    x = x + y.swapaxes(1, 2)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    return x + MlpBlock(self.channels_mlp_dim, self.dtype, name='channel_mixing')(y)


class MlpMixer(nn.Module):
  """MLP-Mixer; with `num_classes=0` it returns the pooled features."""

  num_classes: int
  patch_size: Tuple[int, int]
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No dropout or batch statistics.
    x = nn.Conv(self.hidden_dim, self.patch_size, strides=self.patch_size, padding='VALID',
                dtype=self.dtype, name='stem')(images.astype(self.dtype))
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    for _ in range(self.num_blocks):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, self.dtype)(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='pre_head_layer_norm')(x)
    x = jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='head')(x)
    return x.astype(jnp.float32)
