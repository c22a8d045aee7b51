"""Orbax checkpoints of a run: atomic saves, and resuming from the newest readable one.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or
a full disk during a save leaves the previous checkpoints as they were. A checkpoint damaged
afterwards (truncated, partly deleted, overwritten) is moved aside and the one before it used.
"""
import contextlib
import os
import shutil
import sys
import time
from typing import Any, Iterator, List, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tensorflow.io import gfile

from vit_jax_ft import paths
from vit_jax_ft.run_dir import checkpoint_dir


class WorkdirError(OSError):
  """The workdir cannot be written or has no room for a checkpoint."""


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir can be restored, or a save failed."""


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Orbax manager of `workdir/checkpoints`: asynchronous, atomic, keeps the last N."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True, create=True,
      cleanup_tmp_directories=True)  # Half-written saves of a killed run.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def check_workdir(workdir: str) -> None:
  """Fails at start, not at the first save, when the workdir cannot be created or written."""
  probe = os.path.join(workdir, f'.write_test.process{jax.process_index()}.{os.getpid()}')
  try:
    gfile.makedirs(workdir)
    with gfile.GFile(probe, 'w') as f:
      f.write('x' * 4096)
    gfile.remove(probe)
  except Exception as e:  # gfile raises several types; all mean the same here.
    raise WorkdirError(f'Cannot write to --workdir={workdir} ({_short(e)}). Pick a directory '
                       'you can write to, with room for the checkpoints.') from e


def state_bytes(tree: Any) -> int:
  """Bytes of the arrays of `tree` (arrays or shape structs): the size of one checkpoint."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def check_space(workdir: str, target: Any) -> None:
  """Fails before training when a local workdir has no room for one more checkpoint."""
  if paths.is_remote(workdir):
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):  # Another host may not have made it yet.
    existing = os.path.dirname(existing)
  needed, free = state_bytes(target), shutil.disk_usage(existing).free
  if free < needed:
    raise WorkdirError(f'--workdir={workdir} has {free / 2**20:.1f} MiB free but a checkpoint '
                       f'takes {needed / 2**20:.1f} MiB. Free some space or pick another '
                       'workdir; lower config.keep_checkpoints to keep fewer.')


def _short(error: BaseException) -> str:
  """The first line of the innermost cause: orbax wraps tensorstore's message in pages of spec."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}'


def _is_read_noise(exc: Optional[BaseException]) -> bool:
  text = str(exc)
  return 'Event loop is closed' in text or 'Encountered error while reading array' in text


def _quiet_failed_reads() -> None:
  """Drops the `Event loop is closed` tracebacks that orbax's abandoned reads print, sometimes
  much later, once one read of a damaged checkpoint has failed; other errors pass through."""
  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook
  if getattr(previous_hook, 'quiets_failed_reads', False):
    return

  def hook(kind, value, tb):
    if not _is_read_noise(value):
      previous_hook(kind, value, tb)

  def unraisable(info):
    if not _is_read_noise(info.exc_value):
      previous_unraisable(info)

  hook.quiets_failed_reads = True
  sys.excepthook, sys.unraisablehook = hook, unraisable


def _shape_mismatch(mgr: ocp.CheckpointManager, step: int, target: Any) -> Optional[str]:
  """The first array saved with another shape than in `target`, or a part (`ema_params`) saved
  but not wanted or the reverse: a changed config, not damage."""
  saved = mgr.item_metadata(step)
  saved = getattr(saved, 'tree', saved)
  for name, value in (saved.items() if isinstance(saved, dict) else ()):
    if value is not None and getattr(target, name, 0) is None:
      return f'.{name} is in the checkpoint, not in the state this config trains'
  pairs = jax.tree_util.tree_flatten_with_path(target)[0]
  for path, want in pairs:
    node = saved
    try:
      for key in path:
        node = node[getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', None)))]
        if node is None:
          return f'{jax.tree_util.keystr(path)} is in the state this config trains, not there'
    except (KeyError, IndexError, TypeError):
      return None  # Missing metadata: damage, or another optimiser; the restore tells.
    if tuple(node.shape) != tuple(want.shape):
      return f'{jax.tree_util.keystr(path)} is {tuple(node.shape)} there, {tuple(want.shape)} now'
  return None


def _try_restore(mgr: ocp.CheckpointManager, step: int, target: Any) -> Tuple[Any, str]:
  """(state, '') or (None, the error) for one step."""
  try:
    mismatch = _shape_mismatch(mgr, step, target)
  except Exception as e:  # Unreadable metadata: a damaged checkpoint.
    return None, _short(e)
  if mismatch:
    raise CheckpointError(
        f'The checkpoint of step {step} in {mgr.directory} was written with another model, '
        f'image size or config.ema_decay: {mismatch}. Rerun with the config of that run '
        '(config.json in the workdir) or pass a new --workdir.')
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore(target)), ''
  except Exception as e:  # Orbax and tensorstore raise many types for damaged files.
    _quiet_failed_reads()
    return None, _short(e)


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> str:
  """Renames a damaged step directory (kept for inspection) so orbax no longer sees it."""
  source = os.path.join(str(mgr.directory), str(step))
  dest = f'{source}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}'
  if jax.process_index() == 0:
    gfile.rename(source, dest)
  multihost_utils.sync_global_devices(f'moved aside checkpoint {step}')
  return dest


def restore_latest(mgr: ocp.CheckpointManager, target: Any) -> Optional[Any]:
  """The newest checkpoint that restores into `target`; damaged newer ones are moved aside.

  None when there is no checkpoint; CheckpointError when there are some but none is readable.
  """
  failures: List[Tuple[int, str]] = []
  for step in sorted(mgr.all_steps(), reverse=True):
    state, error = _try_restore(mgr, step, target)
    if state is None:
      failures.append((step, error))
      continue
    for bad, bad_error in failures:
      dest = _move_aside(mgr, bad)
      logging.warning('The checkpoint of step %d cannot be read (%s); moved it to %s and '
                      'resuming from step %d.', bad, bad_error, dest, step)
    mgr.reload()
    return state
  if failures:
    listing = '; '.join(f'step {s}: {e}' for s, e in failures)
    raise CheckpointError(
        f'No checkpoint in {mgr.directory} can be read ({listing}). Either move that directory '
        'aside (e.g. `mv checkpoints checkpoints.bad` in the workdir) to train again from the '
        'start, put back a copy of a good checkpoint, or pass a new --workdir.')
  return None


def save(mgr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts an asynchronous save of `state` at `step`; raises if an earlier save failed."""
  with _save_errors(mgr):
    mgr.save(step, args=ocp.args.StandardSave(state), force=True)


def finish(mgr: ocp.CheckpointManager) -> None:
  """Waits for the last save and closes the manager; raises if the save failed."""
  with _save_errors(mgr):
    mgr.wait_until_finished()
  mgr.close()


@contextlib.contextmanager
def _save_errors(mgr: ocp.CheckpointManager) -> Iterator[None]:
  try:
    yield
  except Exception as e:  # Disk full, permissions, a lost bucket: orbax surfaces them here.
    mgr.reload()
    raise CheckpointError(
        f'Writing a checkpoint to {mgr.directory} failed ({_short(e)}). The earlier '
        f'checkpoints are intact (steps {list(mgr.all_steps())}); free some space or fix the '
        'permissions and rerun the same command to resume.') from e
