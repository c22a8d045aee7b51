"""What a person sees on the terminal: this package's lines, other libraries' INFO on request,
and a progress bar with ETA when stderr is a terminal. The workdir's log file keeps everything."""
import logging as std_logging
import os
import sys
import time
from typing import Optional

from absl import logging
import tqdm

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class OwnInfoOnly(std_logging.Filter):
  """Passes warnings and errors of every library, and INFO only from this package."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


def configure_terminal(library_logs: bool = False) -> None:
  """Silences other libraries' INFO (orbax, clu, jax) on stderr unless `library_logs`."""
  handler = logging.get_absl_handler()
  for existing in [f for f in handler.filters if isinstance(f, OwnInfoOnly)]:
    handler.removeFilter(existing)
  if not library_logs:
    handler.addFilter(OwnInfoOnly())


def format_duration(seconds: float) -> str:
  """1h02m, 3m05s or 42s."""
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


class _BarStream:
  """A stream that prints through `tqdm.write`, so log lines appear above the bar."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    if text.strip():
      tqdm.tqdm.write(text.rstrip('\n'), file=self._stream)

  def flush(self) -> None:
    self._stream.flush()


class Progress:
  """Steps done, the ETA of the rest, and a tqdm bar on an interactive terminal."""

  def __init__(self, start_step: int, total_steps: int, show_bar: Optional[bool] = None):
    self._start, self._total = start_step, total_steps
    self._clock: Optional[float] = None  # Starts after the first (compiling) step.
    self._clock_step = start_step
    self._bar = None
    if show_bar if show_bar is not None else sys.stderr.isatty():
      self._bar = tqdm.tqdm(initial=start_step, total=total_steps, unit='step',
                            dynamic_ncols=True, file=sys.stderr)
      python_handler = logging.get_absl_handler().python_handler
      self._stream = python_handler.stream
      python_handler.stream = _BarStream(self._stream)

  def update(self, step: int) -> None:
    """Marks `step` done."""
    if self._clock is None:
      self._clock, self._clock_step = time.time(), step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def eta(self, step: int) -> str:
    """Time left at the pace since the first step, e.g. '2m10s' ('?' before any pace)."""
    if self._clock is None or step <= self._clock_step:
      return '?'
    per_step = (time.time() - self._clock) / (step - self._clock_step)
    return format_duration(per_step * (self._total - step))

  def close(self) -> None:
    """Removes the bar and gives the terminal back to the log."""
    if self._bar is not None:
      self._bar.close()
      logging.get_absl_handler().python_handler.stream = self._stream
      self._bar = None
