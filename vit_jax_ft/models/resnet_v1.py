"""ResNet v1.5 (timm's and torchvision's `resnet50`, `resnet101`, `resnet152`), timm's names.

Not BiT and not the hybrid stem (`resnet.py`): post-activation bottlenecks with BatchNorm
(eps 1e-5, statistics in the Flax `batch_stats` collection), the stride on the 3x3
convolution (v1.5), a 7x7 stem with explicit padding 3 and a max-pool with padding 1, a 1x1
strided projection shortcut, average pooling, `fc`. Tree: `conv1`, `bn1`,
`layerS_B/{conv1,bn1,conv2,bn2,conv3,bn3,downsample_0,downsample_1}`, `fc`.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Dtype = Any
# PyTorch's BatchNorm2d defaults: eps, and momentum 0.1 of the new statistics (Flax: 0.9).
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.9
# timm's 7x7 stem has 64 channels whatever the stage widths.
STEM_WIDTH = 64


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided), 1x1 to 4x the width, each BatchNorm; ReLU after the sum."""

  width: int
  stride: int
  use_running_average: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda features, size, stride, name: nn.Conv(  # noqa: E731
        features, (size, size), (stride, stride), padding=[(size // 2, size // 2)] * 2,
        use_bias=False, dtype=self.dtype, name=name)
    norm = lambda name: nn.BatchNorm(  # noqa: E731
        use_running_average=self.use_running_average, momentum=BATCH_NORM_MOMENTUM,
        epsilon=BATCH_NORM_EPS, dtype=self.dtype, name=name)
    out = 4 * self.width
    y = nn.relu(norm('bn1')(conv(self.width, 1, 1, 'conv1')(x)))
    y = nn.relu(norm('bn2')(conv(self.width, 3, self.stride, 'conv2')(y)))
    y = norm('bn3')(conv(out, 1, 1, 'conv3')(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = norm('downsample_1')(conv(out, 1, self.stride, 'downsample_0')(x))
    return nn.relu(x + y)


class ResNetV1(nn.Module):
  """timm's ResNet with Bottleneck blocks; with `num_classes=0` it returns pooled features."""

  num_classes: int
  layers: Sequence[int] = (3, 4, 6, 3)  # resnet50's blocks per stage.
  channels: Sequence[int] = (64, 128, 256, 512)
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  # BatchNorm normalises with the stored statistics even when training, and keeps them.
  frozen_batch_norm: bool = False
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    running = not train or self.frozen_batch_norm
    x = nn.Conv(STEM_WIDTH, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                dtype=self.dtype, name='conv1')(images.astype(self.dtype))
    x = nn.BatchNorm(use_running_average=running, momentum=BATCH_NORM_MOMENTUM,
                     epsilon=BATCH_NORM_EPS, dtype=self.dtype, name='bn1')(x)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
    for stage, (depth, width) in enumerate(zip(self.layers, self.channels)):
      for block in range(depth):
        stride = 2 if stage and not block else 1
        x = Bottleneck(width, stride, running, self.dtype, name=f'layer{stage + 1}_{block}')(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


def is_timm_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are timm's (or torchvision's) ResNet layout."""
  return 'conv1.weight' in state_dict and any(k.startswith('layer1.0.conv3.') for k in state_dict)


def from_timm(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """timm/torchvision ResNet state dict -> `{'params': ..., 'batch_stats': ...}`."""
  params, stats = {}, {}
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    path = re.sub(r'\.(\d+)\.', r'_\1.', key).split('.')
    value = np.asarray(value)
    leaf, path = path[-1], tuple(path[:-1])
    if leaf == 'running_mean':
      stats[path + ('mean',)] = value
    elif leaf == 'running_var':
      stats[path + ('var',)] = value
    elif leaf == 'weight' and value.ndim == 4:  # Conv (out, in, h, w) -> (h, w, in, out).
      params[path + ('kernel',)] = value.transpose(2, 3, 1, 0)
    elif leaf == 'weight' and value.ndim == 2:  # Linear (out, in) -> (in, out).
      params[path + ('kernel',)] = value.T
    else:  # BatchNorm weight and bias, Linear bias.
      params[path + ('scale' if leaf == 'weight' else 'bias',)] = value
  return {'params': traverse_util.unflatten_dict(params),
          'batch_stats': traverse_util.unflatten_dict(stats)}


def is_params_tree(params: Mapping[str, Any]) -> bool:
  """Whether `params` is this module's tree (to write back in timm's layout)."""
  return 'conv1' in params and 'layer1_0' in params


def to_timm(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """`{'params', 'batch_stats'}` -> timm's ResNet state dict (the inverse of `from_timm`).

  Each BatchNorm also gets timm's `num_batches_tracked` (int64, 0: only PyTorch's cumulative
  averaging reads it, which timm's momentum 0.1 does not use).
  """
  if 'batch_stats' not in variables:
    raise ValueError('ResNet variables without `batch_stats`: timm needs each BatchNorm\'s '
                     'running mean and variance; pass {"params": ..., "batch_stats": ...}.')
  module = lambda path: '.'.join(re.sub(r'_(\d+)$', r'.\1', n) for n in path)  # noqa: E731
  state = {}
  for path, value in traverse_util.flatten_dict(dict(variables['params'])).items():
    value = np.asarray(value)
    if path[-1] == 'kernel':  # Conv (h, w, in, out) -> (out, in, h, w); Linear: (out, in).
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    leaf = 'bias' if path[-1] == 'bias' else 'weight'  # Kernels and BatchNorm scales.
    state[f'{module(path[:-1])}.{leaf}'] = np.ascontiguousarray(value)
  for path, value in traverse_util.flatten_dict(dict(variables['batch_stats'])).items():
    state[f'{module(path[:-1])}.running_{path[-1]}'] = np.asarray(value)
    state[f'{module(path[:-1])}.num_batches_tracked'] = np.zeros((), np.int64)
  return state
