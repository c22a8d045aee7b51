r"""Training-data fraction: ViT-B/16 against BiT-M-R50x1 on 100, 50, 25 and 10% of the data.

  python -m vit_jax_ft.sweep --config=configs/studies/data_fraction.py:oxford_flowers102 \
      --workdir=runs/fraction_flowers

Both ImageNet-21k models by their public names (fetched into checkpoints/ when absent), the
preset of DATASET (cifar100 or oxford_flowers102), `train_fraction` of the training split
(chosen by `seed`), lr in {0.001, 0.003, 0.01, 0.03} selected on the
held-out part. Rows: the fraction; columns: the model.
"""
import ml_collections

from vit_jax_ft import defaults, studies


def get_config(dataset: str = 'cifar100') -> ml_collections.ConfigDict:
  """Returns the data-fraction study of `dataset`: 4 fractions x 2 models x 4 lrs."""
  config = defaults.with_dataset(defaults.get_config(), dataset)
  config.sweep = studies.sweep_options()
  config.sweep.axes = (
      ('train_fraction', (1.0, 0.5, 0.25, 0.1)),
      (('model_name', ('ViT-B_16', 'BiT-M-R50x1')),
       ('pretrained_path', ('imagenet21k/ViT-B_16', 'BiT-M-R50x1'))),
      ('base_lr', (0.001, 0.003, 0.01, 0.03)))
  config.sweep.dev_split = 'train[' + config.pp.train.split('[:')[1].rstrip(']') + ':]'
  config.sweep.rows = ('train_fraction',)
  config.sweep.columns = ('model_name',)
  return config
