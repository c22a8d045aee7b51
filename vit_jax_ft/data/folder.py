"""Image folders: `ROOT/{train,val,test}/CLASS/*` or one `ROOT/CLASS/*` split by a seeded fraction.

Splits accept tfds-style slicing (`train[:90%]`, `train[100:]`) over a seeded order of
the files. Files that are not JPEG, PNG, BMP or GIF by their first bytes are left out,
named and counted (`Examples.keep`), or stop the run naming the file.
"""
import concurrent.futures
import os
import re
from typing import List, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from vit_jax_ft.data import examples

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_SPLIT = re.compile(r'^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$')
_ORDER_SEED = 1234  # Fixed: slices of a split stay complementary whatever config.seed is.


def is_folder(dataset: str) -> bool:
  """Whether `dataset` names a folder rather than a tfds dataset."""
  return bool(dataset) and tf.io.gfile.isdir(dataset)


def _class_dirs(directory: str) -> List[str]:
  return sorted(d.rstrip('/') for d in tf.io.gfile.listdir(directory)
                if tf.io.gfile.isdir(os.path.join(directory, d)))


def _is_image(path: str) -> bool:
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return examples.is_image(f.read(8))
  except (OSError, tf.errors.OpError):
    return False


def _list_class(directory: str, class_name: str) -> List[str]:
  folder = os.path.join(directory, class_name)
  files = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(EXTENSIONS))
  if not files:
    raise ValueError(f'Class folder {folder} has no images ({", ".join(EXTENSIONS)}); '
                     'remove it or add images.')
  return [os.path.join(folder, f) for f in files]


def _parse_split(split: str) -> Tuple[str, Optional[Tuple[str, str, str, str]]]:
  match = _SPLIT.match(split.replace(' ', ''))
  if not match:
    raise ValueError(f'Cannot parse split {split!r}; use `name`, `name[:90%]` or `name[10:]`.')
  name, *bounds = match.groups()
  return name, (bounds if split.endswith(']') else None)


def _slice(n: int, bounds: Optional[Tuple[str, str, str, str]]) -> slice:
  """tfds slicing: integers count examples, `%` rounds to the nearest example."""
  if bounds is None:
    return slice(None)
  def index(value, percent):
    if not value:
      return None
    return int(round(int(value) * n / 100)) if percent else int(value)
  return slice(index(*bounds[:2]), index(*bounds[2:]))


def split_names(root: str) -> List[str]:
  """The splits a folder offers."""
  if tf.io.gfile.isdir(os.path.join(root, 'train')):
    return [s for s in ('train', 'val', 'test') if tf.io.gfile.isdir(os.path.join(root, s))]
  return ['train', 'test']


def load_split(root: str, split: str, test_fraction: float = 0.2, split_seed: int = 0,
               on_corrupt: str = 'skip') -> examples.Examples:
  """The files of `split` with labels; class names come from the train folder."""
  name, bounds = _parse_split(split)
  if name not in split_names(root):
    raise ValueError(f'Split {name!r} not found in {root}; it has {split_names(root)}. '
                     'Expected ROOT/{train,test}/CLASS/* (val optional) or ROOT/CLASS/*.')
  two_level = tf.io.gfile.isdir(os.path.join(root, 'train'))
  class_names = _class_dirs(os.path.join(root, 'train') if two_level else root)
  if not class_names:
    raise ValueError(f'No class folders in {root}; expected ROOT/train/CLASS/*.jpg.')
  if two_level:
    paths, labels = _two_level(root, name, class_names)
  else:
    paths, labels = _one_level(root, name, class_names, test_fraction, split_seed)
  order = np.random.default_rng([_ORDER_SEED, split_seed]).permutation(len(paths))
  order = order[_slice(len(paths), bounds)]
  paths = np.array(paths, dtype=object)[order]
  split_examples = examples.Examples(paths, labels[order], class_names, is_path=True, names=paths)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    ok = np.array(list(pool.map(_is_image, paths)), bool)
  split_examples = split_examples.keep(ok, 'are not images (by their first bytes)', on_corrupt,
                                       f'{root} split {split}')
  logging.info('Folder %s split %s: %d images, %d classes', root, split, len(split_examples),
               len(class_names))
  return split_examples


def _two_level(root: str, name: str, class_names: List[str]) -> Tuple[List[str], np.ndarray]:
  directory = os.path.join(root, name)
  unknown = sorted(set(_class_dirs(directory)) - set(class_names))
  if unknown:
    raise ValueError(f'Classes {unknown} of {directory} are not in {root}/train; '
                     'a split cannot add classes.')
  paths, labels = [], []
  for label, class_name in enumerate(class_names):
    if name != 'train' and not tf.io.gfile.isdir(os.path.join(directory, class_name)):
      continue  # A class may be absent from a held-out split.
    files = _list_class(directory, class_name)
    paths += files
    labels += [label] * len(files)
  return paths, np.array(labels, np.int64)


def _one_level(root: str, name: str, class_names: List[str], test_fraction: float,
               split_seed: int) -> Tuple[List[str], np.ndarray]:
  """Each class split in `1 - test_fraction : test_fraction` by a seeded permutation."""
  if not 0 < test_fraction < 1:
    raise ValueError(f'folder_test_fraction={test_fraction} must be in (0, 1) to split '
                     f'{root}/CLASS/* into train and test.')
  rng = np.random.default_rng([_ORDER_SEED, split_seed, 0])
  paths, labels = [], []
  for label, class_name in enumerate(class_names):
    files = _list_class(root, class_name)
    files = [files[i] for i in rng.permutation(len(files))]
    n_test = int(round(test_fraction * len(files)))
    chosen = files[:n_test] if name == 'test' else files[n_test:]
    paths += chosen
    labels += [label] * len(chosen)
  return paths, np.array(labels, np.int64)
