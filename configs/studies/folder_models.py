r"""Your own image folder against three ImageNet-21k models, lr selected on a dev split.

  python -m vit_jax_ft.sweep --config=configs/studies/folder_models.py:/data/my_photos \
      --workdir=runs/my_photos

ROOT is a folder `ROOT/{train,test}/CLASS/*.jpg`; ViT-B/16, ViT-B/32 and BiT-M-R50x1 (fetched
by name into checkpoints/ when absent) fine-tune at 224 px for 500 steps on 90% of
`train`, lr in {0.001, 0.003, 0.01, 0.03} chosen on the other 10%.
"""
import ml_collections

from vit_jax_ft import defaults, studies

MODELS = (('ViT-B_16', 'imagenet21k/ViT-B_16'), ('ViT-B_32', 'imagenet21k/ViT-B_32'),
          ('BiT-M-R50x1', 'BiT-M-R50x1'))


def get_config(root: str = '') -> ml_collections.ConfigDict:
  """Returns the folder study of `root`: 3 models x 4 learning rates."""
  if not root:
    raise ValueError('Give the folder: --config=configs/studies/folder_models.py:ROOT.')
  config = defaults.get_config()
  config.dataset = root
  config.total_steps, config.warmup_steps = 500, 100
  config.pp.train, config.pp.crop = 'train[:90%]', 224
  config.sweep = studies.sweep_options()
  names, paths = zip(*MODELS)
  config.sweep.axes = ((('model_name', names), ('pretrained_path', paths)),
                       ('base_lr', (0.001, 0.003, 0.01, 0.03)))
  config.sweep.dev_split = 'train[90%:]'
  return config
