"""What the training commands share (`main`, `sweep`): the multi-host flags and start-up, the
terminal log flag, and the exit status of a run stopped by SIGTERM."""
from absl import flags
import jax

from vit_jax_ft import logs, memory

_DISTRIBUTED = flags.DEFINE_bool('jax_distributed', False,
                                 'Call jax.distributed.initialize() (multi-host runs).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, when not detected automatically.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_LIBRARY_LOGS = flags.DEFINE_bool('library_logs', False, "Also print other libraries' INFO "
                                  'lines (orbax, clu, jax); the workdir logs keep them anyway.')

# Exit status of a run stopped by SIGTERM after saving (128 + SIGTERM, as a killed process).
PREEMPTED_EXIT_CODE = 143


def start() -> None:
  """TensorFlow off the GPUs, the terminal log, then `jax.distributed` when asked for."""
  memory.hide_gpus_from_tensorflow()
  logs.configure_terminal(_LIBRARY_LOGS.value)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
