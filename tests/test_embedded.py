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
CHECKPOINT = str(REPO / embedded.CHECKPOINT_PATH)
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


def test_checkpoint_loads_into_the_fine_tuning_model(feature_model_and_init):
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


def test_read_idx_matches_the_format(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = tmp_path / 'x-idx3-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(struct.pack('>HBB3I', 0, 0x08, 3, 2, 3, 4) + array.tobytes())
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
