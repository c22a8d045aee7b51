r"""Fine-tunes a Vision Transformer: the command line of `train.train_and_evaluate`.

  python -m vit_jax_ft.main --config=configs/vit.py:b16,cifar10 --workdir=/tmp/run1 \
      --config.base_lr=0.01

On several hosts run the same command on each; `--jax_distributed` initialises
`jax.distributed` (automatic on TPU pods, SLURM and Open MPI; or give the coordinator).
"""
import logging as std_logging
import os
import sys
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags
from tensorflow.io import gfile

from vit_jax_ft import checkpointing, launch, train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and its argument, e.g. configs/vit.py:b16,cifar10.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, logs and the '
                               'resolved config go (local or gs://); rerun to resume.')
flags.mark_flags_as_required(['config', 'workdir'])

# Exit status of a run that cannot write its workdir or a checkpoint, or read any checkpoint.
WORKDIR_EXIT_CODE = 2


def add_gfile_logger(workdir: str) -> None:
  """Copies the log into the workdir (local or gs://), one file per process and run."""
  stamp = time.strftime('%Y%m%d-%H%M%S')
  name = f'train.process{jax.process_index()}.{stamp}.{os.getpid()}.log'
  handler = std_logging.StreamHandler(gfile.GFile(os.path.join(workdir, name), 'w'))
  handler.setFormatter(logging.PythonFormatter())
  logging.get_absl_logger().addHandler(handler)


def main(argv):
  launch.start()
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value
  try:
    checkpointing.check_workdir(workdir)
    add_gfile_logger(workdir)
    if jax.process_count() > 1:
      logging.info('Process %d of %d; devices: %s', jax.process_index(), jax.process_count(),
                   jax.devices())
    train.train_and_evaluate(_CONFIG.value, workdir)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(launch.PREEMPTED_EXIT_CODE)
  except (checkpointing.WorkdirError, checkpointing.CheckpointError) as e:
    logging.error('%s', e)
    sys.exit(WORKDIR_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
