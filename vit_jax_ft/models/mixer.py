"""MLP-Mixer with the parameter tree of the official `vit_jax` release (`Mixer-B_16`, ...).

Tree: `stem` (patch convolution), `MixerBlock_N/{LayerNorm_0, token_mixing, LayerNorm_1,
channel_mixing}` with `Dense_0`/`Dense_1` in each MLP, `pre_head_layer_norm`, `head`. As
in the official code: tanh-approximate GELU, LayerNorm eps 1e-6, global average pooling.
timm's names (`mixer_b16_224`) are the same network with exact GELU; `from_timm` maps their
state dicts onto this tree. The token MLP is as wide as the number of patches, so a Mixer
runs at one resolution only.
"""
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Dtype = Any


class MlpBlock(nn.Module):
  """Dense to `mlp_dim`, GELU, Dense back to the input width."""

  mlp_dim: int
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(x), approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
  """Token mixing across patches, then channel mixing, each pre-norm with a residual."""

  tokens_mlp_dim: int
  channels_mlp_dim: int
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    tokens = MlpBlock(self.tokens_mlp_dim, self.gelu_approximate, self.dtype, name='token_mixing')
    channels = MlpBlock(self.channels_mlp_dim, self.gelu_approximate, self.dtype,
                        name='channel_mixing')
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    x = x + tokens(y.swapaxes(1, 2)).swapaxes(1, 2)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    return x + channels(y)


class MlpMixer(nn.Module):
  """MLP-Mixer; with `num_classes=0` it returns the pooled features."""

  num_classes: int
  patch_size: Tuple[int, int]
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  gelu_approximate: bool = True  # tanh GELU (official); False: exact (timm).
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
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, self.gelu_approximate,
                     self.dtype)(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='pre_head_layer_norm')(x)
    x = jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='head')(x)
    return x.astype(jnp.float32)


# timm's Mixer names -> the official ones, applied in order to '/'-joined keys.
_TIMM_TO_OFFICIAL = (
    (r'^stem/proj/', 'stem/'), (r'^blocks/(\d+)/', r'MixerBlock_\1/'),
    (r'/norm1/', '/LayerNorm_0/'), (r'/norm2/', '/LayerNorm_1/'),
    (r'/mlp_tokens/', '/token_mixing/'), (r'/mlp_channels/', '/channel_mixing/'),
    (r'/fc1/', '/Dense_0/'), (r'/fc2/', '/Dense_1/'), (r'^norm/', 'pre_head_layer_norm/'),
)


# The official names -> timm's, the inverse of `_TIMM_TO_OFFICIAL`.
_OFFICIAL_TO_TIMM = (
    (r'^stem/', 'stem/proj/'), (r'^MixerBlock_(\d+)/', r'blocks/\1/'),
    (r'/LayerNorm_0/', '/norm1/'), (r'/LayerNorm_1/', '/norm2/'),
    (r'/token_mixing/', '/mlp_tokens/'), (r'/channel_mixing/', '/mlp_channels/'),
    (r'/Dense_0/', '/fc1/'), (r'/Dense_1/', '/fc2/'), (r'^pre_head_layer_norm/', 'norm/'),
)


def is_timm_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are timm's MlpMixer layout."""
  return any('.mlp_tokens.fc1.' in k for k in state_dict)


def from_timm(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """timm's Mixer state dict (numpy arrays) -> the official params tree of this module."""
  flat = {}
  for key, value in state_dict.items():
    name, value = key.replace('.', '/'), np.asarray(value)
    for pattern, replacement in _TIMM_TO_OFFICIAL:
      name = re.sub(pattern, replacement, name)
    if name.endswith('/weight'):
      if value.ndim == 4:  # Conv (out, in, h, w) -> (h, w, in, out).
        name, value = name[:-len('weight')] + 'kernel', value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:  # Linear (out, in) -> (in, out).
        name, value = name[:-len('weight')] + 'kernel', value.T
      else:  # LayerNorm.
        name = name[:-len('weight')] + 'scale'
    flat[name] = value
  return traverse_util.unflatten_dict(flat, sep='/')


def is_params_tree(params: Mapping[str, Any]) -> bool:
  """Whether `params` is this module's tree (official or from timm: the same names)."""
  return 'MixerBlock_0' in params and 'stem' in params


def to_timm(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """This module's params tree -> timm's Mixer state dict (the inverse of `from_timm`)."""
  state = {}
  for name, value in traverse_util.flatten_dict(dict(params), sep='/').items():
    value = np.asarray(value)
    for pattern, replacement in _OFFICIAL_TO_TIMM:
      name = re.sub(pattern, replacement, name)
    if name.endswith('/kernel'):  # Conv (h, w, in, out) -> (out, in, h, w); Linear: (out, in).
      name, value = name[:-len('kernel')] + 'weight', (
          value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
    elif name.endswith('/scale'):
      name = name[:-len('scale')] + 'weight'
    state[name.replace('/', '.')] = np.ascontiguousarray(value)
  return state
