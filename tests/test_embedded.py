"""The embedded default: its committed checkpoint transfers, and its digits folder is right."""
import collections
import gzip
import os
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from configs import embedded as embedded_config
from vit_jax_ft import checkpoint, embedded

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = embedded.CHECKPOINT_PATH
CROP = embedded_config.CROP
# Real digits for the linear probe: fit on the first of a seeded split, score on the second.
PROBE_TRAIN, PROBE_TEST = 300, 300


def _ridge_accuracy(train_x, train_y, test_x, test_y, l2: float = 1e-2) -> float:
  """Closed-form ridge regression on one-hot targets over standardised features."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  design = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
  test_design = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
  targets = np.eye(10)[train_y]
  weights = np.linalg.solve(design.T @ design + l2 * len(design) * np.eye(design.shape[1]),
                            design.T @ targets)
  return float(np.mean(np.argmax(test_design @ weights, 1) == test_y))


@pytest.fixture(scope='module')
def feature_model_and_init():
  model = embedded.embedded_model(0)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, CROP, CROP, 3)), train=False)['params']
  return model, init


def test_config_fine_tunes_the_committed_checkpoint_at_a_new_resolution():
  config = embedded_config.get_config()
  assert (REPO / config.pretrained_path).is_file()
  assert config.model_name == embedded.EMBEDDED_MODEL_NAME
  assert {k: v for k, v in config.model.items() if v is not None} == embedded.EMBEDDED_MODEL
  assert config.pp.crop != embedded.PRETRAIN_SIZE
  assert config.pp.crop % embedded.EMBEDDED_MODEL['patch_size'][0] == 0
  assert os.path.getsize(CHECKPOINT) < 1_000_000


def test_checkpoint_loads_into_the_fine_tuning_model():
  raw = checkpoint.read_npz(CHECKPOINT)
  # The released layout: pre-Linen names inside the encoder blocks.
  assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in raw
  model = embedded.embedded_model(7)
  init = model.init(jax.random.PRNGKey(1), jnp.zeros((1, CROP, CROP, 3)), train=False)['params']
  params = checkpoint.load_pretrained(CHECKPOINT, init)

  hidden = embedded.EMBEDDED_MODEL['hidden_size']
  old_grid = embedded.PRETRAIN_SIZE // embedded.EMBEDDED_MODEL['patch_size'][0]
  new_grid = CROP // embedded.EMBEDDED_MODEL['patch_size'][0]
  raw_posemb = raw['Transformer/posembed_input/pos_embedding']
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert raw_posemb.shape == (1, 1 + old_grid ** 2, hidden)
  assert posemb.shape == (1, 1 + new_grid ** 2, hidden)
  np.testing.assert_array_equal(posemb[:, 0], raw_posemb[:, 0])  # Class token position.
  # Bilinear resizing keeps the corners of the grid.
  old = raw_posemb[0, 1:].reshape(old_grid, old_grid, hidden)
  new = posemb[0, 1:].reshape(new_grid, new_grid, hidden)
  np.testing.assert_allclose(new[[0, 0, -1, -1], [0, -1, 0, -1]],
                             old[[0, 0, -1, -1], [0, -1, 0, -1]], atol=1e-6)
  np.testing.assert_array_equal(params['embedding']['kernel'], raw['embedding/kernel'])
  np.testing.assert_array_equal(params['head']['kernel'], init['head']['kernel'])
  assert params['head']['kernel'].shape == (hidden, 7)
  logits = model.apply({'params': params}, jnp.zeros((2, CROP, CROP, 3)), train=False)
  assert logits.shape == (2, 7)


def test_pretrained_features_beat_random_features_on_real_digits(feature_model_and_init):
  model, init = feature_model_and_init
  split = embedded.split_digits(test_fraction=0.5, seed=0)
  (train_x, train_y), (test_x, test_y) = split['train'], split['test']
  train_x, train_y = train_x[:PROBE_TRAIN], train_y[:PROBE_TRAIN]
  test_x, test_y = test_x[:PROBE_TEST], test_y[:PROBE_TEST]
  images = embedded.grey_to_model_input(
      embedded.upscale_digits(np.concatenate([train_x, test_x]), CROP))
  features = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))

  def probe(params) -> float:
    f = np.asarray(features(params, images), np.float64)
    return _ridge_accuracy(f[:PROBE_TRAIN], train_y, f[PROBE_TRAIN:], test_y)

  pretrained = probe(checkpoint.load_pretrained(CHECKPOINT, init))
  random = probe(init)
  # When made: 0.91 against 0.81; random features of this ViT are far from useless on digits.
  assert pretrained > 0.85, (pretrained, random)
  assert 1 - pretrained < 0.7 * (1 - random), (pretrained, random)


def test_export_digits_writes_every_real_digit_once_with_its_label(tmp_path):
  counts = embedded.export_digits(str(tmp_path), image_size=8, test_fraction=0.25, seed=0)
  digits = sklearn.datasets.load_digits()
  # At 8 px the files hold the original pixels, 0..16 scaled to 0..255.
  expected = collections.Counter(
      (int(label), np.round(image * 255 / 16).astype(np.uint8).tobytes())
      for image, label in zip(digits.images, digits.target))
  written = collections.Counter()
  per_split_class = collections.Counter()
  for path in tmp_path.glob('*/*/*.png'):
    split, label = path.parts[-3], int(path.parts[-2])
    image = Image.open(path)
    assert image.mode == 'L' and image.size == (8, 8)
    written[(label, np.asarray(image).tobytes())] += 1
    per_split_class[(split, label)] += 1
  assert written == expected
  assert counts == {'train': sum(per_split_class[('train', c)] for c in range(10)),
                    'test': sum(per_split_class[('test', c)] for c in range(10))}
  class_sizes = np.bincount(digits.target)
  for c, size in enumerate(class_sizes):  # Stratified: a quarter of each class.
    assert abs(per_split_class[('test', c)] - 0.25 * size) <= 1


def test_export_digits_upscales_and_follows_the_seed(tmp_path):
  embedded.export_digits(str(tmp_path), image_size=32, test_fraction=0.25, seed=0)
  assert {Image.open(p).size for p in tmp_path.glob('*/*/*.png')} == {(32, 32)}
  test_set = lambda seed: {x.tobytes() for x in embedded.split_digits(0.25, seed)['test'][0]}  # noqa: E731
  assert test_set(0) == test_set(0) != test_set(1)


def test_export_digits_refuses_bad_arguments(tmp_path):
  (tmp_path / 'old.txt').write_text('x')
  with pytest.raises(FileExistsError, match='not empty'):
    embedded.export_digits(str(tmp_path), image_size=8, test_fraction=0.25, seed=0)
  with pytest.raises(ValueError, match='test_fraction'):
    embedded.split_digits(test_fraction=1.5, seed=0)


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """The idx format (big-endian header: 0, type 0x08, ndim, sizes), gzipped."""
  with gzip.open(path, 'wb') as f:
    f.write(struct.pack(f'>HBB{array.ndim}I', 0, 0x08, array.ndim, *array.shape) +
            array.astype(np.uint8).tobytes())


def test_make_checkpoint_learns_real_digits_written_as_idx_files(tmp_path):
  split = embedded.split_digits(test_fraction=0.25, seed=0)
  for name, (images, labels) in zip(('train', 'test'), (split['train'], split['test'])):
    image_file, label_file = embedded.FASHION_MNIST_FILES[name]
    _write_idx(tmp_path / image_file, embedded.upscale_digits(images, 16))
    _write_idx(tmp_path / label_file, labels)
  config = embedded.pretrain_config(steps=60, batch=64, base_lr=0.1, warmup_steps=5, seed=0)
  out = str(tmp_path / 'ckpt.npz')
  test_accuracy = embedded.make_checkpoint(str(tmp_path), out, config, max_zoom=1.2)

  # Recount the accuracy from the saved file, independently of `accuracy`.
  params = checkpoint.load(out)
  test_x, test_y = split['test']
  logits = embedded.embedded_model(10).apply(
      {'params': params}, embedded.grey_to_model_input(embedded.upscale_digits(test_x, 16)))
  assert test_accuracy == pytest.approx(np.mean(np.argmax(logits, -1) == test_y))
  assert test_accuracy > 0.5, test_accuracy  # 0.68 when written; chance is 0.1.
  with pytest.raises(ValueError, match='max_zoom'):
    embedded.pretrain(test_x, test_y, config, max_zoom=0.5)


def test_random_zoom_keeps_the_field_of_view_inside_the_image():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 12, 12, 3)), jnp.float32)
  key = jax.random.PRNGKey(0)
  np.testing.assert_allclose(embedded.random_zoom(key, images, 1.0), images, atol=1e-6)
  # Zooming in by s turns a ramp of slope 1 into one of slope 1/s, within the original range.
  ramp = jnp.broadcast_to(jnp.arange(12, dtype=jnp.float32)[None, :, None, None],
                          (4, 12, 12, 3))
  zoomed = np.asarray(embedded.random_zoom(key, ramp, 2.0))
  slopes = np.diff(zoomed[:, 2:-2], axis=1)
  assert np.all(slopes > 0.5 - 1e-4) and np.all(slopes < 1.0 + 1e-4)
  assert zoomed.min() >= -1e-4 and zoomed.max() <= 11 + 1e-4


def test_read_idx_matches_the_format(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = tmp_path / 'x-idx3-ubyte.gz'
  _write_idx(path, array)
  np.testing.assert_array_equal(embedded.read_idx(str(path)), array)
  bad = tmp_path / 'bad.gz'
  with gzip.open(bad, 'wb') as f:
    f.write(struct.pack('>HBB1I', 0, 0x0D, 1, 1) + b'\0\0\0\0')
  with pytest.raises(ValueError, match='unsigned-byte'):
    embedded.read_idx(str(bad))


def test_fashion_mnist_files_load_with_their_known_sizes(shared_data):
  images, labels = embedded.load_fashion_mnist(str(shared_data / 'fashion_mnist'), 'test')
  assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
  with pytest.raises(FileNotFoundError, match='--fashion_mnist_dir'):
    embedded.load_fashion_mnist(str(shared_data), 'train')
