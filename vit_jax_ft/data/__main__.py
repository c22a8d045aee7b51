r"""Prints a dataset's classes and per-class counts; prepares a tfds dataset from its manual_dir.

  python -m vit_jax_ft.data --config.dataset=fashion_mnist --config.tfds_data_dir=~/tfds \
      --prepare --config.tfds_manual_dir=../shared/data/fashion_mnist
  python -m vit_jax_ft.data --config=configs/vit.py:b16,cifar10 --config.balance=resample
  python -m vit_jax_ft.data --config.dataset=/data/fungi --config.train_fraction=0.25
"""
from absl import app, flags
from ml_collections import config_flags

from vit_jax_ft import data, defaults, memory
from vit_jax_ft.data import folder, sources, tfds_source

_CONFIG = config_flags.DEFINE_config_file('config', defaults.__file__,
                                          'Config file (`file.py:args`); override keys with '
                                          '--config.KEY=VALUE.')
_PREPARE = flags.DEFINE_bool('prepare', False, 'Prepare the tfds dataset first (from '
                             'config.tfds_manual_dir, or downloading if tfds_download).')


def main(argv):
  memory.hide_gpus_from_tensorflow()
  del argv
  config = _CONFIG.value
  if _PREPARE.value and not folder.is_folder(config.dataset):
    builder = tfds_source.get_builder(config.dataset, config.tfds_data_dir,
                                      config.tfds_manual_dir, config.tfds_download)
    print(f'{config.dataset} is prepared in {builder.data_dir}')
  info = data.get_dataset_info(config)
  print(f'dataset {config.dataset}: {info.num_classes} classes, train {config.pp.train!r} '
        f'{info.num_train} per epoch, test {config.pp.test!r} {info.num_test}')
  for split, corrupt in ((config.pp.train, info.num_train_corrupt),
                         (config.pp.test, info.num_test_corrupt)):
    if corrupt:
      print(f'{split!r}: {corrupt} images left out as corrupt (named in the log)')
  unknown = ['?'] * info.num_classes  # Streamed splits: counting would read all of them.
  train_counts = info.train_class_counts or unknown
  test_counts = unknown
  if not data.streams(config, config.pp.test):
    test = sources.get_source(config, config.pp.test, train=False).examples
    test_counts = data.class_counts(test.labels, info.num_classes)
  print(f'{"class":>5s}  {"name":24s} {"train":>8s} {"test":>8s}')
  for c, name in enumerate(info.class_names):
    print(f'{c:5d}  {name[:24]:24s} {train_counts[c]:>8} {test_counts[c]:>8}')


if __name__ == '__main__':
  app.run(main)
