r"""A ViT trained from scratch on the real CIFAR-10 images of ../shared/data: accuracy in N steps.

  python -m bench.scratch_cifar10 --config=configs/scratch/cifar10.py:ti \
      --config.total_steps=300 --config.warmup_steps=30 --config.batch=64

The shared `cifar10_partial.npz` (4,660 training and 846 test images, all 10 classes) is
written as a PNG folder ROOT/{train,test}/CLASS/ in a temporary folder, and the config's
from-scratch recipe (AdamW, warm-up, weight decay, pad-4 random crop and flip) trains on all
4,660 and tests on the 846 through the normal training loop. It prints the test top-1
reached, the steps and epochs it took, and the wall time. Not a test: it takes minutes.
"""
import pathlib
import tempfile
import time

from absl import app, flags
import numpy as np
from ml_collections import config_flags
from PIL import Image

from vit_jax_ft import train

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
               'ship', 'truck')

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/scratch/cifar10.py:ti', 'A from-scratch config; --config.* overrides.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the run goes (default: a temporary '
                               'folder); an existing one resumes.')


def write_folder(root: pathlib.Path) -> int:
  """The shared CIFAR-10 images as ROOT/{train,test}/CLASS/NNNNN.png; returns the training
  images written."""
  npz = SHARED_DATA / 'cifar10_partial.npz'
  if not npz.exists():
    raise SystemExit(f'{npz} is absent: this benchmark needs the shared real CIFAR-10 images.')
  cifar = np.load(npz)
  for split in ('train', 'test'):
    for i, (image, label) in enumerate(zip(cifar[f'x_{split}'], cifar[f'y_{split}'])):
      folder = root / split / CLASS_NAMES[int(label)]
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f'{i:05d}.png')
  return len(cifar['y_train'])


def main(argv):
  del argv
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / 'cifar10'
    num_train = write_folder(root)
    config.dataset = str(root)
    config.pp.train, config.pp.test = 'train', 'test'
    config.cache = True  # Decoded once: the 32 px images fit in memory.
    started = time.time()
    metrics = train.train_and_evaluate(config, _WORKDIR.value or str(pathlib.Path(tmp) / 'run'))
    seconds = time.time() - started
  epochs = config.total_steps * config.batch / num_train
  options = {k: v for k, v in config.model.items() if v is not None}
  print(f'scratch_cifar10: {config.model_name} {options} from scratch, {config.total_steps} '
        f'steps of batch {config.batch} ({epochs:.1f} epochs of {num_train:,} images): test '
        f'top-1 {metrics["accuracy_top1"]:.4f} on {int(metrics["num_examples"])} images in '
        f'{seconds:.0f} s.')


if __name__ == '__main__':
  app.run(main)
