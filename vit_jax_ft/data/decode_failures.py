"""Images found undecodable during a run: gathered from every host, logged, and counted in the
workdir's `dataset_info.json`.

Each host decodes only its share of every batch, so each host's `batching.DecodeFailures` knows
only its own failures. At the same steps on every host (report steps and after each evaluation)
`record_decode_failures` gathers the names found since the last call from all hosts, so every
host holds the same counts and process 0 alone rewrites the file. Names are counted once
however many epochs meet them; a later run in the same workdir (resumed, or a study's test
run after its dev run) keeps the training images an earlier one found.
"""
import dataclasses
import json
import os
from typing import List, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tensorflow.io import gfile

from vit_jax_ft import run_dir
from vit_jax_ft.data.batching import DecodeFailures
from vit_jax_ft.data.pipeline import DatasetInfo


def all_hosts(names: List[str]) -> List[str]:
  """Every host's `names`, in process order; one collective on several hosts (two when any
  host has names)."""
  if jax.process_count() == 1:
    return list(names)
  blob = np.frombuffer(json.dumps(names).encode(), np.uint8)
  counts, sizes = multihost_utils.process_allgather(
      np.array([len(names), blob.size], np.int32)).reshape(-1, 2).T
  if not counts.any():
    return []
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [name for size, b in zip(sizes, blobs) for name in json.loads(bytes(b[:size]))]


def with_failures(info: DatasetInfo, names: Sequence[str], train: bool) -> DatasetInfo:
  """`info` also counting `names` as corrupt images of the training (or test) split, once."""
  split = 'train' if train else 'test'
  known = getattr(info, f'{split}_decode_failures')
  new = [n for n in dict.fromkeys(names) if n not in known]
  if not new:
    return info
  return dataclasses.replace(info, **{
      f'{split}_decode_failures': known + new,
      f'num_{split}_corrupt': (getattr(info, f'num_{split}_corrupt') or 0) + len(new)})


def write_dataset_info(workdir: str, info: DatasetInfo) -> None:
  """`workdir/dataset_info.json`; process 0 writes it (every host holds the same counts)."""
  if jax.process_index() == 0:
    with gfile.GFile(os.path.join(workdir, run_dir.DATASET_INFO_FILE), 'w') as f:
      json.dump(dataclasses.asdict(info), f, indent=2)


def earlier_decode_failures(info: DatasetInfo, workdir: str) -> DatasetInfo:
  """`info` with the training images that an earlier run in `workdir` found undecodable."""
  path = os.path.join(workdir, run_dir.DATASET_INFO_FILE)
  if not gfile.exists(path):
    return info
  with gfile.GFile(path) as f:
    return with_failures(info, json.load(f).get('train_decode_failures', []), train=True)


def record_decode_failures(info: DatasetInfo, failures: DecodeFailures, train: bool,
                           workdir: str) -> DatasetInfo:
  """`info` counting the images `failures` (on any host) found since the last call, logged
  and written to dataset_info.json when there are new ones. Every host must call it."""
  updated = with_failures(info, all_hosts(failures.take_new()), train)
  if updated is not info:
    split = 'train' if train else 'test'
    names = getattr(updated, f'{split}_decode_failures')
    logging.warning('%d image(s) of the %s split failed to decode or preprocess in this run, '
                    'on all hosts: %s. dataset_info.json counts %d corrupt image(s) in it.',
                    len(names), 'training' if train else 'test', ', '.join(names),
                    getattr(updated, f'num_{split}_corrupt'))
    write_dataset_info(workdir, updated)
  return updated
