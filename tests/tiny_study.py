"""A seconds-per-cell study for end-to-end tests: `tests/tiny_study.py:DATASET`."""
import ml_collections
import tiny_config

from vit_jax_ft import studies


def get_config(dataset: str = '') -> ml_collections.ConfigDict:
  """Two learning rates of the tiny ViT, selected on the last 20% of the training folder."""
  config = tiny_config.get_config(dataset)
  config.total_steps, config.checkpoint_every, config.eval_every = 20, 10, 0
  config.pp.train = 'train[:80%]'
  config.sweep = studies.sweep_options()
  config.sweep.axes = (('base_lr', (0.03, 0.3)),)
  config.sweep.dev_split = 'train[80%:]'
  return config
