"""Input pipeline: tfds datasets and image folders, the paper's preprocessing, per-host batches.

  info = data.get_dataset_info(config)
  train_iter = data.get_train_data(config, start_step=step)   # infinite, resumable
  eval_iter = data.get_eval_data(config)                      # padded, `mask` marks real examples

Folders and tfds splits below `config.stream_threshold_gb` are held in memory (encoded
images or paths; `pipeline.py`); larger tfds splits are streamed from their files
(`stream.py`). The threshold decides per split.
"""
import dataclasses
import functools
from typing import Iterator, List, Optional

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vit_jax_ft.data import folder, pipeline, preprocess, sampling, stream, tfds_source
from vit_jax_ft.data.batching import Batch
from vit_jax_ft.data.examples import Examples

CORRUPT_IMAGE_MODES = ('skip', 'error')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the logs need to know about the data actually used."""
  num_classes: int
  class_names: List[str]
  num_train: int  # Examples per epoch after split, fraction, per-class and rebalancing.
  num_test: int
  train_class_counts: Optional[List[int]]  # Per class, per epoch; None when streamed.


def _check(config: ml_collections.ConfigDict) -> None:
  if not config.dataset:
    raise ValueError('config.dataset is empty; set a tfds name (cifar10) or a folder '
                     'ROOT/{train,test}/CLASS/*.jpg.')
  if config.on_corrupt_image not in CORRUPT_IMAGE_MODES:
    raise ValueError(f'config.on_corrupt_image={config.on_corrupt_image!r}; '
                     f'allowed: {CORRUPT_IMAGE_MODES}.')


@functools.lru_cache(maxsize=4)
def _builder(dataset: str, data_dir: Optional[str], manual_dir: Optional[str],
             download: bool) -> tfds.core.DatasetBuilder:
  return tfds_source.get_builder(dataset, data_dir, manual_dir, download)


def _tfds_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  return _builder(config.dataset, config.tfds_data_dir, config.tfds_manual_dir,
                  bool(config.tfds_download))


@functools.lru_cache(maxsize=4)
def _load(dataset: str, split: str, data_dir: Optional[str], manual_dir: Optional[str],
          download: bool, test_fraction: float, split_seed: int, on_corrupt: str) -> Examples:
  if folder.is_folder(dataset):
    return folder.load_split(dataset, split, test_fraction, split_seed, on_corrupt)
  return tfds_source.load_split(_builder(dataset, data_dir, manual_dir, download), split)


def load_split(config: ml_collections.ConfigDict, split: str) -> Examples:
  """A split of `config.dataset` in memory (encoded images or paths), cached per process."""
  _check(config)
  return _load(config.dataset, split, config.tfds_data_dir, config.tfds_manual_dir,
               bool(config.tfds_download), float(config.folder_test_fraction),
               int(config.folder_split_seed), config.on_corrupt_image)


def streams(config: ml_collections.ConfigDict, split: str) -> bool:
  """Whether `split` is streamed from its files: a tfds split of at least the threshold.

  `config.stream_threshold_gb` (encoded size from the tfds metadata): 0 streams
  every tfds split; folders, and splits of unknown size below it, stay in memory.
  """
  _check(config)
  if folder.is_folder(config.dataset):
    return False
  threshold = float(config.stream_threshold_gb)
  size = tfds_source.split_num_bytes(_tfds_builder(config), split) or 0
  return size >= threshold * 2**30


def _check_streamable(config: ml_collections.ConfigDict, split: str, train: bool) -> None:
  """Options that need every label, or the split in memory, cannot apply to a streamed one."""
  needs_memory = {'cache': config.cache}
  if train:
    needs_memory.update(train_fraction=config.train_fraction != 1,
                        train_per_class=config.train_per_class, balance=config.balance)
  used = [f'config.{k}' for k, v in needs_memory.items() if v]
  if used:
    raise ValueError(f'{", ".join(used)}: only for splits held in memory, and split '
                     f'{split!r} is streamed (its size reaches config.stream_threshold_gb). '
                     'Raise the threshold, or slice the split (`train[:10%]`) instead of '
                     'config.train_fraction.')


def train_order(config: ml_collections.ConfigDict, examples: Examples) -> sampling.TrainOrder:
  """The training stream of `config`: its subset, rebalancing and per-epoch order."""
  num_classes = len(examples.class_names)
  kept = sampling.select(examples.labels, num_classes, config.train_fraction,
                         config.train_per_class, config.seed)
  return sampling.TrainOrder(kept, examples.labels, num_classes, config.seed,
                             config.balance, config.balance_target)


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes and example counts of the training stream and the test split."""
  if streams(config, config.pp.train):
    _check_streamable(config, config.pp.train, train=True)
    builder = _tfds_builder(config)
    names = tfds_source.class_names(builder)
    num_train = stream.epoch_size(builder, config.pp.train, jax.process_count())
    counts = None
  else:
    train = load_split(config, config.pp.train)
    order = train_order(config, train)
    names, num_train = list(train.class_names), order.epoch_size
    counts = order.class_counts.tolist()
  if streams(config, config.pp.test):
    num_test = tfds_source.split_info(_tfds_builder(config), config.pp.test).num_examples
  else:
    num_test = len(load_split(config, config.pp.test))
  return DatasetInfo(num_classes=len(names), class_names=names, num_train=num_train,
                     num_test=num_test, train_class_counts=counts)


def _processes(process_index: Optional[int], process_count: Optional[int]):
  process_count = jax.process_count() if process_count is None else process_count
  process_index = jax.process_index() if process_index is None else process_index
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  return process_index, process_count


@functools.lru_cache(maxsize=2)
def _cached(examples: Examples, decode_spec: str, skip_corrupt: bool) -> Examples:
  return pipeline.cached_table(examples, preprocess.build(decode_spec)[0], skip_corrupt)


def _maybe_cached(config: ml_collections.ConfigDict, examples: Examples, ops: str) -> Examples:
  if not config.cache:
    return examples
  return _cached(examples, ops.split('|')[0], config.on_corrupt_image == 'skip')


def get_train_data(config: ml_collections.ConfigDict, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[Batch]:
  """Infinite iterator of this host's numpy batches: image, label, weight; resumable."""
  process_index, process_count = _processes(process_index, process_count)
  ops = preprocess.default_ops(config.pp, train=True)
  if streams(config, config.pp.train):
    _check_streamable(config, config.pp.train, train=True)
    return stream.train_batches(
        _tfds_builder(config), config.pp.train, ops, seed=config.seed,
        global_batch=config.batch, start_step=start_step, process_index=process_index,
        process_count=process_count, shuffle_buffer=config.shuffle_buffer,
        on_corrupt=config.on_corrupt_image, prefetch=config.prefetch)
  examples = _maybe_cached(config, load_split(config, config.pp.train), ops)
  return pipeline.train_batches(
      examples, train_order(config, examples), ops, seed=config.seed,
      global_batch=config.batch, start_step=start_step, process_index=process_index,
      process_count=process_count, cached=bool(config.cache),
      on_corrupt=config.on_corrupt_image, prefetch=config.prefetch)


def get_eval_data(config: ml_collections.ConfigDict, split: Optional[str] = None,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[Batch]:
  """Finite iterator of this host's part of padded global eval batches (image, label, mask)."""
  process_index, process_count = _processes(process_index, process_count)
  split = split or config.pp.test
  ops = preprocess.default_ops(config.pp, train=False)
  if streams(config, split):
    _check_streamable(config, split, train=False)
    return stream.eval_batches(
        _tfds_builder(config), split, ops, global_batch=config.batch_eval,
        process_index=process_index, process_count=process_count,
        on_corrupt=config.on_corrupt_image, prefetch=config.prefetch)
  examples = load_split(config, split)
  return pipeline.eval_batches(
      _maybe_cached(config, examples, ops), ops, global_batch=config.batch_eval,
      process_index=process_index, process_count=process_count, cached=bool(config.cache),
      on_corrupt=config.on_corrupt_image, prefetch=config.prefetch)


def class_counts(labels: np.ndarray, num_classes: int) -> List[int]:
  """Examples per class."""
  return np.bincount(labels, minlength=num_classes).tolist()


__all__ = ['Batch', 'DatasetInfo', 'Examples', 'class_counts', 'get_dataset_info',
           'get_eval_data', 'get_train_data', 'load_split', 'streams', 'train_order']
