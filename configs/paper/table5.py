r"""The ViT paper's Table 5 protocol on one dataset, with the published top-1 beside each row.

  python -m vit_jax_ft.sweep --config=configs/paper/table5.py:cifar10 --workdir=runs/table5_c10 \
      --config.pretrained_dir=checkpoints/imagenet21k

ViT-B/16, B/32, L/16, L/32 and H/14 pretrained on ImageNet-21k, fine-tuned at 384 px with
batch 512, SGD momentum 0.9, no weight decay, clipping at 1, cosine decay; ImageNet 20k steps
with lr in {0.003, 0.01, 0.03, 0.06}, the others 10k (CIFAR) or 500 steps (Pets, Flowers) with
lr in {0.001, 0.003, 0.01, 0.03}. The lr is chosen on the part of the training split the
preset holds out (2% CIFAR, 1% ImageNet, 10% Pets and Flowers). DATASET: a key of PUBLISHED.
"""
import os

import ml_collections

from vit_jax_ft import defaults, studies

# Where `python -m vit_jax_ft.hub fetch` puts the ImageNet-21k files, in this repository.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'checkpoints', 'imagenet21k')

MODELS = ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14')
# Table 5 of Dosovitskiy et al. (2021), top-1 %, in the order of MODELS.
PUBLISHED = {
    'cifar10': (98.95, 98.79, 99.16, 99.13, 99.27),
    'cifar100': (91.67, 91.97, 93.44, 93.04, 93.82),
    'imagenet2012': (83.97, 81.28, 85.15, 80.99, 85.13),
    'oxford_flowers102': (99.38, 99.11, 99.61, 99.19, 99.51),
    'oxford_iiit_pet': (94.43, 93.02, 94.73, 93.09, 94.82),
}
LEARNING_RATES = {'imagenet2012': (0.003, 0.01, 0.03, 0.06)}
DEFAULT_LEARNING_RATES = (0.001, 0.003, 0.01, 0.03)


def get_config(dataset: str = 'cifar10') -> ml_collections.ConfigDict:
  """Returns the Table 5 study of `dataset`: 5 models x 4 learning rates."""
  if dataset not in PUBLISHED:
    raise ValueError(f'No Table 5 numbers for {dataset!r}; known: {sorted(PUBLISHED)}.')
  config = defaults.with_dataset(defaults.get_config(), dataset)
  config.pretrained_dir = PRETRAINED_DIR
  config.weight_decay = 0.0
  config.grad_norm_clip = 1.0
  config.decay_type = 'cosine'
  config.sweep = studies.sweep_options()
  config.sweep.axes = (('model_name', MODELS),
                       ('base_lr', LEARNING_RATES.get(dataset, DEFAULT_LEARNING_RATES)))
  config.sweep.select = ('base_lr',)
  # The preset trains on 'train[:N%]'; the rest of the training split selects.
  held_out = config.pp.train.split('[:')[1].rstrip(']')
  config.sweep.dev_split = f'train[{held_out}:]'
  config.sweep.rows = ('model_name',)
  config.sweep.published = tuple(((model,), value)
                                 for model, value in zip(MODELS, PUBLISHED[dataset]))
  return config
