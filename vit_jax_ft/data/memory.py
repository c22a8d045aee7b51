"""Splits held in memory (encoded, as paths, or decoded by config.cache) as a source of records.

Stream position `g` (the g-th example of the run, over all hosts) fixes both the example
(`TrainOrder.indices`) and its augmentation seed `(seed, g)`, so a run resumed at
step k, or spread over another number of hosts, sees the same global batches.
Evaluation batch `j` holds examples `j * global_batch ...` in split order; each host
takes its part of it.
"""
import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from vit_jax_ft.data import preprocess
from vit_jax_ft.data.batching import AUTOTUNE
from vit_jax_ft.data.examples import Examples
from vit_jax_ft.data.sampling import TrainOrder

_CACHE_BATCH = 1024


@functools.lru_cache(maxsize=2)
def cached(examples: Examples, decode_spec: str, on_corrupt: str, where: str) -> Examples:
  """The examples decoded once by `decode_spec` and kept as serialized uint8 tensors.

  Images that fail to decode are left out, named and counted (`Examples.keep`).
  """
  decode = preprocess.build(decode_spec)[0]
  ds = tf.data.Dataset.range(len(examples)).map(
      lambda i: (i, tf.io.serialize_tensor(decode(examples.read(i), None))),
      num_parallel_calls=AUTOTUNE, deterministic=True)
  data = np.full(len(examples), b'', dtype=object)
  ok = np.zeros(len(examples), bool)
  for index, serialized in ds.ignore_errors().batch(_CACHE_BATCH).as_numpy_iterator():
    data[index], ok[index] = list(serialized), True
  channels = tf.data.Dataset.from_tensors('').map(lambda x: decode(x, None)).element_spec
  decoded = dataclasses.replace(examples, is_path=False, channels=channels.shape[-1])
  return decoded.keep(ok, 'do not decode', on_corrupt, where, data=data)


@dataclasses.dataclass(frozen=True, eq=False)
class InMemory:
  """Records of a split held in memory: {'index', 'position'}; `order` is the training stream."""
  examples: Examples
  order: Optional[TrainOrder] = None  # Training only.
  carry: Tuple[str, ...] = ('index',)

  @property
  def class_names(self) -> List[str]:
    return list(self.examples.class_names)

  @property
  def num_examples(self) -> int:
    return len(self.examples)

  def epoch_size(self, process_count: int) -> int:
    """Training examples per epoch, whatever the number of hosts."""
    del process_count
    return self.order.epoch_size

  @property
  def class_counts(self) -> Optional[List[int]]:
    return None if self.order is None else self.order.class_counts.tolist()

  @property
  def num_corrupt(self) -> Optional[int]:
    return len(self.examples.corrupt)

  def train_records(self, start_step: int, global_batch: int, process_index: int,
                    process_count: int) -> tf.data.Dataset:
    """This host's part of each global batch from `start_step` on, forever."""
    local = global_batch // process_count

    def positions_and_indices(step: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
      g = step * global_batch + process_index * local + np.arange(local, dtype=np.int64)
      return g, self.order.indices(g)

    def records(step):
      # Not `from_generator`: its op fixes glibc's mmap threshold at 128 KiB for the whole
      # process (TF's Python 3.11 patch), so every XLA buffer above it is mapped and
      # page-faulted afresh on each step (measured: twice the page faults of the step).
      position, index = tf.numpy_function(positions_and_indices, [step],
                                          (tf.int64, tf.int64), stateful=False)
      return {'index': tf.ensure_shape(index, [local]),
              'position': tf.ensure_shape(position, [local])}

    return tf.data.Dataset.counter(start_step).map(records)

  def eval_records(self, global_batch: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    """This host's part of each global batch over the split once; the last ones are short."""
    local = global_batch // process_count
    num_batches = -(-len(self.examples) // global_batch)
    starts = np.arange(num_batches) * global_batch + process_index * local
    index = starts[:, None] + np.arange(local)
    count = np.clip(len(self.examples) - starts, 0, local)  # Real examples lead each batch.
    return tf.data.Dataset.from_tensor_slices((index, count)).map(
        lambda i, n: {'index': i[:n], 'position': tf.zeros_like(i[:n])})

  def read(self, record: Dict[str, tf.Tensor], decode: preprocess.Op
           ) -> Tuple[tf.Tensor, tf.Tensor]:
    """The (uint8 image, label) of a record."""
    index = record['index']
    return self.examples.image(index, decode), tf.gather(self.examples.label_table, index)

  def name(self, carried: Dict[str, np.ndarray], slot: int) -> str:
    return self.examples.name(carried['index'][slot])

  def weights(self) -> Optional[Callable[[Dict[str, np.ndarray]], np.ndarray]]:
    """Per-example loss weights of carried records (`balance='loss_weights'`), else None."""
    class_weights = None if self.order is None else self.order.weights(
        np.arange(len(self.examples)))
    if class_weights is None:
      return None
    return lambda carried: class_weights[carried['index']]
