"""Where the records of a split of `config.dataset` come from: memory, or streamed from its files.

Folders, and tfds splits below `config.stream_threshold_gb`, are held in memory (encoded
images or paths, decoded once with `config.cache`; `memory.py`); larger tfds splits are
streamed from their record files (`stream.py`). The threshold decides per split.
"""
import functools
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax_ft.data import folder, memory, preprocess, sampling, stream, tfds_source
from vit_jax_ft.data.examples import Examples

CORRUPT_IMAGE_MODES = ('skip', 'error')


class Source(Protocol):
  """A split as records and how one becomes (image, label): `memory.InMemory`, `stream.Streamed`."""
  carry: Tuple[str, ...]  # Record keys that say which example it is (to name a failed one).
  class_names: List[str]
  num_examples: int
  class_counts: Optional[List[int]]  # Training examples per class and epoch; None: unknown.
  num_corrupt: Optional[int]  # Images left out of the split as read; None: unknown.

  def epoch_size(self, process_count: int) -> int: ...  # Training examples per epoch.
  # Batches of this host's records: {'position', and what `read` needs}, `local` each.
  def train_records(self, start_step: int, global_batch: int, process_index: int,
                    process_count: int) -> tf.data.Dataset: ...
  # As many batches on every host, each up to `local` records (short or empty: padding).
  def eval_records(self, global_batch: int, process_index: int,
                   process_count: int) -> tf.data.Dataset: ...
  def read(self, record: Dict[str, tf.Tensor], decode: preprocess.Op
           ) -> Tuple[tf.Tensor, tf.Tensor]: ...  # The record's uint8 image and label.
  def name(self, carried: Dict[str, np.ndarray], slot: int) -> str: ...  # For logs.
  def weights(self) -> Optional[Callable[[Dict[str, np.ndarray]], np.ndarray]]: ...


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
  return tfds_source.load_split(_builder(dataset, data_dir, manual_dir, download), split,
                                on_corrupt)


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


def _train_order(config: ml_collections.ConfigDict, examples: Examples) -> sampling.TrainOrder:
  """The training stream of `config`: its subset, rebalancing and per-epoch order."""
  num_classes = len(examples.class_names)
  kept = sampling.select(examples.labels, num_classes, config.train_fraction,
                         config.train_per_class, config.seed)
  return sampling.TrainOrder(kept, examples.labels, num_classes, config.seed,
                             config.balance, config.balance_target)


def get_source(config: ml_collections.ConfigDict, split: str, train: bool) -> Source:
  """The records of `split`, read for training (with its order) or for evaluation."""
  if streams(config, split):
    _check_streamable(config, split, train)
    return stream.Streamed(_tfds_builder(config), split, config.seed, config.shuffle_buffer)
  examples = load_split(config, split)
  if config.cache:
    decode_spec = preprocess.default_ops(config, train).split('|')[0]
    examples = memory.cached(examples, decode_spec, config.on_corrupt_image,
                             f'{config.dataset} split {split}')
  return memory.InMemory(examples, _train_order(config, examples) if train else None)


def class_counts(labels: np.ndarray, num_classes: int) -> List[int]:
  """Examples per class."""
  return np.bincount(labels, minlength=num_classes).tolist()
