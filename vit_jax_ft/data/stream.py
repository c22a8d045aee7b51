"""tfds splits too big for memory, streamed from their record files; each host reads its own slice.

Host `i` of `n` reads only `tfds.even_splits(split, n)[i]`. Epoch `e` visits that
slice's files in an order seeded by (seed, e, i), reads them interleaved and mixes
their encoded records in a shuffle buffer seeded likewise. Records are parsed and
decoded only after `skip`, so resuming at step k reads, but does not decode, the
records of the current epoch before it. Augmentation is seeded by the example's
global stream position, as in memory; unlike the in-memory path, which examples make
up a global batch depends on the number of hosts.
"""
import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax_ft.data import batching, preprocess, tfds_source
from vit_jax_ft.data.batching import AUTOTUNE

FileInstruction = tfds.core.utils.shard_utils.FileInstruction
_FILES_AT_ONCE = 16  # Files read in parallel (tfds' default interleave cycle).
_READ_BUFFER_BYTES = 8 << 20


def host_files(builder: tfds.core.DatasetBuilder, split: str, process_index: int,
               process_count: int, drop_remainder: bool) -> List[FileInstruction]:
  """The parts of record files that hold this host's share of `split`."""
  host_split = tfds.even_splits(split, process_count, drop_remainder=drop_remainder)
  return tfds_source.split_info(builder, host_split[process_index]).file_instructions


def _records(files: List[FileInstruction], order: tf.Tensor) -> tf.data.Dataset:
  """Encoded records of `files` (visited in `order`, read interleaved), with file and offset."""
  names = tf.constant([f.filename for f in files], tf.string)
  skips = tf.constant([f.skip for f in files], tf.int64)
  takes = tf.constant([f.take for f in files], tf.int64)

  def read(file):
    records = tf.data.TFRecordDataset(names[file], buffer_size=_READ_BUFFER_BYTES)
    return tf.data.Dataset.zip({
        'record': records.skip(skips[file]).take(takes[file]),
        'file': tf.data.Dataset.from_tensors(names[file]).repeat(),
        'offset': tf.data.Dataset.range(skips[file], skips[file] + takes[file])})

  return tf.data.Dataset.from_tensor_slices(order).interleave(
      read, cycle_length=max(1, min(_FILES_AT_ONCE, len(files))), block_length=1,
      num_parallel_calls=AUTOTUNE, deterministic=True)


def _epoch_records(files: List[FileInstruction], seed: int, process_index: int,
                   shuffle_buffer: int, epoch: tf.Tensor) -> tf.data.Dataset:
  """This host's records in epoch `epoch`: seeded file order, then a seeded shuffle buffer."""
  key = tf.random.experimental.stateless_fold_in(
      tf.stack([tf.constant(seed, tf.int64), epoch]), process_index)
  order = tf.argsort(tf.random.stateless_uniform([len(files)], key))
  shuffle_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
  return _records(files, order).shuffle(max(shuffle_buffer, 1), seed=shuffle_seed,
                                        reshuffle_each_iteration=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Streamed:
  """Records of a tfds split read from its files: {'record', 'file', 'offset', 'position'}."""
  builder: tfds.core.DatasetBuilder
  split: str
  seed: int = 0  # Of the file order and the shuffle buffer.
  shuffle_buffer: int = 1
  carry: Tuple[str, ...] = ('file', 'offset')  # Which record it is: names a failed image.
  class_counts = None  # Unknown without reading the whole split.
  num_corrupt = None  # Bad images are found only when decoded.

  @property
  def class_names(self) -> List[str]:
    return tfds_source.class_names(self.builder)

  @property
  def num_examples(self) -> int:
    return tfds_source.split_info(self.builder, self.split).num_examples

  def epoch_size(self, process_count: int) -> int:
    """Training examples per epoch over all hosts: each reads `num_examples // hosts`."""
    return process_count * (self.num_examples // process_count)

  def train_records(self, start_step: int, global_batch: int, process_index: int,
                    process_count: int) -> tf.data.Dataset:
    """This host's part of each global batch from `start_step` on, forever.

    Records before `start_step` in its epoch are read, but neither parsed nor decoded.
    """
    local = global_batch // process_count
    files = host_files(self.builder, self.split, process_index, process_count,
                       drop_remainder=True)
    per_epoch = sum(f.take for f in files)
    if not per_epoch:
      raise ValueError(f'Split {self.split!r} of {self.builder.name!r} has fewer examples than '
                       f'the {process_count} processes.')
    first = start_step * local  # This host's stream position of the first example wanted.
    first_epoch, skipped = divmod(first, per_epoch)
    records = tf.data.Dataset.counter(first_epoch).flat_map(
        lambda epoch: _epoch_records(files, self.seed, process_index, self.shuffle_buffer,
                                     epoch))
    records = records.skip(skipped)

    def with_position(host_position, record):
      step, slot = host_position // local, host_position % local
      return {**record, 'position': step * global_batch + process_index * local + slot}

    return tf.data.Dataset.zip(tf.data.Dataset.counter(first), records).map(
        with_position).batch(local, drop_remainder=True)

  def eval_records(self, global_batch: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    """This host's slice of the split in file order, in as many batches as every host has.

    Batches after the slice's last record are short or empty (padding).
    """
    local = global_batch // process_count
    largest_share = -(-self.num_examples // process_count)
    files = host_files(self.builder, self.split, process_index, process_count,
                       drop_remainder=False)
    records = _records(files, tf.range(len(files))).map(
        lambda record: {**record, 'position': tf.constant(0, tf.int64)})
    padding = {k: batching.empty(s) for k, s in records.element_spec.items()}
    return records.batch(local).concatenate(
        tf.data.Dataset.from_tensors(padding).repeat()).take(-(-largest_share // local))

  def read(self, record: Dict[str, tf.Tensor], decode: preprocess.Op
           ) -> Tuple[tf.Tensor, tf.Tensor]:
    """The (uint8 image, label) of a record."""
    example = self.builder.info.features.deserialize_example(
        record['record'], decoders={'image': tfds.decode.SkipDecoding()})
    return decode(example['image'], None), tf.cast(example['label'], tf.int32)

  def name(self, carried: Dict[str, np.ndarray], slot: int) -> str:
    return f'record {carried["offset"][slot]} of {carried["file"][slot].decode()}'

  def weights(self) -> None:
    """Streamed splits have no class weights (they need every label)."""
    return None
