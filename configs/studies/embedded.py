r"""A real study that runs offline in minutes: 3 resolutions x 2 learning rates on the digits.

  python -m vit_jax_ft.embedded export_digits --out=workdirs/digits
  python -m vit_jax_ft.sweep --config=configs/studies/embedded.py --workdir=workdirs/study

The embedded Fashion-MNIST ViT (`configs/embedded.py`) fine-tuned on scikit-learn's digits at
28, 32 and 40 px; the learning rate is chosen on 10% of the training folder held out as a dev
split, and the table reports the test accuracy of the chosen run per resolution.
"""
import importlib.util
import os

import ml_collections

from vit_jax_ft import studies

# configs/embedded.py loaded by path, so this file works from any folder (as --config does).
_SPEC = importlib.util.spec_from_file_location(
    'embedded_config', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    'embedded.py'))
embedded = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(embedded)

CROPS = (28, 32, 40)


def get_config() -> ml_collections.ConfigDict:
  """Returns the embedded study: short runs, lr selected on train[90%:]."""
  config = embedded.get_config()
  config.total_steps = 60
  config.warmup_steps = 10
  config.batch = 32
  config.eval_every = 0
  config.checkpoint_every = 30
  config.pp.train = 'train[:90%]'
  config.sweep = studies.sweep_options()
  ops = tuple(f'decode|resize({crop})|value_range(-1,1)' for crop in CROPS)
  config.sweep.axes = ((('pp.crop', CROPS), ('pp.train_ops', ops), ('pp.test_ops', ops)),
                       ('base_lr', (0.01, 0.03)))
  config.sweep.select = ('base_lr',)
  config.sweep.dev_split = 'train[90%:]'
  return config
