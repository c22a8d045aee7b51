r"""Optimizer x schedule: ViT-B/16 on CIFAR-10 at 224 px, batch 32, lr selected on dev.

  python -m vit_jax_ft.sweep --config=configs/studies/optimizer_schedule.py:sgd --workdir=runs/sgd
  python -m vit_jax_ft.sweep --config=configs/studies/optimizer_schedule.py:adam --workdir=runs/adam

OPTIMIZER (sgd or adam) with its own lr grid, crossed with the schedules cosine, linear,
exponential (decaying to 1% of the peak by the last step) and reduce-on-plateau (the evaluation
loss, every `eval_every` steps); the CIFAR-10 preset's steps and splits, lr chosen on the
held-out 2%.
"""
import os

import ml_collections

from vit_jax_ft import defaults, studies

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'checkpoints', 'imagenet21k')
LEARNING_RATES = {'sgd': (0.003, 0.01, 0.03), 'adam': (1e-5, 3e-5, 1e-4)}
DECAY_TYPES = ('cosine', 'linear', 'exponential', 'reduce_on_plateau')
# The exponential schedule's learning rate at the last step, relative to the peak.
EXPONENTIAL_END = 0.01


def get_config(optimizer: str = 'sgd') -> ml_collections.ConfigDict:
  """Returns the schedule study of `optimizer`: 4 schedules x 3 learning rates."""
  if optimizer not in LEARNING_RATES:
    raise ValueError(f'Unknown optimizer {optimizer!r}; use one of {sorted(LEARNING_RATES)}.')
  config = defaults.with_dataset(defaults.get_config(), 'cifar10')
  config.model_name = 'ViT-B_16'
  config.pretrained_dir = PRETRAINED_DIR
  config.optimizer = optimizer
  config.pp.crop = 224
  config.batch, config.accum_steps = 32, 1
  config.decay_rate = EXPONENTIAL_END**(1 / (config.total_steps - config.warmup_steps))
  config.sweep = studies.sweep_options()
  config.sweep.axes = (('decay_type', DECAY_TYPES), ('base_lr', LEARNING_RATES[optimizer]))
  config.sweep.dev_split = 'train[98%:]'
  return config
