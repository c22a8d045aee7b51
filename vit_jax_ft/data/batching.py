"""Host batches that keep every example in its slot, even when its image fails to decode.

Each host batch is decoded as its own small dataset: an image that fails (to decode or
to preprocess) is dropped there (`ignore_errors`) and the others are scattered back to
their slots, with `ok` marking the decoded ones. Later examples never shift into a
failed one's slot, so the stream's positions, resumption and the split over hosts stay
exact. Missing slots of a short batch (evaluation padding) come out as zeros with
`ok` = 0 and `failed` = 0.
"""
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

Batch = Dict[str, np.ndarray]
AUTOTUNE = tf.data.AUTOTUNE
# Host batches decoded at the same time; each decodes its images in parallel.
_BATCHES_IN_FLIGHT = 2


def with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Deterministic order whatever the parallelism; autotuned buffers."""
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return ds.with_options(options)


def empty(spec) -> tf.Tensor:
  """A batch of no elements of `spec` (unknown sizes as 0)."""
  return tf.zeros([0] + [d or 0 for d in spec.shape.as_list()], spec.dtype)


def decode_in_slots(sources: tf.data.Dataset, load: Callable[[Dict[str, tf.Tensor]],
                                                             Dict[str, tf.Tensor]],
                    local: int, carry: Tuple[str, ...] = ()) -> tf.data.Dataset:
  """Batches of up to `local` sources to batches of `local` loaded examples, `ok` and `failed`.

  `load` maps one source (a dict) to the example's tensors; `carry` names source
  keys passed through unchanged (to name a failed example, say).
  """
  loaded_spec = sources.unbatch().map(load).element_spec

  def decode_batch(batch):
    count = tf.shape(next(iter(batch.values())))[0]
    slots = tf.data.Dataset.from_tensor_slices((tf.range(count), batch))
    decoded = slots.map(lambda slot, source: (slot, load(source)),
                        num_parallel_calls=AUTOTUNE, deterministic=True)
    decoded = decoded.ignore_errors().batch(local)  # One batch, or none if all failed.
    nothing = tf.data.Dataset.from_tensors(
        (tf.zeros([0], tf.int32), {k: empty(s) for k, s in loaded_spec.items()}))
    return decoded.concatenate(nothing).take(1).map(
        lambda slot, examples: _scatter(slot, examples, batch, count, local, carry))

  return sources.interleave(decode_batch, cycle_length=_BATCHES_IN_FLIGHT, block_length=1,
                            num_parallel_calls=_BATCHES_IN_FLIGHT, deterministic=True)


def _scatter(slot: tf.Tensor, examples: Dict[str, tf.Tensor], sources: Dict[str, tf.Tensor],
             count: tf.Tensor, local: int, carry: Tuple[str, ...]) -> Dict[str, tf.Tensor]:
  def to_slots(values, at):
    return tf.scatter_nd(at[:, None], values, tf.concat([[local], tf.shape(values)[1:]], 0))
  out = {k: to_slots(v, slot) for k, v in examples.items()}
  out.update({k: to_slots(sources[k], tf.range(count)) for k in carry})
  out['ok'] = to_slots(tf.ones_like(slot, tf.float32), slot)
  out['failed'] = to_slots(tf.ones([count], tf.float32), tf.range(count)) > out['ok']
  return out


class DecodeFailures:
  """Images that failed: each is logged and counted once (not again each epoch), or stops the
  run ('error')."""

  def __init__(self, on_corrupt: str, consequence: str):
    self.on_corrupt = on_corrupt
    self.consequence = consequence  # What the log says happened to a failed example.
    self.names: List[str] = []  # Distinct failed images, in the order found.
    self._known: Set[str] = set()
    self._taken = 0  # How many of `names` `take_new` has returned.

  @property
  def count(self) -> int:
    """Distinct images that failed so far."""
    return len(self.names)

  def check(self, failed: np.ndarray, names: Callable[[np.ndarray], Iterable[str]]) -> None:
    """Logs or raises for the slots where `failed`; `names(slots)` says which images they are."""
    if not failed.any():
      return
    bad: List[str] = list(names(np.flatnonzero(failed)))
    if failed.all() and failed.size > 1:
      raise ValueError(f'Every image of a batch failed to decode or preprocess ({bad[0]}, '
                       '...): the preprocessing ops probably do not fit the images (a crop '
                       'larger than they are?); check config.pp. Otherwise the data is broken.')
    if self.on_corrupt == 'error':
      raise ValueError(f'Cannot decode or preprocess the image of {bad[0]}. Remove or repair '
                       "it, or set config.on_corrupt_image='skip' to give it weight 0 and go on.")
    new = list(dict.fromkeys(n for n in bad if n not in self._known))
    if not new:  # Seen in an earlier epoch: weight 0 again, already logged and counted.
      return
    self._known.update(new)
    self.names.extend(new)
    logging.warning('Cannot decode or preprocess the image of %s; %s (%d such images so far).',
                    ', '.join(new), self.consequence, self.count)

  def take_new(self) -> List[str]:
    """The failed images found since the last call."""
    new, self._taken = self.names[self._taken:], len(self.names)
    return new


class HostBatches:
  """An iterator of host batches that keeps the `DecodeFailures` its images report to."""

  def __init__(self, batches: Iterator[Batch], failures: DecodeFailures):
    self._batches = batches
    self.failures = failures

  def __iter__(self) -> 'HostBatches':
    return self

  def __next__(self) -> Batch:
    return next(self._batches)


def numpy_batches(ds: tf.data.Dataset, carry: Tuple[str, ...], failures: DecodeFailures,
                  name_of: Callable[[Dict[str, np.ndarray], int], str], ok_key: str,
                  weight_of: Optional[Callable[[Dict[str, np.ndarray]], np.ndarray]] = None
                  ) -> Iterator[Batch]:
  """The batches of `decode_in_slots` as numpy, `ok` renamed `ok_key` (times `weight_of`).

  Failed images are reported to `failures`, named by `name_of(carried, slot)`; the
  carried keys are dropped from the batch.
  """
  for batch in ds.as_numpy_iterator():
    carried = {k: batch.pop(k) for k in carry}
    failures.check(batch.pop('failed'), lambda slots: (name_of(carried, s) for s in slots))
    ok = batch.pop('ok')
    batch[ok_key] = ok if weight_of is None else ok * weight_of(carried)
    yield batch
  if failures.count:  # A finite pass (an evaluation) ended.
    logging.warning('In all, %d image(s) of this pass failed to decode or preprocess.',
                    failures.count)
