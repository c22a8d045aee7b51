"""The terminal log: other libraries' INFO filtered, durations, the ETA and the progress bar."""
import io
import logging as std_logging
import os
import sys

from absl import logging

from vit_jax_ft import logs


def _record(path: str, level: int) -> std_logging.LogRecord:
  return std_logging.LogRecord('absl', level, path, 1, 'message', (), None)


def test_only_this_package_prints_info():
  own_file = os.path.join(logs.PACKAGE_DIR, 'train.py')
  other_file = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  keep = logs.OwnInfoOnly()
  assert keep.filter(_record(own_file, std_logging.INFO))
  assert not keep.filter(_record(other_file, std_logging.INFO))
  assert keep.filter(_record(other_file, std_logging.WARNING))
  logs.configure_terminal(library_logs=False)
  logs.configure_terminal(library_logs=False)
  handler = logging.get_absl_handler()
  assert sum(isinstance(f, logs.OwnInfoOnly) for f in handler.filters) == 1
  logs.configure_terminal(library_logs=True)
  assert not any(isinstance(f, logs.OwnInfoOnly) for f in handler.filters)


def test_durations_read_like_a_clock():
  assert logs.format_duration(42.4) == '42s'
  assert logs.format_duration(185) == '3m05s'
  assert logs.format_duration(3725) == '1h02m'
  assert logs.format_duration(-3) == '0s'


def test_eta_is_the_remaining_steps_at_the_pace_after_the_first(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(logs.time, 'time', lambda: now[0])
  progress = logs.Progress(start_step=10, total_steps=110, show_bar=False)
  assert progress.eta(10) == '?'
  progress.update(11)  # The compiling step: the clock starts after it.
  now[0] += 20.0  # 10 steps in 20 s: 2 s a step, 89 steps left after step 21.
  progress.update(21)
  assert progress.eta(21) == logs.format_duration(2.0 * 89)


def test_bar_keeps_log_lines_above_it_and_gives_the_stream_back(monkeypatch):
  terminal = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', terminal)
  python_handler = logging.get_absl_handler().python_handler
  monkeypatch.setattr(python_handler, 'stream', terminal)
  original = python_handler.stream
  progress = logs.Progress(start_step=0, total_steps=4, show_bar=True)
  progress.update(1)
  python_handler.stream.write('Step 1/4: loss 1.0\n')
  progress.update(2)
  progress.close()
  assert python_handler.stream is original
  text = terminal.getvalue()
  assert 'Step 1/4: loss 1.0' in text and '2/4' in text
