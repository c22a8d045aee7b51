"""Scalar series from the TensorBoard event files that clu's metric writers leave."""
import collections
import os
import re
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf

# tag -> (steps, values), sorted by step.
Series = Dict[str, Tuple[np.ndarray, np.ndarray]]


def event_files(workdir: str) -> List[str]:
  """Every `events.out.tfevents.*` file under `workdir` (local or gs://)."""
  if not tf.io.gfile.isdir(workdir):
    raise FileNotFoundError(f'No workdir at {workdir!r}.')
  found = []
  for root, _, files in tf.io.gfile.walk(workdir):
    found += [os.path.join(root, f) for f in files if f.startswith('events.out.tfevents')]
  if not found:
    raise FileNotFoundError(f'No TensorBoard event files under {workdir!r}; training '
                            'writes them there (clu metric writers) as it runs.')
  return sorted(found)


def _scalar(value) -> float:
  """A summary value as a float (TF2 tensor summaries and TF1 simple values)."""
  if value.HasField('simple_value'):
    return float(value.simple_value)
  return float(tf.make_ndarray(value.tensor).reshape(()))


def read_scalars(workdir: str, pattern: str = '') -> Series:
  """All scalar series under `workdir` whose tag matches the regex `pattern`.

  A step logged twice (a resumed run re-logging it) keeps the later value.
  """
  points = collections.defaultdict(dict)
  for path in event_files(workdir):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if not re.search(pattern, value.tag):
          continue
        is_scalar = value.HasField('simple_value') or (
            value.metadata.plugin_data.plugin_name == 'scalars')
        if is_scalar:
          points[value.tag][event.step] = _scalar(value)
  return {tag: (np.array(sorted(by_step)), np.array([by_step[s] for s in sorted(by_step)]))
          for tag, by_step in sorted(points.items())}
