r"""Lists the official model names with their parameter counts.

  python -m vit_jax_ft.models [--resolution=224] [--num_classes=1000] [--filter=ViT-B]
"""
from absl import app, flags
import jax
import numpy as np

from vit_jax_ft.models import MODEL_SPECS, abstract_variables, get_model

_RESOLUTION = flags.DEFINE_integer('resolution', 224, 'Image size the counts are for.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes of the head.')
_FILTER = flags.DEFINE_string('filter', '', 'Only names containing this text.')


def parameter_count(name: str, num_classes: int, resolution: int) -> int:
  """Number of parameters of `name` (shapes only; nothing is allocated)."""
  shapes = abstract_variables(get_model(name, num_classes), resolution)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


def main(argv):
  del argv
  print(f'{"model":22s} {"kind":5s} {"parameters":>13s}   '
        f'({_RESOLUTION.value} px, {_NUM_CLASSES.value} classes)')
  for name, spec in MODEL_SPECS.items():
    if _FILTER.value in name:
      n = parameter_count(name, _NUM_CLASSES.value, _RESOLUTION.value)
      print(f'{name:22s} {spec["kind"]:5s} {n:13,d}')


if __name__ == '__main__':
  app.run(main)
