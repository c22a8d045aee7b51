r"""Input-pipeline throughput: training images/s per CPU core at 224 and 384 px.

  python -m bench.input_pipeline        # JPEG folder, JPEG tfds, Fashion-MNIST; memory + stream
  python -m bench.input_pipeline --sizes=384 --photo_size=500 --batches=20
  python -m bench.input_pipeline --sources=jpeg_tfds --modes=stream

Sources: a JPEG folder of real CIFAR-10 photos from ../shared/data upsampled to
`--photo_size` px (ImageNet-like decode cost), the same photos written as a tfds
dataset of JPEG records in 8 files, and the real Fashion-MNIST tfds dataset prepared
offline from ../shared/data; all in a temporary folder. tfds sources run both held in
memory and streamed from their files (`config.stream_threshold_gb` = 0), as ImageNet's
training split is. Each run uses the official training preprocessing (inception crop,
flip, [-1, 1]) with all cores and reports images/s divided by the cores this process
may use.
"""
import io
import os
import pathlib
import tempfile
import time

from absl import app, flags
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax_ft import data, defaults, memory
from vit_jax_ft.data import tfds_source

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'

_SIZES = flags.DEFINE_list('sizes', ['224', '384'], 'Crop sizes.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
_BATCHES = flags.DEFINE_integer('batches', 10, 'Timed batches (after 2 warm-up batches).')
_IMAGES = flags.DEFINE_integer('images', 400, 'Photos written to the JPEG folder.')
_PHOTO_SIZE = flags.DEFINE_integer('photo_size', 400, 'Side of the JPEG photos in px.')
_SOURCES = flags.DEFINE_list('sources', ['jpeg_folder', 'jpeg_tfds', 'fashion_mnist'],
                              'What to read.')
_MODES = flags.DEFINE_list('modes', ['memory', 'stream'], 'How tfds sources are read: held in '
                           'memory, or streamed from their files.')
_STREAMING = {'memory': 1e9, 'stream': 0.0}  # config.stream_threshold_gb of each mode.


def _photos():
  """(split, JPEG bytes, label) of the shared CIFAR-10 photos, upsampled."""
  cifar = np.load(SHARED_DATA / 'cifar10_partial.npz')
  for split, images, labels in (('train', cifar['x_train'], cifar['y_train']),
                                ('test', cifar['x_test'][:20], cifar['y_test'][:20])):
    for image, label in zip(images[:_IMAGES.value], labels):
      photo = Image.fromarray(image).resize((_PHOTO_SIZE.value,) * 2, Image.BICUBIC)
      encoded = io.BytesIO()
      photo.save(encoded, 'JPEG', quality=90)
      yield split, encoded.getvalue(), int(label)


def make_jpeg_folder(root: pathlib.Path) -> str:
  """ROOT/{train,test}/CLASS/*.jpg."""
  for i, (split, jpeg, label) in enumerate(_photos()):
    folder = root / split / f'class_{label}'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{i:05d}.jpg').write_bytes(jpeg)
  return str(root)


def make_jpeg_tfds(data_dir: pathlib.Path) -> str:
  """The photos as tfds dataset `bench_photos` of JPEG records in 8 files per split."""
  splits = {'train': ([], []), 'test': ([], [])}
  for split, jpeg, label in _photos():
    splits[split][0].append(jpeg)
    splits[split][1].append(label)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(num_classes=10)})
  tfds.dataset_builders.store_as_tfds_dataset(
      'bench_photos', '1.0.0', features,
      {split: tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
       for split, (images, labels) in splits.items()},
      data_dir=data_dir, download_config=tfds.download.DownloadConfig(num_shards=8))
  return str(data_dir)


def prepare_fashion_mnist(data_dir: pathlib.Path) -> str:
  tfds_source.get_builder('fashion_mnist', str(data_dir),
                          str(SHARED_DATA / 'fashion_mnist'))
  return str(data_dir)


def images_per_second(config) -> float:
  """Training images/s of `config` after two warm-up batches."""
  iterator = data.get_train_data(config, process_index=0, process_count=1)
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  return _BATCHES.value * config.batch / (time.perf_counter() - start)


def main(argv):
  memory.hide_gpus_from_tensorflow()
  del argv
  if not SHARED_DATA.is_dir():
    raise SystemExit(f'{SHARED_DATA} is absent: the benchmark needs its real images.')
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    runs = []  # (name, config keys)
    if 'jpeg_folder' in _SOURCES.value:
      runs.append(('jpeg_folder', dict(dataset=make_jpeg_folder(tmp / 'jpeg'))))
    tfds_sources = {
        'jpeg_tfds': lambda: dict(dataset='bench_photos',
                                  tfds_data_dir=make_jpeg_tfds(tmp / 'jpeg_tfds')),
        'fashion_mnist': lambda: dict(dataset='fashion_mnist',
                                      tfds_data_dir=prepare_fashion_mnist(tmp / 'tfds'))}
    for name, make in tfds_sources.items():
      if name in _SOURCES.value:
        keys = make()
        runs += [(f'{name}/{mode}', dict(keys, stream_threshold_gb=_STREAMING[mode]))
                 for mode in _MODES.value]
    print(f'{cores} CPU cores; batch {_BATCH.value}; JPEG photos {_PHOTO_SIZE.value} px, '
          'Fashion-MNIST 28 px PNG; official train preprocessing')
    for name, keys in runs:
      for size in map(int, _SIZES.value):
        config = defaults.get_config()
        config.update(keys)
        config.batch, config.pp.crop = _BATCH.value, size
        rate = images_per_second(config)
        print(f'{name:20s} {size:4d} px: {rate:8.1f} images/s, {rate / cores:7.1f} per core')


if __name__ == '__main__':
  app.run(main)
