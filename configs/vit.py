r"""Fine-tunes a released ViT on a dataset with the paper's recipe.

  python -m vit_jax_ft.main --workdir=/tmp/vit --config=configs/vit.py:b16,cifar10 \
      --config.pretrained_dir=checkpoints/imagenet21k

MODEL is a short name (`ti16`, `s16`, `b16`, `l16`, `h14`, `b8`, `s32`, `b32`, `l32`,
`r50_b16`, ...) or any registry name (`ViT-B_16`, `swin_base_patch4_window7_224`, `resnet50`,
...); DATASET a preset of vit_jax_ft/defaults.py.
"""
import os

import ml_collections

from vit_jax_ft import defaults, hub

# Paths in this file are relative to the repository holding it, not to the current folder.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHORT_NAMES = {
    'ti16': 'ViT-Ti_16', 's16': 'ViT-S_16', 'b16': 'ViT-B_16', 'l16': 'ViT-L_16',
    'h14': 'ViT-H_14', 'b8': 'ViT-B_8', 's32': 'ViT-S_32', 'b32': 'ViT-B_32',
    'l32': 'ViT-L_32', 'r_ti16': 'R+ViT-Ti_16', 'r26_s32': 'R26+ViT-S_32',
    'r26_b32': 'R26+ViT-B_32', 'r50_b16': 'R50+ViT-B_16', 'r50_l32': 'R50+ViT-L_32',
}


def get_config(model_dataset: str = 'b16,cifar10') -> ml_collections.ConfigDict:
  """Returns the fine-tuning config of `MODEL,DATASET`."""
  model, dataset = model_dataset.split(',')
  config = defaults.with_dataset(defaults.get_config(), dataset)
  config.model_name = SHORT_NAMES.get(model, model)
  # Where `python -m vit_jax_ft.hub fetch` puts the model's public file when run from the
  # repository root: checkpoints/imagenet21k/ for the official ViTs, checkpoints/timm/ for timm's.
  public = hub.pretrained_file(config.model_name)
  config.pretrained_dir = os.path.join(
      REPO, 'checkpoints', os.path.dirname(public.local_path) if public else 'imagenet21k')
  if model == 'b16' and dataset == 'cifar10':
    config.base_lr = 0.01  # As in the official configs/vit.py.
  return config
