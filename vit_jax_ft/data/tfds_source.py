"""tfds splits read into memory still encoded, and preparation that never hangs offline.

Records whose image is not an image by its first bytes are left out of a split read
into memory, named and counted (`Examples.keep`).
"""
import os
from typing import List, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax_ft.data import examples

_READ_BATCH = 4096


class DatasetNotPreparedError(RuntimeError):
  """A tfds dataset that is not in `data_dir` and may not be downloaded."""


def how_to_prepare(name: str, data_dir: Optional[str]) -> str:
  """The commands that prepare `name` offline or online."""
  data_dir_flag = f' --config.tfds_data_dir={data_dir}' if data_dir else ''
  return (f'Prepare it once with\n'
          f'  python -m vit_jax_ft.data --prepare --config.dataset={name}{data_dir_flag} '
          f'--config.tfds_manual_dir=DIR_WITH_THE_ORIGINAL_FILES\n'
          f'or allow downloading with --config.tfds_download=True (needs internet), or point '
          f'config.tfds_data_dir at a folder where it is prepared.')


def get_builder(name: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                download: bool = False) -> tfds.core.DatasetBuilder:
  """The builder of a prepared dataset; prepares it from `manual_dir`, or downloads if allowed."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # DatasetNotFoundError, or a name that cannot be one.
    raise ValueError(f'config.dataset={name!r} is neither a folder nor a tfds dataset name '
                     '(see https://www.tensorflow.org/datasets/catalog).') from e
  if builder.is_prepared():
    return builder
  if manual_dir:
    _check_manual_dir(builder, manual_dir)
  elif not download:
    raise DatasetNotPreparedError(
        f'tfds dataset {name!r} is not prepared in {builder.data_dir} and '
        f'config.tfds_download is False. {how_to_prepare(name, data_dir)}')
  logging.info('Preparing tfds dataset %s in %s', name, builder.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=download))
  return builder


def _check_manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: str) -> None:
  """Fails now, not after minutes of retries, when `manual_dir` lacks a file the builder needs."""
  wanted = sorted({info.filename for info in (builder.url_infos or {}).values()
                   if info.filename})
  missing = [f for f in wanted if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
  if missing:
    raise DatasetNotPreparedError(
        f'config.tfds_manual_dir={manual_dir!r} lacks {missing} needed to prepare '
        f'{builder.name!r} offline (expected: {wanted}). Put the original files there, or '
        'allow downloading with --config.tfds_download=True (needs internet).')


def class_names(builder: tfds.core.DatasetBuilder) -> List[str]:
  """The label names of an image classification dataset (`image` and `label` features)."""
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(f'tfds dataset {builder.name!r} has features {list(features)}; '
                     'image classification needs `image` and `label`.')
  return list(features['label'].names)


def split_info(builder: tfds.core.DatasetBuilder, split: str):
  """The `SplitInfo` of `split` (slicing allowed): its examples and their files."""
  if not builder.info.splits:
    raise ValueError(f'tfds dataset {builder.name!r} has no split metadata (mock or '
                     'unprepared data), so it cannot be streamed from its files; hold it in '
                     'memory instead (raise config.stream_threshold_gb).')
  try:
    return builder.info.splits[split]
  except (ValueError, KeyError) as e:
    raise ValueError(f'Split {split!r} of {builder.name!r} cannot be read ({e}). Splits: '
                     f'{", ".join(builder.info.splits)}; slicing such as `train[:98%]` is '
                     'allowed.') from e


def split_num_bytes(builder: tfds.core.DatasetBuilder, split: str) -> Optional[float]:
  """Encoded size of `split` (slicing allowed) from the metadata; None when unknown."""
  splits = builder.info.splits
  total_bytes = sum(s.num_bytes for s in splits.values())
  total_examples = sum(s.num_examples for s in splits.values())
  if not total_bytes or not total_examples:
    return None
  return split_info(builder, split).num_examples * total_bytes / total_examples


def load_split(builder: tfds.core.DatasetBuilder, split: str, on_corrupt: str = 'skip'
               ) -> examples.Examples:
  """All examples of `split` (slicing allowed) as encoded image bytes and labels."""
  names = class_names(builder)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  except (ValueError, KeyError) as e:
    splits = ', '.join(builder.info.splits) or 'see the tfds catalog'
    raise ValueError(f'Split {split!r} of {builder.name!r} cannot be read ({e}). '
                     f'Splits: {splits}; slicing such as `train[:98%]` is allowed.') from e
  data, labels = [], []
  for images, batch_labels in ds.map(lambda x: (x['image'], x['label'])).batch(
      _READ_BATCH).as_numpy_iterator():
    data.append(images)
    labels.append(batch_labels)
  if not data:
    raise ValueError(f'Split {split!r} of {builder.name!r} is empty.')
  data = np.concatenate(data).astype(object)
  logging.info('Read %s[%s]: %d examples, %d classes, %.0f MB of encoded images held in memory',
               builder.name, split, len(data), len(names), sum(map(len, data)) / 2**20)
  split_examples = examples.Examples(data, np.concatenate(labels).astype(np.int64), names)
  ok = np.array([examples.is_image(image[:8]) for image in data], bool)
  return split_examples.keep(ok, 'are not images (by their first bytes)', on_corrupt,
                             f'{builder.name} split {split}')
