r"""Lists the model names with their parameter counts and input conventions.

  python -m vit_jax_ft.models [--resolution=224] [--num_classes=1000] [--filter=ViT-B]
"""
from absl import app, flags
import jax
import numpy as np

from vit_jax_ft.models import (MODEL_SPECS, InputConvention, abstract_variables, get_model,
                               input_convention)

_RESOLUTION = flags.DEFINE_integer('resolution', 224, 'Image size the counts are for.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes of the head.')
_FILTER = flags.DEFINE_string('filter', '', 'Only names containing this text.')


def parameter_count(name: str, num_classes: int, resolution: int) -> int:
  """Number of parameters of `name` (shapes only; nothing is allocated)."""
  shapes = abstract_variables(get_model(name, num_classes), resolution)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


def describe(convention: InputConvention) -> str:
  """The convention in a few words: value range or mean/std, resize, test crop, size."""
  if convention.mean == convention.std == (0.5, 0.5, 0.5):
    values = '[-1, 1]'
  else:
    values = f'mean {convention.mean} std {convention.std}'
  resize = convention.interpolation or 'bilinear'
  crop = (f'crop_pct {convention.crop_pct}' if convention.crop_pct
          else 'whole image resized')
  return f'{values}, {resize}, {crop}, {convention.input_size} px'


def main(argv):
  del argv
  print(f'{"model":30s} {"kind":9s} {"parameters":>13s}  input convention   '
        f'({_RESOLUTION.value} px, {_NUM_CLASSES.value} classes)')
  for name, spec in MODEL_SPECS.items():
    if _FILTER.value in name:
      n = parameter_count(name, _NUM_CLASSES.value, _RESOLUTION.value)
      print(f'{name:30s} {spec["kind"]:9s} {n:13,d}  {describe(input_convention(name))}')


if __name__ == '__main__':
  app.run(main)
