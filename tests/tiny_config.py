"""A seconds-long fine-tuning config for end-to-end tests: `tests/tiny_config.py:DATASET`."""
import ml_collections

from vit_jax_ft import defaults


def get_config(dataset: str = '') -> ml_collections.ConfigDict:
  """Tiny ViT from scratch on 16 px images of `dataset` (a folder or a tfds name)."""
  config = defaults.get_config()
  config.dataset = dataset
  config.pretrained_dir = ''
  config.model_name = 'testing'
  config.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2,
                           patch_size=(4, 4), dropout_rate=0.0))
  config.pp.train, config.pp.test, config.pp.crop = 'train', 'test', 16
  config.pp.train_ops = 'decode|resize(16)|value_range(-1,1)'
  config.pp.test_ops = 'decode|resize(16)|value_range(-1,1)'
  config.batch, config.batch_eval, config.accum_steps = 32, 64, 1
  config.shuffle_buffer = 512
  config.total_steps, config.warmup_steps, config.base_lr = 60, 5, 0.1
  config.eval_every, config.progress_every, config.checkpoint_every = 30, 10, 20
  config.optim_dtype = 'float32'
  return config
