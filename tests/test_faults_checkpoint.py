"""Damaged checkpoints fall back to the previous one; failed saves and bad workdirs are clear."""
import logging
import os
import pathlib
import resource
import shutil
import signal
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import checkpointing


def _state(step: int):
  """A small train-state-like tree whose values say which step wrote it."""
  return {'step': jnp.asarray(step, jnp.int32),
          'params': {'kernel': jnp.arange(3000, dtype=jnp.float32) * step,
                     'bias': jnp.full((7,), step, jnp.float32)}}


def _target():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _manager(workdir, keep=3):
  return checkpointing.manager(str(workdir), SimpleNamespace(keep_checkpoints=keep))


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
  """A workdir with the checkpoints of steps 1, 2 and 3."""
  mgr = _manager(tmp_path)
  for step in (1, 2, 3):
    checkpointing.save(mgr, step, _state(step))
  checkpointing.finish(mgr)
  return tmp_path


def _data_files(workdir, step):
  files = [p for p in (workdir / 'checkpoints' / str(step)).rglob('*')
           if p.is_file() and p.parent.name == 'd']
  assert files, 'orbax changed its layout'
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _truncate(workdir, step):
  path = _data_files(workdir, step)[0]
  os.truncate(path, path.stat().st_size // 2)


def _delete(workdir, step):
  _data_files(workdir, step)[0].unlink()


def _garbage(workdir, step):
  path = _data_files(workdir, step)[0]
  path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _delete_metadata(workdir, step):
  (workdir / 'checkpoints' / str(step) / 'default' / '_METADATA').unlink()


DAMAGE = {'truncated': _truncate, 'deleted': _delete, 'garbage': _garbage,
          'metadata deleted': _delete_metadata}


def _assert_tree_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('damage', DAMAGE)
def test_damaged_latest_is_moved_aside_and_the_previous_restored(workdir, damage, caplog,
                                                                  capfd):
  DAMAGE[damage](workdir, 3)
  mgr = _manager(workdir)
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore_latest(mgr, _target())
  _assert_tree_equal(restored, _state(2))
  warnings = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warnings) == 1 and 'step 3 ' in warnings[0] and 'resuming from step 2' in warnings[0]
  moved = [p.name for p in (workdir / 'checkpoints').iterdir() if p.name.startswith('3.corrupt-')]
  assert len(moved) == 1 and moved[0] in warnings[0]
  assert list(mgr.all_steps()) == [1, 2]
  checkpointing.save(mgr, 3, _state(3))  # The step can be written again.
  checkpointing.finish(mgr)
  assert 'Event loop is closed' not in capfd.readouterr().err


def test_two_damaged_fall_back_two_steps(workdir, caplog):
  _truncate(workdir, 3)
  _garbage(workdir, 2)
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore_latest(_manager(workdir), _target())
  _assert_tree_equal(restored, _state(1))
  assert sum('cannot be read' in r.getMessage() for r in caplog.records) == 2


def test_none_readable_is_a_clear_error_that_moves_nothing(workdir):
  for step in (1, 2, 3):
    _truncate(workdir, step)
  with pytest.raises(checkpointing.CheckpointError, match='No checkpoint') as error:
    checkpointing.restore_latest(_manager(workdir), _target())
  assert all(f'step {s}:' in str(error.value) for s in (1, 2, 3))
  assert 'mv checkpoints' in str(error.value) and '--workdir' in str(error.value)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['1', '2', '3']


def test_a_changed_model_is_not_mistaken_for_damage(workdir):
  target = _target()
  target['params']['bias'] = jax.ShapeDtypeStruct((8,), jnp.float32)
  with pytest.raises(checkpointing.CheckpointError, match=r"another model.*\(7,\).*\(8,\)"):
    checkpointing.restore_latest(_manager(workdir), target)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['1', '2', '3']


def test_no_checkpoint_restores_none(tmp_path):
  assert checkpointing.restore_latest(_manager(tmp_path), _target()) is None


@pytest.fixture
def file_size_limit():
  """Caps the size of files this process writes, as a full disk would (EFBIG, not a signal)."""
  previous_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

  def limit(nbytes):
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  yield limit
  resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  signal.signal(signal.SIGXFSZ, previous_signal)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, file_size_limit):
  mgr = _manager(tmp_path, keep=1)  # The old checkpoint would be the first to go.
  checkpointing.save(mgr, 1, _state(1))
  mgr.wait_until_finished()
  file_size_limit(2000)  # The 12 kB kernel no longer fits.
  with pytest.raises(checkpointing.CheckpointError, match=r'failed.*intact \(steps \[1\]\)'):
    checkpointing.save(mgr, 2, _state(2))
    checkpointing.finish(mgr)
  file_size_limit(resource.RLIM_INFINITY)
  steps = [p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  assert steps == ['1']
  _assert_tree_equal(checkpointing.restore_latest(_manager(tmp_path), _target()), _state(1))


def test_an_unwritable_workdir_fails_at_start(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(checkpointing.WorkdirError, match=f'--workdir={blocker}/run'):
    checkpointing.check_workdir(str(blocker / 'run'))
  checkpointing.check_workdir(str(tmp_path / 'run'))  # A good one passes and stays clean.
  assert not list((tmp_path / 'run').iterdir())


def test_a_full_workdir_fails_before_training(tmp_path, monkeypatch):
  needed = checkpointing.state_bytes(_target())
  assert needed == 4 + 4 * 3000 + 4 * 7
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: usage._replace(free=needed - 1))
  with pytest.raises(checkpointing.WorkdirError, match='MiB free but a checkpoint takes'):
    checkpointing.check_space(str(tmp_path), _target())
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: usage._replace(free=needed))
  checkpointing.check_space(str(tmp_path / 'not' / 'made' / 'yet'), _target())
