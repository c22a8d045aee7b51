r"""Resolution sweep: ViT-B/16 fine-tuned at 64, 128, 224, 384 and 512 px, lr chosen on dev.

  python -m vit_jax_ft.sweep --config=configs/studies/resolution.py:cifar100 \
      --workdir=runs/resolution_c100

DATASET: cifar100 or oxford_flowers102 (any preset works); the preset's steps and splits, the
official pipeline at each size (inception crop + flip for training), and lr in
{0.001, 0.003, 0.01, 0.03} selected on the part of the training split the preset holds out.
"""
import os

import ml_collections

from vit_jax_ft import defaults, studies

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'checkpoints', 'imagenet21k')
CROPS = (64, 128, 224, 384, 512)


def get_config(dataset: str = 'cifar100') -> ml_collections.ConfigDict:
  """Returns the resolution study of `dataset`: 5 sizes x 4 learning rates."""
  config = defaults.with_dataset(defaults.get_config(), dataset)
  config.model_name = 'ViT-B_16'
  config.pretrained_dir = PRETRAINED_DIR
  config.sweep = studies.sweep_options()
  config.sweep.axes = (('pp.crop', CROPS), ('base_lr', (0.001, 0.003, 0.01, 0.03)))
  config.sweep.dev_split = 'train[' + config.pp.train.split('[:')[1].rstrip(']') + ':]'
  return config
