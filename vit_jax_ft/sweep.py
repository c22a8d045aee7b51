r"""Runs a study: a grid of fine-tunes, the dev-split selection, results.csv/.md and plots.

  python -m vit_jax_ft.sweep --config=configs/studies/embedded.py --workdir=/tmp/study \
      --config.total_steps=100

The config is a normal fine-tuning config plus `config.sweep` (see `studies.sweep_options`).
Each cell trains in `--workdir/<cell name>`; rerun the same command to resume (finished cells
are skipped, the interrupted one resumes from its checkpoint). On several hosts run the same
command on each, with a shared (e.g. gs://) workdir; cells run one after another.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax_ft import launch, studies, train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Study config file and its argument, e.g. configs/studies/embedded.py.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of the study (local or gs://): one '
                               'subfolder per cell, results.csv, results.md, plots.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Only list the cells the study would run.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  launch.start()
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _DRY_RUN.value:
    for cell in studies.expand(_CONFIG.value).cells:
      print(cell.name)
    return
  try:
    studies.run_study(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(launch.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
