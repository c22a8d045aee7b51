"""A split held in memory: per example its encoded image, file path or decoded image, and label.

Images that are not images by their first bytes, or (config.cache) fail to decode, are
left out of the split when it is read: each is named in the log and counted in
`Examples.corrupt`, or stops the run (`config.on_corrupt_image='error'`).
"""
import dataclasses
import functools
from typing import Callable, List, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

# First bytes of the formats `decode` reads: JPEG, PNG, GIF, BMP.
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a', b'GIF89a', b'BM')
_NAMED_IN_LOG = 20  # Bad images named in one warning; the count covers all.


def is_image(head: bytes) -> bool:
  """Whether `head` (a file's first 8 bytes or more) starts an image `decode` can read."""
  return head.startswith(_MAGIC)


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """`data[i]` is example `i`'s encoded image, its file's path (`is_path`) or its decoded image."""
  data: np.ndarray  # object array of bytes or str.
  labels: np.ndarray  # int64.
  class_names: List[str]
  is_path: bool = False
  channels: int = 0  # If > 0, `data` holds serialized uint8 HWC tensors of these (config.cache).
  names: Optional[np.ndarray] = None  # What logs call each example (file paths); None: its index.
  corrupt: Tuple[str, ...] = ()  # Names of the images left out of the split.

  def __len__(self) -> int:
    return len(self.labels)

  @functools.cached_property
  def table(self) -> tf.Tensor:
    """`data` as one TF string tensor, built once per split (it can hold gigabytes)."""
    with tf.init_scope():  # Eager even when first used inside a traced tf.data function.
      return tf.constant(self.data)

  @functools.cached_property
  def label_table(self) -> tf.Tensor:
    with tf.init_scope():
      return tf.constant(self.labels, tf.int32)

  def read(self, index: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (or the serialized decoded image) of example `index`."""
    entry = tf.gather(self.table, index)
    return tf.io.read_file(entry) if self.is_path else entry

  def image(self, index: tf.Tensor, decode: Callable[[tf.Tensor, None], tf.Tensor]
            ) -> tf.Tensor:
    """Example `index` as a uint8 HWC image: decoded by `decode`, or parsed if decoded already."""
    if self.channels:
      return tf.ensure_shape(tf.io.parse_tensor(self.read(index), tf.uint8),
                             [None, None, self.channels])
    return decode(self.read(index), None)

  def name(self, index: int) -> str:
    """How logs and errors call example `index`: its file, or its place in the split as held."""
    return str(self.names[index]) if self.names is not None else f'example {index} of the split'

  def keep(self, ok: np.ndarray, problem: str, on_corrupt: str, where: str,
           data: Optional[np.ndarray] = None) -> 'Examples':
    """These examples (with `data` instead, if given) less those not `ok`, which `problem` names.

    The ones left out are named in a warning and added to `corrupt`; with
    `on_corrupt='error'` the first one stops the run instead.
    """
    data = self.data if data is None else data
    if ok.all():
      return dataclasses.replace(self, data=data)
    bad = [self.name(i) for i in np.flatnonzero(~ok)]
    if on_corrupt == 'error':
      raise ValueError(f'{len(bad)} image(s) of {where} {problem}, first: {bad[0]}. Remove or '
                       "repair them, or set config.on_corrupt_image='skip' to leave them out.")
    logging.warning('Left out %d of the %d images of %s: they %s: %s%s', len(bad), len(ok),
                    where, problem, ', '.join(bad[:_NAMED_IN_LOG]),
                    ' ...' if len(bad) > _NAMED_IN_LOG else '')
    return dataclasses.replace(self, data=data[ok], labels=self.labels[ok],
                               names=None if self.names is None else self.names[ok],
                               corrupt=self.corrupt + tuple(bad))
