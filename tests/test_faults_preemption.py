"""Multi-host preemption: SIGTERM to one host or to all makes every host save the same step."""
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp

from test_train_e2e import digits_folder, read_log, run_cli  # pylint: disable=unused-import
from vit_jax_ft import checkpointing

FLAGS = ('--config.total_steps=20', '--config.eval_every=0', '--config.checkpoint_every=10')


def saved_params(workdir):
  """The latest checkpoint's parameters, restored onto this process's first device."""
  mgr = ocp.CheckpointManager(checkpointing.checkpoint_dir(str(workdir)),
                              item_handlers=ocp.StandardCheckpointHandler())
  step = mgr.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        mgr.item_metadata(step).tree)
  return mgr.restore(step, args=ocp.args.StandardRestore(target))['params']


def _launch(workdir, dataset):
  """Two `jax.distributed` processes on 127.0.0.1, two CPU devices each."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return [run_cli(workdir, dataset, f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}', *FLAGS, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT, text=True,
                  extra_env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
          for i in range(2)]


def _wait(processes):
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  return [p.returncode for p in processes], outputs


def _training(workdir, process) -> int:
  """How many runs of `process` have entered the training loop so far."""
  return read_log(workdir, process).count('The first step compiles.') if workdir.is_dir() else 0


def _terminate_in_training(workdir, dataset, targets):
  """Launches both processes and sends SIGTERM to `targets` once both are in the loop."""
  before = [_training(workdir, i) for i in range(2)]
  processes = _launch(workdir, dataset)
  deadline = time.time() + 240
  while [_training(workdir, i) for i in range(2)] != [n + 1 for n in before]:
    assert time.time() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.05)
  for i in targets:
    processes[i].send_signal(signal.SIGTERM)
  codes, outputs = _wait(processes)
  assert codes == [143, 143], [o[-3000:] for o in outputs]
  saved = [re.findall(r'Saved the checkpoint of step (\d+) after SIGTERM', o) for o in outputs]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  step = int(saved[0][0])
  assert (workdir / 'checkpoints' / str(step)).is_dir()
  return step


@pytest.mark.slow
def test_sigterm_to_one_host_then_to_both_resumes_to_the_uninterrupted_params(digits_folder,
                                                                              tmp_path):
  reference = tmp_path / 'reference'
  codes, outputs = _wait(_launch(reference, digits_folder))
  assert codes == [0, 0], [o[-3000:] for o in outputs]

  workdir = tmp_path / 'preempted'
  first = _terminate_in_training(workdir, digits_folder, targets=[1])
  second = _terminate_in_training(workdir, digits_folder, targets=[0, 1])
  assert first < second < 20
  codes, outputs = _wait(_launch(workdir, digits_folder))
  assert codes == [0, 0], [o[-3000:] for o in outputs]
  for a, b in zip(jax.tree.leaves(saved_params(reference)),
                  jax.tree.leaves(saved_params(workdir)), strict=True):
    np.testing.assert_array_equal(a, b)
