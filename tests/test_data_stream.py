"""Streaming tfds splits: a small dataset written here in 3 record files, forced to stream."""
import io
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import SHARED_DATA
from vit_jax_ft import data, defaults
from vit_jax_ft.data import sources, tfds_source

NUM_TRAIN, NUM_TEST = 96, 11
CORRUPT = 7  # The training example whose image the `corrupt` config breaks.
PNG_HEADER = b'\x89PNG\r\n\x1a\n'  # Passes a header check, fails to decode.


def _photos(n: int) -> np.ndarray:
  """Real CIFAR-10 photos from ../shared/data when present, else random (distinct) images."""
  npz = SHARED_DATA / 'cifar10_partial.npz'
  if npz.exists():
    return np.load(npz)['x_train'][:n]
  return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


PHOTOS = _photos(NUM_TRAIN + NUM_TEST)
LABELS = np.arange(NUM_TRAIN + NUM_TEST) % 3
# What the `planted` config breaks, in both splits: an image without a header, a truncated PNG.
PLANTED = {20: 'garbage', 7: 'truncated', NUM_TRAIN + 3: 'garbage', NUM_TRAIN + 5: 'truncated'}


def _planted(i: int) -> io.BytesIO:
  if PLANTED[i] == 'garbage':
    return io.BytesIO(b'not an image at all' * 4)
  png = io.BytesIO()
  Image.fromarray(PHOTOS[i]).save(png, 'PNG')
  return io.BytesIO(png.getvalue()[:len(png.getvalue()) // 2])


class VitJaxFtTinyPhotos(tfds.core.GeneratorBasedBuilder):
  """107 photos (96 train, 11 test) in 3 record files per split; `corrupt` breaks one image,
  `planted` those of PLANTED."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='clean'),
                     tfds.core.BuilderConfig(name='corrupt'),
                     tfds.core.BuilderConfig(name='planted')]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(range(NUM_TRAIN)),
            'test': self._generate_examples(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))}

  def _generate_examples(self, indices):
    for i in indices:
      image = PHOTOS[i]
      if self.builder_config.name == 'corrupt' and i == CORRUPT:
        image = io.BytesIO(PNG_HEADER + b'not the rest of a png' * 4)
      if self.builder_config.name == 'planted' and i in PLANTED:
        image = _planted(i)
      yield i, {'image': image, 'label': LABELS[i]}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp('tfds_stream'))
  for name in ('clean', 'corrupt', 'planted'):
    tfds.builder(f'vit_jax_ft_tiny_photos/{name}', data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=3))
  return data_dir


def _config(tfds_dir, name='clean', **overrides):
  config = defaults.get_config()
  config.dataset = f'vit_jax_ft_tiny_photos/{name}'
  config.tfds_data_dir = tfds_dir
  config.batch, config.batch_eval, config.pp.crop, config.prefetch = 8, 4, 32, 1
  config.shuffle_buffer = 30
  config.stream_threshold_gb = 0.0  # Stream every split.
  config.update(overrides)
  return config


def _identity(config):
  config.pp.train_ops = config.pp.test_ops = 'decode|value_range(-1,1)'
  return config


_INDEX = {photo.tobytes(): i for i, photo in enumerate(PHOTOS)}


def _indices(images: np.ndarray) -> np.ndarray:
  """Which photo each unaugmented image in [-1, 1] is (-1: none, such as zeros)."""
  pixels = np.round(images * 127.5 + 127.5).astype(np.uint8)
  return np.array([_INDEX.get(p.tobytes(), -1) for p in pixels])


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _train(config, n, start_step=0, process_index=0, process_count=1):
  return _take(data.get_train_data(config, start_step=start_step, process_index=process_index,
                                   process_count=process_count), n)


def test_the_threshold_decides_per_split(tfds_dir):
  splits = tfds.builder('vit_jax_ft_tiny_photos/clean', data_dir=tfds_dir).info.splits
  train_gb, test_gb = splits['train'].num_bytes / 2**30, splits['test'].num_bytes / 2**30
  config = _config(tfds_dir, stream_threshold_gb=(train_gb + test_gb) / 2)
  assert data.streams(config, 'train') and not data.streams(config, 'test')
  assert not data.streams(config, 'train[:10%]')  # Slices count their own share.
  assert not data.streams(_config(tfds_dir, stream_threshold_gb=10.0), 'train')
  info = data.get_dataset_info(config)
  assert (info.num_classes, info.num_train, info.num_test) == (3, NUM_TRAIN, NUM_TEST)
  assert info.train_class_counts is None  # Unknown without reading the whole split.
  batch = next(data.get_eval_data(_identity(config), process_index=0, process_count=1))
  assert set(_indices(batch['image'])) <= set(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))


def test_each_host_reads_a_disjoint_share_once_per_epoch(tfds_dir):
  """2 hosts x 12 steps of 4 examples = one epoch; the shares split the 96 photos."""
  config = _identity(_config(tfds_dir))
  steps = NUM_TRAIN // config.batch
  hosts = [_train(config, 2 * steps, process_index=i, process_count=2) for i in range(2)]
  shares = []
  for batches in hosts:
    seen = np.concatenate([_indices(b['image']) for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    np.testing.assert_array_equal(labels, LABELS[seen])
    first, second = seen[:NUM_TRAIN // 2], seen[NUM_TRAIN // 2:]
    assert len(set(first)) == NUM_TRAIN // 2  # Each example of the share once per epoch,
    assert set(second) == set(first) and not np.array_equal(second, first)  # reshuffled.
    assert not np.array_equal(first, np.sort(first))
    shares.append(set(first))
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == set(range(NUM_TRAIN))
  assert all((b['weight'] == 1).all() for b in hosts[0] + hosts[1])


def test_batches_are_deterministic_and_resume_equals_the_uninterrupted_run(tfds_dir):
  config = _config(tfds_dir)  # Official training preprocessing: seeded augmentation.
  run = _train(config, 30)  # 12 steps per epoch: crosses two epoch boundaries.
  again = _train(config, 30)
  for k in range(30):
    np.testing.assert_array_equal(run[k]['image'], again[k]['image'])
  for start in (5, 12, 23):
    for k, batch in enumerate(_train(config, 3, start_step=start), start):
      np.testing.assert_array_equal(batch['image'], run[k]['image'])
      np.testing.assert_array_equal(batch['label'], run[k]['label'])
  far = 10**7  # Epoch 833,333: only the records of its own epoch before it are read.
  np.testing.assert_array_equal(_train(config, 1, start_step=far)[0]['image'],
                                _train(config, 2, start_step=far - 1)[1]['image'])
  other_seed = _train(_config(tfds_dir, seed=1), 1)[0]
  assert not np.array_equal(other_seed['image'], run[0]['image'])
  assert run[0]['image'].shape == (8, 32, 32, 3) and run[0]['image'].dtype == np.float32
  assert -1 <= run[0]['image'].min() and run[0]['image'].max() <= 1


def test_eval_is_exact_once_over_2_hosts(tfds_dir):
  config = _identity(_config(tfds_dir))  # batch_eval 4 = 2 hosts x 2.
  per_host = [list(data.get_eval_data(config, process_index=i, process_count=2))
              for i in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == -(-NUM_TEST // 4)
  seen = []
  for batches in per_host:
    for batch in batches:
      assert batch['image'].shape == (2, 32, 32, 3)
      real = batch['mask'] > 0
      assert not batch['image'][~real].any()
      index = _indices(batch['image'][real])
      np.testing.assert_array_equal(batch['label'][real], LABELS[index])
      seen += list(index)
  assert sorted(seen) == list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))


def test_an_undecodable_image_keeps_every_position(tfds_dir):
  """The corrupt dataset streams like the clean one, with weight 0 where the bad image sits."""
  clean = _train(_identity(_config(tfds_dir)), 24)
  corrupt = _train(_identity(_config(tfds_dir, 'corrupt')), 24)
  for a, b in zip(clean, corrupt):
    bad = _indices(a['image']) == CORRUPT
    np.testing.assert_array_equal(b['weight'], np.where(bad, 0, 1))
    np.testing.assert_array_equal(b['image'][~bad], a['image'][~bad])
    assert not b['image'][bad].any()
  bad_steps = [k for k, b in enumerate(corrupt) if (b['weight'] == 0).any()]
  assert len(bad_steps) == 2 and bad_steps[0] < 11  # Once per epoch of 12 steps.
  stop = _config(tfds_dir, 'corrupt', on_corrupt_image='error')
  with pytest.raises(ValueError, match=r'record \d+ of .*tiny_photos-train.tfrecord'):
    _train(stop, bad_steps[0] + 1)
  # Resuming after it skips the bad record: nothing to stop for until the next epoch.
  _train(stop, 11 - bad_steps[0], start_step=bad_steps[0] + 1)


def test_options_that_need_memory_are_refused(tfds_dir):
  with pytest.raises(ValueError, match='train_fraction.*streamed'):
    data.get_dataset_info(_config(tfds_dir, train_fraction=0.5))
  with pytest.raises(ValueError, match='balance.*streamed'):
    data.get_train_data(_config(tfds_dir, balance='resample'), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="Split 'valid'"):
    data.streams(_config(tfds_dir), 'valid')


def test_mock_data_cannot_stream():
  with tfds.testing.mock_data(num_examples=5):
    config = _config(None, tfds_download=True)
    config.dataset = 'cifar10'
    with pytest.raises(ValueError, match='no split metadata'):
      data.get_train_data(config, process_index=0, process_count=1)


def test_real_fashion_mnist_streams(fashion_mnist_tfds_dir):
  config = defaults.with_dataset(defaults.get_config(), 'fashion_mnist')
  config.update(dict(tfds_data_dir=fashion_mnist_tfds_dir, batch=4, batch_eval=6, prefetch=1,
                     shuffle_buffer=100))
  config.pp.crop = 28
  assert not data.streams(config, config.pp.train)  # 30 MB: in memory by default.
  config.stream_threshold_gb = 0.0
  assert data.streams(config, config.pp.train)
  info = data.get_dataset_info(config)
  assert (info.num_train, info.num_test) == (58_800, 10_000)
  builder = tfds_source.get_builder('fashion_mnist', fashion_mnist_tfds_dir)
  expected = next(iter(builder.as_dataset(split='test', shuffle_files=False).batch(6)))
  batch = next(data.get_eval_data(config, process_index=0, process_count=1))
  pixels = np.round(batch['image'] * 127.5 + 127.5).astype(np.uint8)
  np.testing.assert_array_equal(pixels, np.repeat(expected['image'].numpy(), 3, axis=-1))
  np.testing.assert_array_equal(batch['label'], expected['label'].numpy())
  train = next(data.get_train_data(config, process_index=0, process_count=1))
  assert train['image'].shape == (4, 28, 28, 3) and (train['weight'] == 1).all()


@pytest.mark.parametrize('mode', ['memory', 'cache', 'stream'])
def test_corrupt_records_are_named_and_counted_in_every_mode(tfds_dir, caplog, mode):
  """Each planted image is left out when the split is read into memory (no header; with the
  cache, not decodable either), or named when it fails to decode, with weight or mask 0."""
  config = _identity(_config(tfds_dir, 'planted', cache=mode == 'cache',
                             stream_threshold_gb=0.0 if mode == 'stream' else 10.0))
  caplog.set_level('WARNING')
  sources._load.cache_clear()  # Read the split afresh: its warnings are logged once per process.
  info = data.get_dataset_info(config)
  left_out = {'memory': 1, 'cache': 2, 'stream': None}[mode]  # None: unknown before reading.
  assert (info.num_train_corrupt, info.num_test_corrupt) == (left_out, left_out)
  in_stream = 2 - (left_out or 0)
  assert info.num_train == NUM_TRAIN - (left_out or 0)
  assert info.num_test == NUM_TEST - (left_out or 0)

  epoch = _train(config, -(-info.num_train // config.batch))
  weights = np.concatenate([b['weight'] for b in epoch])[:info.num_train]
  seen = np.concatenate([_indices(b['image']) for b in epoch])[:info.num_train]
  assert (weights == 0).sum() == in_stream
  assert sorted(seen[weights > 0]) == sorted(set(range(NUM_TRAIN)) - set(PLANTED))
  batches = list(data.get_eval_data(config, process_index=0, process_count=1))
  masks = np.concatenate([b['mask'] for b in batches])
  seen = np.concatenate([_indices(b['image']) for b in batches])
  assert sorted(seen[masks > 0]) == sorted(set(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST)) -
                                           set(PLANTED))
  assert (masks == 0).sum() - (len(masks) - info.num_test) == in_stream  # Not padding.

  log = '\n'.join(r.getMessage() for r in caplog.records)
  for split in ('train', 'test'):
    counted = re.findall(rf'Left out (\d+) of the \d+ images of .* split {split}: ', log)
    assert sum(map(int, counted)) == (left_out or 0)
  named = [n for names in re.findall(r'Cannot decode or preprocess the image of (.*?); ', log)
           for n in names.split(', ')]
  assert len(named) == 2 * in_stream
  if mode == 'stream':
    assert sorted(re.sub(r'.*tiny_photos-(\w+)\.tfrecord.*', r'\1', n) for n in named) == [
        'test', 'test', 'train', 'train']
