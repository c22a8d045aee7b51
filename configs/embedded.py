r"""The offline default of `./run.sh`: the embedded Fashion-MNIST ViT fine-tuned on digits.

  python -m vit_jax_ft.embedded export_digits --out=workdirs/digits
  python -m vit_jax_ft.main --config=configs/embedded.py --workdir=workdirs/embedded

A new task (scikit-learn's real digits instead of Fashion-MNIST, a fresh head) at a new
resolution (40 px instead of 28: `load_pretrained` resizes the 7x7 position-embedding grid
to 10x10), from the small checkpoint in `vit_jax_ft/assets/` (its README says how it was
made). Runs in a few minutes on 2 CPU cores.
"""
import os

import ml_collections

from vit_jax_ft import defaults, embedded

# `workdirs/digits` of the repository holding this file, wherever the command runs from.
DIGITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'workdirs', 'digits')
# Fine-tuning resolution: a multiple of the 4 px patches, above the 28 px of pretraining.
CROP = 40
# The digits are small, centred and not mirror-symmetric: a plain resize, no crop or flip.
PP_OPS = f'decode|resize({CROP})|value_range(-1,1)'


def get_config() -> ml_collections.ConfigDict:
  """Returns the fine-tuning config of the embedded default."""
  config = defaults.get_config()
  config.pretrained_path = embedded.CHECKPOINT_PATH
  config.model_name = embedded.EMBEDDED_MODEL_NAME
  config.model.update(embedded.EMBEDDED_MODEL)
  # The folder written by `python -m vit_jax_ft.embedded export_digits` (as `./run.sh` does).
  config.dataset = DIGITS_DIR
  config.total_steps = 300
  config.warmup_steps = 20
  config.base_lr = 0.03
  config.batch = 64
  config.batch_eval = 256
  config.accum_steps = 1
  config.cache = True
  config.eval_every = 100
  config.progress_every = 20
  config.checkpoint_every = 100
  config.pp.train = 'train'
  config.pp.test = 'test'
  config.pp.crop = CROP
  config.pp.train_ops = PP_OPS
  config.pp.test_ops = PP_OPS
  return config
