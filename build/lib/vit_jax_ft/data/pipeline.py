"""tf.data pipelines over in-memory splits: each host decodes only its share of each global batch.

Stream position `g` (the g-th example of the run, over all hosts) fixes both the example
(`TrainOrder.indices`) and its augmentation seed `(seed, g)`, so a run resumed at
step k, or spread over another number of hosts, sees the same global batches.
"""
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from vit_jax_ft.data import batching, preprocess
from vit_jax_ft.data.batching import AUTOTUNE, Batch
from vit_jax_ft.data.examples import Examples
from vit_jax_ft.data.sampling import TrainOrder


def cached_table(examples: Examples, decode: preprocess.Op, skip_corrupt: bool = True) -> Examples:
  """The examples decoded once and kept as serialized uint8 tensors (config.cache)."""
  ds = tf.data.Dataset.range(len(examples)).map(
      lambda i: (i, tf.io.serialize_tensor(decode(examples.read(i), None))),
      num_parallel_calls=AUTOTUNE)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  index, data = map(np.concatenate, zip(*ds.batch(1024).as_numpy_iterator()))
  return Examples(data.astype(object), examples.labels[index], examples.class_names)


def _decoded(decode: preprocess.Op, cached: bool) -> Callable[[tf.Tensor], tf.Tensor]:
  if cached:
    return lambda data: tf.ensure_shape(tf.io.parse_tensor(data, tf.uint8), [None, None, 3])
  return lambda data: decode(data, None)


def _loader(examples: Examples, ops: str, cached: bool, seed: int
            ) -> Callable[[dict], dict]:
  """Source {'index', 'position'} to {'image', 'label'}; augmentation seeded by position."""
  decode, augment = preprocess.build(ops)
  read = _decoded(decode, cached)
  labels = tf.constant(examples.labels, tf.int32)

  def load(source):
    image = augment(read(examples.read(source['index'])),
                    tf.stack([tf.constant(seed, tf.int64), source['position']]))
    return {'image': image, 'label': tf.gather(labels, source['index'])}
  return load


def train_batches(examples: Examples, order: TrainOrder, ops: str, *, seed: int,
                  global_batch: int, start_step: int, process_index: int,
                  process_count: int, cached: bool = False, on_corrupt: str = 'skip',
                  prefetch: int = 2) -> Iterator[Batch]:
  """Infinite iterator of this host's part of each global batch, from `start_step` on.

  `weight` is the example's loss weight: its class weight (`balance='loss_weights'`)
  or 1, and 0 where its image failed to decode.
  """
  local = batching.host_batch_size(global_batch, process_count, 'batch')

  def sources():
    step = start_step
    while True:
      g = step * global_batch + process_index * local + np.arange(local, dtype=np.int64)
      yield {'index': order.indices(g), 'position': g}
      step += 1

  spec = {'index': tf.TensorSpec([local], tf.int64), 'position': tf.TensorSpec([local], tf.int64)}
  ds = tf.data.Dataset.from_generator(sources, output_signature=spec)
  ds = batching.decode_in_slots(ds, _loader(examples, ops, cached, seed), local, ('index',))
  ds = batching.with_options(ds.prefetch(max(prefetch, 1)))
  class_weights = order.weights(np.arange(len(examples)))
  return batching.numpy_batches(
      ds, ('index',), batching.DecodeFailures(on_corrupt, 'its weight is 0 in its batch'),
      lambda carried, slot: examples.name(carried['index'][slot]), 'weight',
      None if class_weights is None else lambda carried: class_weights[carried['index']])


def eval_batches(examples: Examples, ops: str, *, global_batch: int, process_index: int,
                 process_count: int, cached: bool = False, on_corrupt: str = 'skip',
                 prefetch: int = 2) -> Iterator[Batch]:
  """This host's part of each padded global eval batch; `mask` is 0 on padding."""
  local = batching.host_batch_size(global_batch, process_count, 'batch_eval')
  num_batches = -(-len(examples) // global_batch)
  starts = np.arange(num_batches) * global_batch + process_index * local
  index = starts[:, None] + np.arange(local)
  count = np.clip(len(examples) - starts, 0, local)  # Real examples lead each host batch.
  ds = tf.data.Dataset.from_tensor_slices((index, count)).map(
      lambda i, n: {'index': i[:n], 'position': tf.zeros_like(i[:n])})
  ds = batching.decode_in_slots(ds, _loader(examples, ops, cached, seed=0), local, ('index',))
  ds = batching.with_options(ds.prefetch(max(prefetch, 1)))
  return batching.numpy_batches(
      ds, ('index',), batching.DecodeFailures(on_corrupt, 'it is left out of the evaluation'),
      lambda carried, slot: examples.name(carried['index'][slot]), 'mask')
