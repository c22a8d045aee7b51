"""Seconds-long fine-tuning configs of the other families: `tests/tiny_zoo_config.py:FAMILY,DATA`.

FAMILY is one of `MODELS` (a registry name and tiny widths); DATA a folder or a tfds name.
"""
import ml_collections

import tiny_config

# Family -> (registry name, tiny options).
MODELS = {
    'resnet_v1': ('resnet50', dict(layers=(1, 1, 1, 1), channels=(4, 8, 8, 8))),
    'swin': ('swin_tiny_patch4_window7_224',
             dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)),
    'mixer': ('Mixer-B_16', dict(patch_size=(8, 8), hidden_dim=16, num_blocks=2,
                                 tokens_mlp_dim=8, channels_mlp_dim=32)),
    'maxvit': ('maxvit_tiny_tf_224', dict(embed_dim=(8, 16), depths=(1, 1), stem_width=8,
                                          head_hidden_size=16, head_dim=4)),
    'davit': ('davit_tiny', dict(embed_dims=(8, 16), depths=(1, 1), num_heads=(2, 2))),
    'nat': ('nat_mini', dict(embed_dim=8, depths=(1, 1), num_heads=(2, 2),
                             dilations=((1,), (1,)))),
}


def get_config(arg: str = 'resnet_v1,') -> ml_collections.ConfigDict:
  """The tiny run of `tiny_config` with the tiny model of FAMILY at 32 px, 6 steps."""
  family, dataset = arg.split(',', 1)
  config = tiny_config.get_config(dataset)
  config.model_name, options = MODELS[family]
  config.model = ml_collections.ConfigDict(options)
  config.pp.crop = 32
  config.pp.train_ops = config.pp.test_ops = 'decode|resize(32)|value_range(-1,1)'
  config.total_steps, config.warmup_steps = 6, 2
  config.eval_every, config.progress_every, config.checkpoint_every = 0, 2, 2
  config.keep_checkpoints = 5
  return config
