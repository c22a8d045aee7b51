"""A split held in memory: one entry per example (encoded image or file path) and its label."""
import dataclasses
import functools
from typing import List

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """`data[i]` is the encoded image (`is_path=False`) or the path of the file of example `i`."""
  data: np.ndarray  # object array of bytes or str.
  labels: np.ndarray  # int64.
  class_names: List[str]
  is_path: bool = False

  def __len__(self) -> int:
    return len(self.labels)

  @functools.cached_property
  def table(self) -> tf.Tensor:
    """`data` as one TF string tensor, built once per split (it can hold gigabytes)."""
    with tf.init_scope():  # Eager even when first used inside a traced tf.data function.
      return tf.constant(self.data)

  def read(self, index: tf.Tensor) -> tf.Tensor:
    """Encoded bytes of example `index`."""
    entry = tf.gather(self.table, index)
    return tf.io.read_file(entry) if self.is_path else entry

  def name(self, index: int) -> str:
    """How logs and errors call example `index`: its file, or its place in the split."""
    return str(self.data[index]) if self.is_path else f'example {index} of the split'
