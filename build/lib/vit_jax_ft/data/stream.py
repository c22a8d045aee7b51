"""tfds splits too big for memory, streamed from their record files; each host reads its own slice.

Host `i` of `n` reads only `tfds.even_splits(split, n)[i]`. Epoch `e` visits that
slice's files in an order seeded by (seed, e, i), reads them interleaved and mixes
their encoded records in a shuffle buffer seeded likewise. Records are parsed and
decoded only after `skip`, so resuming at step k reads, but does not decode, the
records of the current epoch before it. Augmentation is seeded by the example's
global stream position, as in memory; unlike the in-memory path, which examples make
up a global batch depends on the number of hosts.
"""
from typing import Callable, Dict, Iterator, List

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax_ft.data import batching, preprocess, tfds_source
from vit_jax_ft.data.batching import AUTOTUNE, Batch

FileInstruction = tfds.core.utils.shard_utils.FileInstruction
_FILES_AT_ONCE = 16  # Files read in parallel (tfds' default interleave cycle).
_READ_BUFFER_BYTES = 8 << 20
_CARRY = ('file', 'offset')  # Which record a source is: names a failed image.


def host_files(builder: tfds.core.DatasetBuilder, split: str, process_index: int,
               process_count: int, drop_remainder: bool) -> List[FileInstruction]:
  """The parts of record files that hold this host's share of `split`."""
  host_split = tfds.even_splits(split, process_count, drop_remainder=drop_remainder)
  return tfds_source.split_info(builder, host_split[process_index]).file_instructions


def epoch_size(builder: tfds.core.DatasetBuilder, split: str, process_count: int) -> int:
  """Training examples per epoch over all hosts: each reads `num_examples // hosts`."""
  return process_count * (tfds_source.split_info(builder, split).num_examples // process_count)


def _records(files: List[FileInstruction], order: tf.Tensor) -> tf.data.Dataset:
  """Encoded records of `files` (visited in `order`, read interleaved), with where they are."""
  names = tf.constant([f.filename for f in files], tf.string)
  skips = tf.constant([f.skip for f in files], tf.int64)
  takes = tf.constant([f.take for f in files], tf.int64)

  def read(file):
    records = tf.data.TFRecordDataset(names[file], buffer_size=_READ_BUFFER_BYTES)
    return tf.data.Dataset.zip({
        'record': records.skip(skips[file]).take(takes[file]),
        'file': tf.data.Dataset.from_tensors(tf.cast(file, tf.int32)).repeat(),
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


def _loader(builder: tfds.core.DatasetBuilder, ops: str, seed: int
            ) -> Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]]:
  """Source {'record', 'position'} to {'image', 'label'}; augmentation seeded by position."""
  decode, augment = preprocess.build(ops)
  features = builder.info.features

  def load(source):
    example = features.deserialize_example(source['record'],
                                           decoders={'image': tfds.decode.SkipDecoding()})
    image = augment(decode(example['image'], None),
                    tf.stack([tf.constant(seed, tf.int64), source['position']]))
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}
  return load


def _name_of(files: List[FileInstruction]) -> Callable[[Dict[str, np.ndarray], int], str]:
  return lambda carried, slot: (f'record {carried["offset"][slot]} of '
                                f'{files[carried["file"][slot]].filename}')


def train_batches(builder: tfds.core.DatasetBuilder, split: str, ops: str, *, seed: int,
                  global_batch: int, start_step: int, process_index: int, process_count: int,
                  shuffle_buffer: int, on_corrupt: str = 'skip', prefetch: int = 2
                  ) -> Iterator[Batch]:
  """Infinite iterator of this host's part of each global batch, from `start_step` on.

  `weight` is 1, or 0 where the image failed to decode.
  """
  local = batching.host_batch_size(global_batch, process_count, 'batch')
  files = host_files(builder, split, process_index, process_count, drop_remainder=True)
  per_epoch = sum(f.take for f in files)
  if not per_epoch:
    raise ValueError(f'Split {split!r} of {builder.name!r} has fewer examples than the '
                     f'{process_count} processes.')
  first = start_step * local  # This host's stream position of the first example wanted.
  first_epoch, skipped = divmod(first, per_epoch)
  records = tf.data.Dataset.counter(first_epoch).flat_map(
      lambda epoch: _epoch_records(files, seed, process_index, shuffle_buffer, epoch))
  records = records.skip(skipped)  # Reads, but neither parses nor decodes.

  def with_position(host_position, source):
    step, slot = host_position // local, host_position % local
    return {**source, 'position': step * global_batch + process_index * local + slot}

  sources = tf.data.Dataset.zip(tf.data.Dataset.counter(first), records).map(with_position)
  ds = batching.decode_in_slots(sources.batch(local, drop_remainder=True),
                                _loader(builder, ops, seed), local, _CARRY)
  ds = batching.with_options(ds.prefetch(max(prefetch, 1)))
  return batching.numpy_batches(
      ds, _CARRY, batching.DecodeFailures(on_corrupt, 'its weight is 0 in its batch'),
      _name_of(files), 'weight')


def eval_batches(builder: tfds.core.DatasetBuilder, split: str, ops: str, *, global_batch: int,
                 process_index: int, process_count: int, on_corrupt: str = 'skip',
                 prefetch: int = 2) -> Iterator[Batch]:
  """This host's part of each padded global eval batch; `mask` is 0 on padding.

  Host `i` evaluates its own slice of the split, in file order; every host yields
  the same number of batches, padded after its last example.
  """
  local = batching.host_batch_size(global_batch, process_count, 'batch_eval')
  largest_share = -(-tfds_source.split_info(builder, split).num_examples // process_count)
  num_batches = -(-largest_share // local)
  files = host_files(builder, split, process_index, process_count, drop_remainder=False)
  sources = _records(files, tf.range(len(files))).map(
      lambda source: {**source, 'position': tf.constant(0, tf.int64)})
  padding = {k: batching.empty(s) for k, s in sources.element_spec.items()}
  sources = sources.batch(local).concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = batching.decode_in_slots(sources.take(num_batches), _loader(builder, ops, seed=0),
                                local, _CARRY)
  ds = batching.with_options(ds.prefetch(max(prefetch, 1)))
  return batching.numpy_batches(
      ds, _CARRY, batching.DecodeFailures(on_corrupt, 'it is left out of the evaluation'),
      _name_of(files), 'mask')
