"""Checks, before anything compiles, that the preprocessing ops make the images the model expects.

The model and its position-embedding grid are built for `pp.crop` pixels; ops that end at
another size would otherwise fail deep inside flax with a parameter shape error.
"""
from typing import Tuple

import flax.linen as nn
import ml_collections
import tensorflow as tf
from absl import logging

from vit_jax_ft.data import preprocess

# Two probe images of different aspect, larger than any crop: fixed-size ops give one size.
_PROBES = ((1024, 1280), (1280, 1024))


def output_size(ops: str) -> Tuple[int, int]:
  """(height, width) of the images `ops` make; ValueError when it depends on the input."""
  _, augment = preprocess.build(ops)
  sizes = set()
  for probe in _PROBES:
    try:
      image = augment(tf.zeros(probe + (3,), tf.uint8), tf.constant([0, 0]))
    except (tf.errors.InvalidArgumentError, ValueError) as e:
      raise ValueError(f'The preprocessing ops {ops!r} fail on a {probe[0]}x{probe[1]} image: '
                       f'{str(e).splitlines()[0]}') from e
    sizes.add(tuple(int(n) for n in image.shape[:2]))
  if len(sizes) > 1:
    raise ValueError(f'The preprocessing ops {ops!r} make images whose size depends on the '
                     f'input ({sorted(sizes)}); end them with a fixed-size crop or resize.')
  return sizes.pop()


def _stride(model: nn.Module) -> int:
  """Input pixels per token along each side: the patch, times the hybrid stem's stride."""
  patch = getattr(model, 'patch_size', None)
  if patch is None:
    return 1
  layers = getattr(model, 'resnet_layers', None)
  stem = 1 if layers is None else 4 * 2**max(len(layers) - 1, 0)
  side = patch if isinstance(patch, int) else patch[0]  # Swin's is an int, ViT's a pair.
  return int(side) * stem


def check(config: ml_collections.ConfigDict, model: nn.Module) -> None:
  """Raises when the train or test ops disagree with `pp.crop`; warns about dropped pixels."""
  crop = config.pp.crop
  for split, key in (('training', 'train_ops'), ('test', 'test_ops')):
    ops = preprocess.default_ops(config, train=split == 'training')
    height, width = output_size(ops)
    if (height, width) != (crop, crop):
      raise ValueError(
          f'config.pp.crop={crop}, but the {split} ops {ops!r} make {height}x{width} images; '
          f'the model and its position embeddings are built for {crop}x{crop}. Set '
          f'--config.pp.crop={height} or change config.pp.{key} to end at {crop} pixels.')
  stride = _stride(model)
  if crop % stride:
    logging.warning('config.pp.crop=%d is not a multiple of the %d-pixel patches of %s: the '
                    'last %d rows and columns of every image are dropped. Use a crop of %d or '
                    '%d to use them all.', crop, stride, config.model_name, crop % stride,
                    crop - crop % stride, crop - crop % stride + stride)
