r"""The small pretrained ViT that `./run.sh` fine-tunes offline, and its real images.

  python -m vit_jax_ft.embedded make_checkpoint \
      --fashion_mnist_dir=../shared/data/fashion_mnist \
      --out=vit_jax_ft/assets/ViT-fmnist.npz
  python -m vit_jax_ft.embedded export_digits --out=workdirs/digits

`make_checkpoint` pretrains `EMBEDDED_MODEL` on the real Fashion-MNIST training
images (the original idx `.gz` files) with the project's recipe and writes it in
the released `.npz` layout. `export_digits` writes scikit-learn's real digits
(which install with the project) as an image folder `OUT/{train,test}/CLASS/*.png`
for the fine-tuning job (`configs/embedded.py`).
"""
import functools
import gzip
import os
import struct
import time
from typing import Any, Callable, Dict, Mapping, Tuple

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
import sklearn.datasets
import sklearn.model_selection

from vit_jax_ft import checkpoint, defaults, memory, optim, train
from vit_jax_ft.models import get_model

# The embedded model: the registry's 'testing' ViT with these options (about 140k parameters).
EMBEDDED_MODEL_NAME = 'testing'
EMBEDDED_MODEL = dict(hidden_size=64, num_layers=4, mlp_dim=128, num_heads=4,
                      patch_size=(4, 4), dropout_rate=0.0)
# Fashion-MNIST's own 28 px: a multiple of the 4 px patches, a 7x7 grid.
PRETRAIN_SIZE = 28
# Shipped inside the package (assets/README.md says how it was made), so it installs with pip.
CHECKPOINT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets',
                               'ViT-fmnist.npz')
# The idx files of Fashion-MNIST, by split.
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# scikit-learn's digits hold ink intensities 0..16.
DIGITS_MAX_VALUE = 16

_FASHION_MNIST_DIR = flags.DEFINE_string(
    'fashion_mnist_dir', None,
    'make_checkpoint: folder with the four Fashion-MNIST idx .gz files.')
_OUT = flags.DEFINE_string(
    'out', None, 'make_checkpoint: the .npz to write; export_digits: the folder to write.')
_STEPS = flags.DEFINE_integer('steps', 1500, 'make_checkpoint: training steps.')
_BATCH = flags.DEFINE_integer('batch', 128, 'make_checkpoint: batch size.')
_BASE_LR = flags.DEFINE_float('base_lr', 0.1, 'make_checkpoint: peak learning rate.')
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 100, 'make_checkpoint: linear warm-up.')
_MAX_ZOOM = flags.DEFINE_float(
    'max_zoom', 1.5, 'make_checkpoint: augmentation zooms in by a random factor up to this '
    '(1: none); objects then span more patches, as after fine-tuning at a higher resolution.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', 32, 'export_digits: side of the written images (upscaled from 8 px).')
_TEST_FRACTION = flags.DEFINE_float(
    'test_fraction', 0.25, 'export_digits: fraction of each class in the test split.')
_SEED = flags.DEFINE_integer(
    'seed', 0, 'Seed of initialisation and data order (make_checkpoint) or of the split.')

Params = Dict[str, Any]


def embedded_model(num_classes: int) -> nn.Module:
  """The embedded ViT with a `num_classes` head (0: pre-logits features)."""
  return get_model(EMBEDDED_MODEL_NAME, num_classes, **EMBEDDED_MODEL)


def grey_to_model_input(images: np.ndarray) -> np.ndarray:
  """(N, H, W) uint8 grey -> NHWC float32 in [-1, 1] with 3 channels, as the models take."""
  x = images.astype(np.float32) * (2.0 / 255.0) - 1.0
  return np.repeat(x[..., None], 3, axis=-1)


# ---- Fashion-MNIST ---------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (`.gz` or raw): the format of MNIST and Fashion-MNIST."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  zeros, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zeros != 0 or dtype_code != 0x08:
    raise ValueError(f'{path} is not an unsigned-byte idx file (header {data[:4].hex()}); '
                     'pass the original Fashion-MNIST .gz files.')
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(directory: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """The (N, 28, 28) uint8 images and (N,) labels of a Fashion-MNIST split."""
  paths = [os.path.join(directory, name) for name in FASHION_MNIST_FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f'Missing {missing}. Pass --fashion_mnist_dir=DIR holding '
        f'{sorted(sum(FASHION_MNIST_FILES.values(), ()))} '
        '(the originals from github.com/zalandoresearch/fashion-mnist).')
  images, labels = map(read_idx, paths)
  if len(images) != len(labels):
    raise ValueError(f'{paths[0]} has {len(images)} images but {paths[1]} '
                     f'{len(labels)} labels.')
  return images, labels


# ---- Pretraining -------------------------------------------------------------------------


def pretrain_config(*, steps: int, batch: int, base_lr: float, warmup_steps: int,
                    seed: int) -> ml_collections.ConfigDict:
  """The project's fine-tuning recipe (`vit_jax_ft/defaults.py`) with pretraining's sizes."""
  config = defaults.get_config()
  config.total_steps, config.batch, config.base_lr = steps, batch, base_lr
  config.warmup_steps, config.seed = warmup_steps, seed
  return config


def random_zoom(key: jax.Array, images: jax.Array, max_zoom: float) -> jax.Array:
  """Zooms each NHWC image in by a factor in [1, max_zoom] at a random position."""
  n, height, width, _ = images.shape
  scale_key, shift_key = jax.random.split(key)
  scale = jax.random.uniform(scale_key, (n,), minval=1.0, maxval=max_zoom)
  # Output = input * scale + shift; shifts in [(1 - scale) * size, 0] stay inside the image.
  shift = (jax.random.uniform(shift_key, (n, 2)) * (1.0 - scale)[:, None] *
           jnp.array([height, width], jnp.float32))
  zoom = lambda image, s, t: jax.image.scale_and_translate(  # noqa: E731
      image, image.shape, (0, 1), jnp.stack([s, s]), t, method='linear')
  return jax.vmap(zoom)(images, scale, shift)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    max_zoom: float) -> Callable:
  """The project's `train.train_step`, after a random zoom of the batch seeded by `key`."""
  step = functools.partial(train.train_step, model=model, tx=tx, accum_steps=1,
                           dropout_rng=jax.random.PRNGKey(0))

  @jax.jit
  def train_step(state: train.TrainState, images, labels, key):
    return step(state, {'image': random_zoom(key, images, max_zoom), 'label': labels})

  return train_step


def accuracy(model: nn.Module, params: Params, images: np.ndarray, labels: np.ndarray,
             batch: int = 1000) -> float:
  """Top-1 accuracy on (N, H, W) uint8 grey `images`, every example counted once."""
  predict = jax.jit(lambda p, x: jnp.argmax(model.apply({'params': p}, x, train=False), -1))
  correct = 0
  for start in range(0, len(images), batch):
    x = grey_to_model_input(images[start:start + batch])
    correct += int(np.sum(np.asarray(predict(params, x)) == labels[start:start + batch]))
  return correct / len(images)


def pretrain(images: np.ndarray, labels: np.ndarray, config: ml_collections.ConfigDict,
             max_zoom: float) -> Params:
  """Trains the embedded model from scratch on (N, H, W) uint8 grey images."""
  if config.batch > len(images):
    raise ValueError(f'batch={config.batch} exceeds the {len(images)} training images.')
  if max_zoom < 1:
    raise ValueError(f'max_zoom={max_zoom}; pass 1 (no zoom) or more.')
  model = embedded_model(int(labels.max()) + 1)
  init_key, augment_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params = model.init(init_key, jnp.zeros((1,) + images.shape[1:] + (3,)),
                      train=False)['params']
  tx = optim.make_optimizer(config)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  train_step = make_train_step(model, tx, max_zoom)
  order = np.random.default_rng(config.seed)
  batches_per_epoch = len(images) // config.batch
  start_time = time.time()
  for step in range(config.total_steps):
    if step % batches_per_epoch == 0:
      permutation = order.permutation(len(images))
    index = permutation[(step % batches_per_epoch) * config.batch:][:config.batch]
    state, metrics = train_step(
        state, grey_to_model_input(images[index]), labels[index],
        jax.random.fold_in(augment_key, step))
    if step % 100 == 0 or step == config.total_steps - 1:
      logging.info('step %d/%d loss %.4f (%.0f s)', step + 1, config.total_steps,
                   float(metrics['loss']), time.time() - start_time)
  return jax.device_get(state.params)


def make_checkpoint(fashion_mnist_dir: str, out: str, config: ml_collections.ConfigDict,
                    max_zoom: float) -> float:
  """Pretrains on Fashion-MNIST train, saves to `out`; returns the test accuracy."""
  train_images, train_labels = load_fashion_mnist(fashion_mnist_dir, 'train')
  test_images, test_labels = load_fashion_mnist(fashion_mnist_dir, 'test')
  params = pretrain(train_images, train_labels, config, max_zoom)
  test_accuracy = accuracy(embedded_model(int(train_labels.max()) + 1), params,
                           test_images, test_labels)
  checkpoint.save(params, out)
  logging.info('Fashion-MNIST test accuracy %.4f; wrote %s (%d bytes)',
               test_accuracy, out, os.path.getsize(out))
  return test_accuracy


# ---- Digits --------------------------------------------------------------------------------


def upscale_digits(images: np.ndarray, size: int) -> np.ndarray:
  """(N, 8, 8) digits in 0..16 -> (N, size, size) uint8 in 0..255, bilinear."""
  grey = np.round(images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
  return np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR))
                   for g in grey])


def split_digits(test_fraction: float, seed: int) -> Mapping[str, Tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's 1797 digits (8x8, 0..16) split per class: {'train'|'test': (x, y)}."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction={test_fraction}; pass a value in (0, 1), e.g. 0.25.')
  digits = sklearn.datasets.load_digits()
  x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
      digits.images, digits.target, test_size=test_fraction,
      stratify=digits.target, random_state=seed)
  return {'train': (x_train, y_train), 'test': (x_test, y_test)}


def export_digits(out: str, *, image_size: int, test_fraction: float,
                  seed: int) -> Dict[str, int]:
  """Writes the digits as `out/{train,test}/CLASS/NNNN.png`; returns images per split."""
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f'{out} is not empty; remove it or pass another --out.')
  counts = {}
  for split, (images, labels) in split_digits(test_fraction, seed).items():
    for i, (image, label) in enumerate(zip(upscale_digits(images, image_size), labels)):
      folder = os.path.join(out, split, str(label))
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(image).save(os.path.join(folder, f'{i:04d}.png'))
    counts[split] = len(labels)
  return counts


# ---- Command line ------------------------------------------------------------------------


def _required(flag: flags.FlagHolder, command: str) -> Any:
  if flag.value is None:
    raise app.UsageError(f'{command} needs --{flag.name}.')
  return flag.value


def _make_checkpoint_command() -> None:
  config = pretrain_config(steps=_STEPS.value, batch=_BATCH.value, base_lr=_BASE_LR.value,
                           warmup_steps=_WARMUP_STEPS.value, seed=_SEED.value)
  test_accuracy = make_checkpoint(
      _required(_FASHION_MNIST_DIR, 'make_checkpoint'), _required(_OUT, 'make_checkpoint'),
      config, _MAX_ZOOM.value)
  print(f'Fashion-MNIST test accuracy: {test_accuracy:.4f}; wrote {_OUT.value}')


def _export_digits_command() -> None:
  counts = export_digits(_required(_OUT, 'export_digits'), image_size=_IMAGE_SIZE.value,
                         test_fraction=_TEST_FRACTION.value, seed=_SEED.value)
  print(f'Wrote {counts} digits images to {_OUT.value}')


COMMANDS = {'make_checkpoint': _make_checkpoint_command,
            'export_digits': _export_digits_command}


def main(argv):
  memory.hide_gpus_from_tensorflow()
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'Pass one command: {" | ".join(COMMANDS)}; got {argv[1:]}.')
  COMMANDS[argv[1]]()


if __name__ == '__main__':
  app.run(main)
