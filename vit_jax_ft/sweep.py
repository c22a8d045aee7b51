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
import jax
from ml_collections import config_flags

from vit_jax_ft import logs, studies, train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Study config file and its argument, e.g. configs/studies/embedded.py.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of the study (local or gs://): one '
                               'subfolder per cell, results.csv, results.md, plots.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Only list the cells the study would run.')
_DISTRIBUTED = flags.DEFINE_bool('jax_distributed', False,
                                 'Call jax.distributed.initialize() (multi-host runs).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, when not detected automatically.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_LIBRARY_LOGS = flags.DEFINE_bool('library_logs', False, "Also print other libraries' INFO "
                                  'lines (orbax, clu, jax); each cell\'s log file keeps them.')
flags.mark_flags_as_required(['config', 'workdir'])

# Exit status of a cell stopped by SIGTERM after saving, as `python -m vit_jax_ft.main`.
PREEMPTED_EXIT_CODE = 143


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logs.configure_terminal(_LIBRARY_LOGS.value)
  if _DRY_RUN.value:
    for cell in studies.expand(_CONFIG.value).cells:
      print(cell.name)
    return
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    studies.run_study(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
