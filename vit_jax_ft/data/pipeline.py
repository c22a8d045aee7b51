"""The one data path: a split's records ─► decoded, augmented images in their slots ─► host batches.

  info = data.get_dataset_info(config)
  train_iter = data.get_train_data(config, start_step=step)   # infinite, resumable
  eval_iter = data.get_eval_data(config)                      # padded, `mask` marks real examples

`sources.get_source` says where a split's records come from (held in memory or
streamed from its files) and which records make up this host's part of each global
batch; everything after that is the same for every source: each record is read and
decoded, augmented with a seed from its stream position, and put in its batch slot
(`batching.decode_in_slots`), so an image that fails leaves a slot of weight or mask 0;
the iterators' `failures` name those images (`decode_failures.py` counts them).
"""
import dataclasses
from typing import List, Optional, Tuple

import jax
import ml_collections
import tensorflow as tf

from vit_jax_ft import parallel
from vit_jax_ft.data import batching, preprocess, sources


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the logs need to know about the data actually used."""
  num_classes: int
  class_names: List[str]
  num_train: int  # Examples per epoch after split, fraction, per-class and rebalancing.
  num_test: int
  train_class_counts: Optional[List[int]]  # Per class, per epoch; None when streamed.
  # Corrupt images of each split: those left out when it was read (not images by their first
  # bytes, or with config.cache not decodable; None when streamed: unknown), plus those found
  # when decoded during the run, over all hosts (`decode_failures.py`). Each is named in
  # the log; the second kind also by name here.
  num_train_corrupt: Optional[int] = None
  num_test_corrupt: Optional[int] = None
  train_decode_failures: List[str] = dataclasses.field(default_factory=list)
  test_decode_failures: List[str] = dataclasses.field(default_factory=list)


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes and example counts of the training stream and the test split."""
  train = sources.get_source(config, config.pp.train, train=True)
  test = sources.get_source(config, config.pp.test, train=False)
  return DatasetInfo(num_classes=len(train.class_names), class_names=train.class_names,
                     num_train=train.epoch_size(jax.process_count()),
                     num_test=test.num_examples, train_class_counts=train.class_counts,
                     num_train_corrupt=train.num_corrupt, num_test_corrupt=test.num_corrupt)


def _processes(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
  process_count = jax.process_count() if process_count is None else process_count
  process_index = jax.process_index() if process_index is None else process_index
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  return process_index, process_count


def get_train_data(config: ml_collections.ConfigDict, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> batching.HostBatches:
  """Infinite iterator of this host's numpy batches: image, label, weight; resumable.

  `weight` is the example's loss weight: its class weight (`balance='loss_weights'`)
  or 1, and 0 where its image failed to decode.
  """
  process_index, process_count = _processes(process_index, process_count)
  local = parallel.check_batch_size(config.batch, 'batch', process_count=process_count)
  source = sources.get_source(config, config.pp.train, train=True)
  records = source.train_records(start_step, config.batch, process_index, process_count)
  return _host_batches(config, source, records, local, train=True)


def get_eval_data(config: ml_collections.ConfigDict, split: Optional[str] = None,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> batching.HostBatches:
  """Finite iterator of this host's part of padded global eval batches (image, label, mask).

  Every host yields the same number of batches; over all hosts each example of the
  split comes out once with mask 1 (0 where its image failed to decode).
  """
  process_index, process_count = _processes(process_index, process_count)
  local = parallel.check_batch_size(config.batch_eval, 'batch_eval',
                                    process_count=process_count)
  split = split or config.pp.test
  source = sources.get_source(config, split, train=False)
  records = source.eval_records(config.batch_eval, process_index, process_count)
  return _host_batches(config, source, records, local, train=False)


def _host_batches(config: ml_collections.ConfigDict, source: sources.Source,
                  records: tf.data.Dataset, local: int, train: bool) -> batching.HostBatches:
  """Batches of up to `local` records to numpy batches of `local` examples in their slots."""
  decode, augment = preprocess.build(preprocess.default_ops(config, train))
  seed = config.seed if train else 0

  def load(record):
    image, label = source.read(record, decode)
    image = augment(image, tf.stack([tf.constant(seed, tf.int64), record['position']]))
    return {'image': image, 'label': label}

  ds = batching.decode_in_slots(records, load, local, source.carry)
  ds = batching.with_options(ds.prefetch(max(config.prefetch, 1)))
  failures = batching.DecodeFailures(
      config.on_corrupt_image,
      'its weight is 0 in its batch' if train else 'it is left out of the evaluation')
  return batching.HostBatches(batching.numpy_batches(
      ds, source.carry, failures, source.name, 'weight' if train else 'mask', source.weights()),
      failures)
