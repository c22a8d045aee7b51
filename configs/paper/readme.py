r"""The official vit_jax README's replication table, with its published top-1 per cell.

  python -m vit_jax_ft.sweep --config=configs/paper/readme.py --workdir=runs/readme \
      --config.pretrained_dir=checkpoints/imagenet21k
  python -m vit_jax_ft.sweep --config=configs/paper/readme.py:short --workdir=runs/short ...

`full`: R50+ViT-B_16, ViT-B_16, B_32, L_16, L_32 on cifar10, cifar100 (10k steps) and
imagenet2012 (20k), dropout 0.0 and 0.1. `short`: ViT-B_16 on cifar10 and cifar100 for 500
(50 warm-up) and 1000 (100) steps. Both use the README's configs: batch 512, lr 0.03 with
cosine decay, warm-up 500, accum_steps 8; one run per cell, so no selection.
"""
import os

import ml_collections

from vit_jax_ft import defaults, studies

# Where `python -m vit_jax_ft.hub fetch` puts the ImageNet-21k files, in this repository.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'checkpoints', 'imagenet21k')

MODELS = ('R50+ViT-B_16', 'ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32')
DATASETS = ('cifar10', 'cifar100', 'imagenet2012')
DROPOUTS = (0.0, 0.1)
# Top-1 % of the README table: model -> dataset -> (dropout 0.0, dropout 0.1).
PUBLISHED = {
    'R50+ViT-B_16': {'cifar10': (98.72, 98.94), 'cifar100': (90.88, 92.30),
                     'imagenet2012': (83.72, 85.08)},
    'ViT-B_16': {'cifar10': (99.02, 98.76), 'cifar100': (92.06, 91.92),
                 'imagenet2012': (84.53, 84.12)},
    'ViT-B_32': {'cifar10': (98.88, 98.75), 'cifar100': (92.31, 92.05),
                 'imagenet2012': (81.66, 81.31)},
    'ViT-L_16': {'cifar10': (99.13, 99.14), 'cifar100': (92.91, 93.22),
                 'imagenet2012': (84.47, 85.05)},
    'ViT-L_32': {'cifar10': (99.06, 99.09), 'cifar100': (93.29, 93.34),
                 'imagenet2012': (81.89, 81.13)},
}
# The README's short schedule for ViT-B_16: (steps, warm-up) -> dataset -> top-1 %.
SHORT_SCHEDULES = ((500, 50), (1000, 100))
PUBLISHED_SHORT = {500: {'cifar10': 98.59, 'cifar100': 89.17},
                   1000: {'cifar10': 98.86, 'cifar100': 91.15}}


def _dataset_axes(datasets) -> tuple:
  """The dataset axis zipped with each preset's steps and splits."""
  presets = [defaults.DATASET_PRESETS[d] for d in datasets]
  return (('dataset', tuple(datasets)),
          ('total_steps', tuple(p['total_steps'] for p in presets)),
          ('pp.train', tuple(p['pp']['train'] for p in presets)),
          ('pp.test', tuple(p['pp']['test'] for p in presets)))


def get_config(table: str = 'full') -> ml_collections.ConfigDict:
  """Returns the README replication study `full` (30 cells) or `short` (4 cells)."""
  if table not in ('full', 'short'):
    raise ValueError(f"Unknown table {table!r}; use 'full' or 'short'.")
  config = defaults.with_dataset(defaults.get_config(), 'cifar10')
  config.pretrained_dir = PRETRAINED_DIR
  config.base_lr = 0.03
  config.decay_type = 'cosine'
  config.warmup_steps = 500
  config.batch = 512
  config.accum_steps = 8
  config.sweep = studies.sweep_options()
  config.sweep.select = ()
  config.sweep.dev_split = ''
  if table == 'full':
    config.sweep.axes = (('model_name', MODELS), _dataset_axes(DATASETS),
                         ('model.dropout_rate', DROPOUTS))
    config.sweep.rows = ('model_name',)
    config.sweep.columns = ('dataset', 'model.dropout_rate')
    config.sweep.published = tuple(
        ((model, dataset, dropout), PUBLISHED[model][dataset][i])
        for model in MODELS for dataset in DATASETS for i, dropout in enumerate(DROPOUTS))
  else:
    steps, warmups = zip(*SHORT_SCHEDULES)
    config.sweep.axes = (('dataset', ('cifar10', 'cifar100')),
                         (('total_steps', steps), ('warmup_steps', warmups)))
    config.sweep.rows = ('total_steps',)
    config.sweep.columns = ('dataset',)
    config.sweep.published = tuple(((s, d), v) for s, by in PUBLISHED_SHORT.items()
                                   for d, v in by.items())
  return config
