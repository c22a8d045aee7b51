r"""Head-only against full fine-tuning of ViT-B/16 on a dataset preset, lr selected on dev.

  python -m vit_jax_ft.sweep --config=configs/studies/head_only.py:cifar100 --workdir=runs/head

`freeze` () trains everything; HEAD_ONLY (`freeze=backbone`) freezes every parameter but the
classifier (the same numerics, frozen parameters get no update). lr in {0.001, 0.003, 0.01,
0.03}.
"""
import os

import ml_collections

from vit_jax_ft import defaults, studies

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'checkpoints', 'imagenet21k')
# Every parameter but the head's (optim.FREEZE_PRESETS).
HEAD_ONLY = ('backbone',)


def get_config(dataset: str = 'cifar100') -> ml_collections.ConfigDict:
  """Returns the head-only study of `dataset`: 2 modes x 4 learning rates."""
  config = defaults.with_dataset(defaults.get_config(), dataset)
  config.model_name = 'ViT-B_16'
  config.pretrained_dir = PRETRAINED_DIR
  config.sweep = studies.sweep_options()
  config.sweep.axes = (('freeze', ((), HEAD_ONLY)), ('base_lr', (0.001, 0.003, 0.01, 0.03)))
  config.sweep.dev_split = 'train[' + config.pp.train.split('[:')[1].rstrip(']') + ':]'
  return config
