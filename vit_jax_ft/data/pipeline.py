"""tf.data pipelines over in-memory splits: each host decodes only its share of each global batch.

Stream position `g` (the g-th example of the run, over all hosts) fixes both the example
(`TrainOrder.indices`) and its augmentation seed `(seed, g)`, so a run resumed at
step k, or spread over another number of hosts, sees the same global batches.
"""
from typing import Callable, Dict, Iterator

import numpy as np
import tensorflow as tf

from vit_jax_ft.data import preprocess
from vit_jax_ft.data.examples import Examples
from vit_jax_ft.data.sampling import TrainOrder

Batch = Dict[str, np.ndarray]
_AUTOTUNE = tf.data.AUTOTUNE


def host_batch_size(global_batch: int, process_count: int, name: str) -> int:
  """This host's share of a global batch."""
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'config.{name}={global_batch} must be a positive multiple of the '
                     f'{process_count} processes.')
  return global_batch // process_count


def cached_table(examples: Examples, decode: preprocess.Op, skip_corrupt: bool = True) -> Examples:
  """The examples decoded once and kept as serialized uint8 tensors (config.cache)."""
  table = tf.constant(examples.data)
  ds = tf.data.Dataset.range(len(examples)).map(
      lambda i: (i, tf.io.serialize_tensor(decode(examples.read(table, i), None))),
      num_parallel_calls=_AUTOTUNE)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  index, data = map(np.concatenate, zip(*ds.batch(1024).as_numpy_iterator()))
  return Examples(data.astype(object), examples.labels[index], examples.class_names)


def _decoded(decode: preprocess.Op, cached: bool) -> Callable[[tf.Tensor], tf.Tensor]:
  if cached:
    return lambda data: tf.ensure_shape(tf.io.parse_tensor(data, tf.uint8), [None, None, 3])
  return lambda data: decode(data, None)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return ds.with_options(options)


def train_batches(examples: Examples, order: TrainOrder, ops: str, *, seed: int,
                  global_batch: int, start_step: int, process_index: int,
                  process_count: int, cached: bool = False, skip_corrupt: bool = True,
                  prefetch: int = 2) -> Iterator[Batch]:
  """Infinite iterator of this host's part of each global batch, from `start_step` on."""
  local = host_batch_size(global_batch, process_count, 'batch')
  decode, augment = preprocess.build(ops)
  read = _decoded(decode, cached)
  table = tf.constant(examples.data)
  labels = tf.constant(examples.labels, tf.int32)

  def positions():
    step = start_step
    while True:
      g = step * global_batch + process_index * local + np.arange(local, dtype=np.int64)
      yield order.indices(g), g
      step += 1

  def load(index, position):
    image = augment(read(examples.read(table, index)),
                    tf.stack([tf.constant(seed, tf.int64), position]))
    return {'image': image, 'label': tf.gather(labels, index), 'index': index}

  spec = (tf.TensorSpec([local], tf.int64), tf.TensorSpec([local], tf.int64))
  ds = tf.data.Dataset.from_generator(positions, output_signature=spec).unbatch()
  ds = ds.map(load, num_parallel_calls=_AUTOTUNE)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  ds = _options(ds.batch(local, drop_remainder=True).prefetch(max(prefetch, 1)))
  weights = order.weights(np.arange(len(examples)))
  for batch in ds.as_numpy_iterator():
    index = batch.pop('index')
    if weights is not None:
      batch['weight'] = weights[index]
    yield batch


def eval_batches(examples: Examples, ops: str, *, global_batch: int, process_index: int,
                 process_count: int, cached: bool = False, prefetch: int = 2
                 ) -> Iterator[Batch]:
  """This host's part of each padded global eval batch; `mask` is 0 on padding."""
  local = host_batch_size(global_batch, process_count, 'batch_eval')
  num_batches = -(-len(examples) // global_batch)
  starts = np.arange(num_batches)[:, None] * global_batch + process_index * local
  g = (starts + np.arange(local)).ravel()
  mask = (g < len(examples)).astype(np.float32)
  index = np.where(mask > 0, g, 0)
  decode, augment = preprocess.build(ops)
  read = _decoded(decode, cached)
  table = tf.constant(examples.data)
  labels = tf.constant(examples.labels, tf.int32)

  def load(i, m):
    image = augment(read(examples.read(table, i)), tf.constant([0, 0], tf.int64))
    return {'image': image * m, 'label': tf.gather(labels, i) * tf.cast(m, tf.int32),
            'mask': m}

  ds = tf.data.Dataset.from_tensor_slices((index, mask)).map(load, num_parallel_calls=_AUTOTUNE)
  ds = _options(ds.batch(local).prefetch(max(prefetch, 1)))
  return ds.as_numpy_iterator()
