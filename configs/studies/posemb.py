r"""Position-embedding ablation: a ViT trained from scratch on CIFAR-10 with and without them.

  python -m vit_jax_ft.sweep --config=configs/studies/posemb.py --workdir=runs/posemb

The `ablation` ViT of `configs/scratch/cifar10.py` (12 layers, 8 heads, 4 px patches at
32 px) with learned position embeddings (the official default), none (no `pos_embedding`
parameter) and fixed 2-D sin-cos ones (big_vision), by 2 learning rates chosen on
train[98%:], the 2% of the training split the recipe holds out.
"""
import importlib.util
import os

import ml_collections

from vit_jax_ft import studies

# configs/scratch/cifar10.py loaded by path, so this file works from any folder (as --config).
_SPEC = importlib.util.spec_from_file_location(
    'scratch_cifar10', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    'scratch', 'cifar10.py'))
scratch = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(scratch)

POSEMBS = ('learned', 'none', 'sincos2d')


def get_config() -> ml_collections.ConfigDict:
  """Returns the ablation: 3 kinds of position embedding x 2 learning rates."""
  config = scratch.get_config('ablation')
  config.sweep = studies.sweep_options()
  config.sweep.axes = (('model.posemb', POSEMBS), ('base_lr', (5e-4, 1e-3)))
  config.sweep.dev_split = 'train[98%:]'
  return config
