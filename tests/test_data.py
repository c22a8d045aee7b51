"""Input pipeline end to end: image folders written here, tfds mock data, real Fashion-MNIST."""
import gzip
import json
import pathlib
import re
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import SHARED_DATA
from vit_jax_ft import data, defaults, parallel, run_dir, train
from vit_jax_ft.data import tfds_source

CLASSES = ('airplane', 'cat', 'ship')
TRAIN_SIZES = (2, 5, 9)  # Unbalanced on purpose.
TEST_SIZES = (3, 4, 4)  # 11 test images: not a multiple of any batch below.
FORMATS = (('png', 'RGB'), ('jpg', 'L'), ('bmp', 'RGB'), ('gif', 'P'), ('png', 'RGBA'))


def _real_or_generated_images(n: int) -> np.ndarray:
  """Real CIFAR-10 images from ../shared/data when present, else smooth random ones."""
  npz = SHARED_DATA / 'cifar10_partial.npz'
  if npz.exists():
    return np.load(npz)['x_train'][:n]
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
  return np.stack([np.asarray(Image.fromarray(s).resize((32, 32))) for s in small])


def _expected_rgb(path: str) -> np.ndarray:
  """What the file holds as RGB, decoded by PIL (alpha dropped, grey repeated)."""
  image = Image.open(path)
  array = np.asarray(image.convert('RGBA' if image.mode in ('RGBA', 'P') else 'RGB'))
  return array[..., :3]


def _write_folder(root: pathlib.Path, sizes_by_split: dict) -> dict:
  """Writes ROOT/SPLIT/CLASS/*.{png,jpg,bmp,gif}; returns {path: label}."""
  images = iter(_real_or_generated_images(sum(sum(s) for s in sizes_by_split.values())))
  labels, k = {}, 0
  for split, sizes in sizes_by_split.items():
    for label, (name, size) in enumerate(zip(CLASSES, sizes)):
      folder = root / split / name
      folder.mkdir(parents=True)
      for _ in range(size):
        ext, mode = FORMATS[k % len(FORMATS)]
        image = Image.fromarray(next(images)).convert(mode)
        path = folder / f'{k:03d}.{ext}'
        image.save(path)
        labels[str(path)] = label
        k += 1
  return labels


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  labels = _write_folder(root, {'train': TRAIN_SIZES, 'test': TEST_SIZES})
  return root, labels


def _config(dataset, **overrides):
  config = defaults.get_config()
  config.dataset = str(dataset)
  config.batch, config.batch_eval, config.pp.crop, config.prefetch = 8, 8, 32, 1
  config.update(overrides)
  return config


def _match(image: np.ndarray, expected: dict) -> str:
  """The one file whose pixels (scaled to [-1, 1]) are `image` (JPEG decoders differ by 1-2)."""
  hits = [p for p, rgb in expected.items()
          if np.abs((rgb - 127.5) / 127.5 - image).max() <= 3 / 127.5]
  assert len(hits) == 1, f'{len(hits)} files match'
  return hits[0]


def test_folder_info_and_class_names(image_folder):
  root, _ = image_folder
  info = data.get_dataset_info(_config(root))
  assert info.class_names == sorted(CLASSES)
  assert (info.num_classes, info.num_train, info.num_test) == (3, sum(TRAIN_SIZES),
                                                                sum(TEST_SIZES))
  assert info.train_class_counts == list(TRAIN_SIZES)


def test_folder_eval_is_exact_once_over_2_hosts_of_4_devices(image_folder):
  """Every test image comes out once, as its file's pixels, with its folder's label."""
  root, labels = image_folder
  expected = {p: _expected_rgb(p) for p in labels if '/test/' in p}
  config = _config(root)  # batch_eval 8 = 2 hosts x 4 devices x 1.
  per_host = [list(data.get_eval_data(config, process_index=i, process_count=2))
              for i in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == -(-len(expected) // 8)
  seen = []
  for batches in per_host:
    for batch in batches:
      assert batch['image'].shape == (4, 32, 32, 3) and batch['mask'].shape == (4,)
      for image, label, mask in zip(batch['image'], batch['label'], batch['mask']):
        if mask:
          path = _match(image, expected)
          assert label == labels[path]
          seen.append(path)
        else:
          assert not image.any()
  assert sorted(seen) == sorted(expected)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_are_deterministic_resumable_and_host_independent(image_folder):
  root, _ = image_folder
  config = _config(root)
  run = _take(data.get_train_data(config, process_count=1, process_index=0), 4)
  again = _take(data.get_train_data(config, process_count=1, process_index=0), 4)
  resumed = _take(data.get_train_data(config, start_step=2, process_count=1, process_index=0), 2)
  hosts = [_take(data.get_train_data(config, process_index=i, process_count=2), 4)
           for i in range(2)]
  for k in range(4):
    batch = run[k]
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], again[k][key])
      np.testing.assert_array_equal(
          batch[key], np.concatenate([hosts[0][k][key], hosts[1][k][key]]))
      if k >= 2:
        np.testing.assert_array_equal(batch[key], resumed[k - 2][key])
  other_seed = next(data.get_train_data(_config(root, seed=1), process_count=1, process_index=0))
  assert not np.array_equal(other_seed['image'], run[0]['image'])


def test_an_epoch_visits_every_training_image_once(image_folder):
  """With identity preprocessing an epoch's images are exactly the training files."""
  root, labels = image_folder
  expected = {p: _expected_rgb(p) for p in labels if '/train/' in p}
  config = _config(root, batch=len(expected) // 2)
  config.pp.train_ops = 'decode|value_range(-1,1)'
  batches = _take(data.get_train_data(config, process_count=1, process_index=0), 2)
  paths = [_match(image, expected) for b in batches for image in b['image']]
  assert sorted(paths) == sorted(expected)
  assert [labels[p] for p in paths] == [x for b in batches for x in b['label']]


def test_resume_far_ahead_does_not_decode_the_skipped_steps(image_folder):
  root, _ = image_folder
  config = _config(root)
  start = time.time()
  batch = next(data.get_train_data(config, start_step=10**8, process_count=1, process_index=0))
  assert time.time() - start < 20  # Decoding 8e8 images would take days.
  assert batch['image'].shape == (8, 32, 32, 3)


def test_resample_balances_the_classes(image_folder):
  root, _ = image_folder
  config = _config(root, balance='resample', balance_target=4, batch=6)
  info = data.get_dataset_info(config)
  assert info.train_class_counts == [4, 4, 4] and info.num_train == 12
  labels = np.concatenate([b['label'] for b in _take(
      data.get_train_data(config, process_count=1, process_index=0), 2)])
  np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])


def test_loss_weights_follow_the_class_sizes(image_folder):
  root, _ = image_folder
  config = _config(root, balance='loss_weights')
  batch = next(data.get_train_data(config, process_count=1, process_index=0))
  sizes = np.array(TRAIN_SIZES)
  want = sizes.sum() / (3 * sizes[batch['label']])
  np.testing.assert_allclose(batch['weight'], want, rtol=1e-6)


def test_fraction_and_per_class_counts(image_folder):
  root, _ = image_folder
  info = data.get_dataset_info(_config(root, train_fraction=0.5))
  assert info.train_class_counts == [round(0.5 * n) for n in TRAIN_SIZES]
  info = data.get_dataset_info(_config(root, train_per_class=3))
  assert info.train_class_counts == [min(3, n) for n in TRAIN_SIZES]


def test_split_slicing_is_complementary(image_folder):
  root, labels = image_folder
  head = data.load_split(_config(root), 'train[:60%]')
  tail = data.load_split(_config(root), 'train[60%:]')
  assert len(head) == round(0.6 * sum(TRAIN_SIZES))
  assert sorted(list(head.data) + list(tail.data)) == sorted(p for p in labels if '/train/' in p)


def test_cache_gives_the_same_batches(image_folder):
  root, _ = image_folder
  plain = next(data.get_train_data(_config(root), process_count=1, process_index=0))
  cached = next(data.get_train_data(_config(root, cache=True), process_count=1, process_index=0))
  np.testing.assert_array_equal(plain['image'], cached['image'])


def test_single_folder_is_split_per_class_by_fraction_and_seed(tmp_path):
  _write_folder(tmp_path, {'all': (5, 10, 10)})
  root = tmp_path / 'all'
  config = _config(root, folder_test_fraction=0.2)
  train, test = data.load_split(config, 'train'), data.load_split(config, 'test')
  assert not set(train.data) & set(test.data)
  assert len(train) + len(test) == 25
  np.testing.assert_array_equal(np.bincount(test.labels), [1, 2, 2])
  other = data.load_split(_config(root, folder_test_fraction=0.2, folder_split_seed=1), 'test')
  assert set(other.data) != set(test.data)


def test_corrupt_files_are_skipped_or_named(tmp_path):
  _write_folder(tmp_path, {'train': (2, 2, 2), 'test': (1, 1, 1)})
  bad = tmp_path / 'train' / 'cat' / 'broken.jpg'
  bad.write_bytes(b'not an image at all')
  (tmp_path / 'train' / 'cat' / 'empty.png').write_bytes(b'')
  assert data.get_dataset_info(_config(tmp_path)).num_train == 6
  with pytest.raises(ValueError, match='broken.jpg|empty.png'):
    data.get_dataset_info(_config(tmp_path, on_corrupt_image='error'))


def test_an_undecodable_file_keeps_every_position(tmp_path):
  """A file whose header passes but whose data does not decode: weight or mask 0 in its slot."""
  for name in ('clean', 'broken'):
    _write_folder(tmp_path / name, {'train': TRAIN_SIZES, 'test': TEST_SIZES})
  broken = {}
  for split in ('train', 'test'):
    clean_file = sorted((tmp_path / 'clean' / split / 'cat').glob('*.png'))[0]
    broken[split] = np.asarray(Image.open(clean_file).convert('RGB'))
    bad_file = tmp_path / 'broken' / split / 'cat' / clean_file.name
    bad_file.write_bytes(clean_file.read_bytes()[:8] + b'no image data follows' * 4)
  runs = {}
  for name in ('clean', 'broken'):
    config = _config(tmp_path / name)
    config.pp.train_ops = config.pp.test_ops = 'decode|value_range(-1,1)'
    runs[name] = (_take(data.get_train_data(config, process_count=1, process_index=0), 4),
                  list(data.get_eval_data(config, process_count=1, process_index=0)))
  for (clean, weight), (broken_run, broken_weight), split in (
      ((runs['clean'][0], 'weight'), (runs['broken'][0], 'weight'), 'train'),
      ((runs['clean'][1], 'mask'), (runs['broken'][1], 'mask'), 'test')):
    failures = 0
    for a, b in zip(clean, broken_run):
      pixels = np.round(a['image'] * 127.5 + 127.5)
      bad = (pixels == broken[split]).all(axis=(1, 2, 3))
      np.testing.assert_array_equal(b[weight], np.where(bad, 0, a[weight]))
      np.testing.assert_array_equal(b['image'][~bad], a['image'][~bad])
      failures += bad.sum()
    assert failures == (2 if split == 'train' else 1)  # Train: 4 steps of 8 = 2 epochs.
  config = _config(tmp_path / 'broken', on_corrupt_image='error')
  with pytest.raises(ValueError, match='Cannot decode or preprocess .*broken/train/cat/'):
    _take(data.get_train_data(config, process_count=1, process_index=0), 4)


def test_preprocessing_that_fails_on_every_image_stops_with_a_hint(image_folder):
  root, _ = image_folder
  config = _config(root)
  config.pp.train_ops = 'decode|random_crop(64)|value_range(-1,1)'  # Images are 32 px.
  with pytest.raises(ValueError, match='preprocessing ops probably do not fit'):
    next(data.get_train_data(config, process_count=1, process_index=0))


def test_folder_errors(tmp_path):
  _write_folder(tmp_path, {'train': (1, 1, 1), 'test': (1, 1, 1)})
  with pytest.raises(ValueError, match="Split 'valid' not found"):
    data.load_split(_config(tmp_path), 'valid')
  (tmp_path / 'train' / 'dog').mkdir()
  with pytest.raises(ValueError, match='has no images'):
    data.get_dataset_info(_config(tmp_path))
  with pytest.raises(ValueError, match='neither a folder nor a tfds'):
    data.get_dataset_info(_config(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='multiple of 3, to split over the 3 processes'):
    data.get_eval_data(_config(tmp_path), process_index=0, process_count=3)


def test_unprepared_tfds_fails_fast_with_instructions(tmp_path):
  start = time.time()
  with pytest.raises(tfds_source.DatasetNotPreparedError, match='tfds_manual_dir'):
    data.get_dataset_info(_config('cifar10', tfds_data_dir=str(tmp_path)))
  with pytest.raises(tfds_source.DatasetNotPreparedError, match='cifar-10-binary.tar.gz'):
    data.get_dataset_info(_config('cifar10', tfds_data_dir=str(tmp_path),
                                  tfds_manual_dir=str(tmp_path)))
  assert time.time() - start < 10


def test_tfds_mock_data_without_split_info():
  with tfds.testing.mock_data(num_examples=13):
    # Inside mock_data, download_and_prepare is a no-op: allowing it is safe.
    config = _config('cifar10', tfds_download=True, batch_eval=4)
    info = data.get_dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_test) == (10, 13, 13)
    batch = next(data.get_train_data(config, process_count=1, process_index=0))
    assert batch['image'].shape == (8, 32, 32, 3) and batch['label'].max() < 10
    batches = list(data.get_eval_data(config, process_count=2, process_index=1))
    host_positions = [4 * j + k for j in range(4) for k in (2, 3)]  # Host 1's half of each batch.
    assert len(batches) == 4
    assert sum(b['mask'].sum() for b in batches) == sum(p < 13 for p in host_positions)


def _idx_images(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path) as f:
    return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def test_fashion_mnist_is_grey_made_rgb_with_real_splits(fashion_mnist_tfds_dir):
  config = defaults.with_dataset(defaults.get_config(), 'fashion_mnist')
  config.update(dict(tfds_data_dir=fashion_mnist_tfds_dir, batch=4, batch_eval=500, prefetch=1))
  config.pp.crop = 28
  info = data.get_dataset_info(config)
  assert info.class_names[:2] == ['T-shirt/top', 'Trouser'] and info.num_classes == 10
  assert (info.num_train, info.num_test) == (58_800, 10_000)
  originals = _idx_images(SHARED_DATA / 'fashion_mnist' / 't10k-images-idx3-ubyte.gz')
  batch = next(data.get_eval_data(config, process_count=1, process_index=0))
  for image in batch['image'][:5]:
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # Grey in all 3 channels.
    pixels = np.round(image[..., 0] * 127.5 + 127.5).astype(np.uint8)
    assert (originals == pixels).all(axis=(1, 2)).any()  # A real test image.
  train = next(data.get_train_data(config, process_count=1, process_index=0))
  assert train['image'].shape == (4, 28, 28, 3)



def _plant_corrupt_files(root: pathlib.Path) -> dict:
  """In each split, a garbage .jpg (no image header) and a truncated .png; {split: names}."""
  planted = {}
  for split in ('train', 'test'):
    png = sorted((root / split / 'ship').glob('*.png'))[0].read_bytes()
    (root / split / 'cat' / 'garbage.jpg').write_bytes(b'not an image at all' * 4)
    (root / split / 'ship' / 'truncated.png').write_bytes(png[:len(png) // 2])
    planted[split] = ['garbage.jpg', 'truncated.png']
  return planted


@pytest.mark.parametrize('cache', [False, True])
def test_corrupt_images_are_named_and_counted_in_every_split(tmp_path, caplog, cache):
  """Every planted file is named in the log and counted: left out when the split is read
  (no image header; with the cache, not decodable either) or given weight/mask 0 in its slot."""
  _write_folder(tmp_path, {'train': TRAIN_SIZES, 'test': TEST_SIZES})
  planted = _plant_corrupt_files(tmp_path)
  config = _config(tmp_path, cache=cache, batch=4, batch_eval=4)
  config.pp.train_ops = config.pp.test_ops = 'decode|value_range(-1,1)'
  caplog.set_level('WARNING')
  info = data.get_dataset_info(config)
  left_out = 2 if cache else 1  # The truncated PNG has a header: only decoding finds it.
  assert (info.num_train_corrupt, info.num_test_corrupt) == (left_out, left_out)
  in_stream = len(planted['train']) - left_out
  assert info.num_train == sum(TRAIN_SIZES) + in_stream
  ship = CLASSES.index('ship')
  assert info.train_class_counts == [n + in_stream * (c == ship) for c, n in
                                     enumerate(TRAIN_SIZES)]
  train.write_run_files(config, str(tmp_path / 'workdir'), info,
                        run_dir.build_model(config, info.num_classes))
  saved = json.loads((tmp_path / 'workdir' / 'dataset_info.json').read_text())
  assert (saved['num_train_corrupt'], saved['num_test_corrupt']) == (left_out, left_out)

  epoch = _take(data.get_train_data(config, process_count=1, process_index=0),
                -(-info.num_train // 4))
  weights = np.concatenate([b['weight'] for b in epoch])[:info.num_train]
  assert (weights == 0).sum() == in_stream and weights.sum() == sum(TRAIN_SIZES)
  batches = list(data.get_eval_data(config, process_count=1, process_index=0))
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == sum(TEST_SIZES) and info.num_test == sum(TEST_SIZES) + in_stream

  log = '\n'.join(r.getMessage() for r in caplog.records)
  for split in ('train', 'test'):
    for name in planted[split]:
      assert f'{split}/{"cat" if name.startswith("garbage") else "ship"}/{name}' in log
    counted = re.findall(rf'Left out (\d+) of the \d+ images of .* split {split}: ', log)
    assert sum(map(int, counted)) == left_out
  assert log.count('Cannot decode or preprocess the image of') == 2 * in_stream
  assert ('In all, 1 image(s) of this pass failed' in log) == (in_stream == 1)  # The eval.
  with pytest.raises(ValueError, match='garbage.jpg'):
    data.get_dataset_info(_config(tmp_path, cache=cache, on_corrupt_image='error'))


def test_one_batch_check_covers_processes_devices_and_micro_batches(image_folder):
  """parallel.check_batch_size: the host share, or an error naming what the batch splits over."""
  devices = jax.device_count()
  assert parallel.check_batch_size(12 * devices, 'batch', process_count=3) == 4 * devices
  with pytest.raises(ValueError, match=r'config.batch=6 must be a positive multiple of 4,.* '
                     r'config.accum_steps=4'):
    parallel.check_batch_size(6, 'batch', accum_steps=4, process_count=1)
  with pytest.raises(ValueError, match='config.batch=0 must be a positive multiple'):
    data.get_train_data(_config(image_folder[0], batch=0), process_index=0, process_count=1)
