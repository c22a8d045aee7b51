r"""Fine-tunes an AugReg checkpoint ("How to train your ViT?") picked by its published name.

  python -m vit_jax_ft.main --workdir=/tmp/augreg --config=configs/augreg.py:R_Ti_16 \
      --config.dataset=oxford_iiit_pet --config.pp.train='train[:90%]' --config.base_lr=0.01

The argument is a model prefix (`B_16`, `B_8`, `R_Ti_16`, `R26_S_32`, ...: the ImageNet-21k
checkpoint of that model with the best final validation accuracy in index.csv, as the official
code picks it; offline, the README's recommended one) or a full filename without `.npz`
(`B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0`). The file is fetched into
checkpoints/augreg/ when absent (`python -m vit_jax_ft.hub list --filter=augreg`).
"""
import ml_collections

from vit_jax_ft import defaults, hub


def get_config(model_or_filename: str = 'B_16') -> ml_collections.ConfigDict:
  """Returns the AugReg fine-tuning config; `config.dataset` must be set on the command line."""
  checkpoint = hub.lookup(f'augreg/{model_or_filename}')
  if checkpoint.model_name is None:
    raise ValueError(f'No model is registered for the AugReg file {checkpoint.name!r}.')
  config = defaults.get_config()
  config.pretrained_dir = ''
  # A short name stays short: at training start it picks the best checkpoint of index.csv
  # when reachable (as the official code does), else the README's (hub.AUGREG_RECOMMENDED).
  config.pretrained_path = (f'augreg/{model_or_filename}'
                            if model_or_filename in hub.AUGREG_RECOMMENDED else checkpoint.name)
  config.model_name = checkpoint.model_name
  config.model.dropout_rate = 0.0  # No AugReg regularisation during fine-tuning.
  # Values of the official augreg config; often overridden on the command line.
  config.base_lr = 0.03
  config.total_steps = 500
  config.warmup_steps = 100
  config.pp.train = 'train'
  config.pp.test = 'test'
  config.pp.crop = 384
  config.dataset = ''  # Must be set: --config.dataset=...
  return config
