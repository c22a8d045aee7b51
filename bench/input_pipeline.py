r"""Input-pipeline throughput: training images/s per CPU core at 224 and 384 px.

  python -m bench.input_pipeline                         # JPEG folder + tfds Fashion-MNIST
  python -m bench.input_pipeline --sizes=384 --photo_size=500 --batches=20

Sources: a JPEG folder of real CIFAR-10 photos from ../shared/data upsampled to
`--photo_size` px (ImageNet-like decode cost), and the real Fashion-MNIST tfds dataset
prepared offline from ../shared/data into a temporary data_dir. Each run uses the
official training preprocessing (inception crop, flip, [-1, 1]) with all cores and
reports images/s divided by the cores this process may use.
"""
import os
import pathlib
import tempfile
import time

from absl import app, flags
import numpy as np
from PIL import Image

from configs import common
from vit_jax_ft import data
from vit_jax_ft.data import tfds_source

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'

_SIZES = flags.DEFINE_list('sizes', ['224', '384'], 'Crop sizes.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
_BATCHES = flags.DEFINE_integer('batches', 10, 'Timed batches (after 2 warm-up batches).')
_IMAGES = flags.DEFINE_integer('images', 400, 'Photos written to the JPEG folder.')
_PHOTO_SIZE = flags.DEFINE_integer('photo_size', 400, 'Side of the JPEG photos in px.')
_SOURCES = flags.DEFINE_list('sources', ['jpeg_folder', 'tfds'], 'What to read.')


def make_jpeg_folder(root: pathlib.Path) -> str:
  """ROOT/{train,test}/CLASS/*.jpg from the shared CIFAR-10 photos, upsampled."""
  cifar = np.load(SHARED_DATA / 'cifar10_partial.npz')
  for split, images, labels in (('train', cifar['x_train'], cifar['y_train']),
                                ('test', cifar['x_test'][:20], cifar['y_test'][:20])):
    for i, (image, label) in enumerate(zip(images[:_IMAGES.value], labels)):
      folder = root / split / f'class_{label}'
      folder.mkdir(parents=True, exist_ok=True)
      photo = Image.fromarray(image).resize((_PHOTO_SIZE.value,) * 2, Image.BICUBIC)
      photo.save(folder / f'{i:05d}.jpg', quality=90)
  return str(root)


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
  del argv
  if not SHARED_DATA.is_dir():
    raise SystemExit(f'{SHARED_DATA} is absent: the benchmark needs its real images.')
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    datasets = {}
    if 'jpeg_folder' in _SOURCES.value:
      datasets['jpeg_folder'] = dict(dataset=make_jpeg_folder(tmp / 'jpeg'))
    if 'tfds' in _SOURCES.value:
      datasets['tfds'] = dict(dataset='fashion_mnist',
                              tfds_data_dir=prepare_fashion_mnist(tmp / 'tfds'))
    print(f'{cores} CPU cores; batch {_BATCH.value}; JPEG photos {_PHOTO_SIZE.value} px, '
          'Fashion-MNIST 28 px PNG; official train preprocessing')
    for name, keys in datasets.items():
      for size in map(int, _SIZES.value):
        config = common.get_config()
        config.dataset = keys['dataset']
        config.tfds_data_dir = keys.get('tfds_data_dir')
        config.batch, config.pp.crop = _BATCH.value, size
        rate = images_per_second(config)
        print(f'{name:12s} {size:4d} px: {rate:8.1f} images/s, {rate / cores:7.1f} per core')


if __name__ == '__main__':
  app.run(main)
