"""Images whose header is fine but whose data is not: found when decoded during training or an
evaluation (config.cache=False), each named once and counted in the log and dataset_info.json."""
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.experimental import multihost_utils

import tiny_config
from conftest import fresh_process_env
from test_data import TEST_SIZES, TRAIN_SIZES, _plant_corrupt_files, _write_folder
from vit_jax_ft import data, train
from vit_jax_ft.data import decode_failures

TRUNCATED = {split: f'{split}/ship/truncated.png' for split in ('train', 'test')}


def _folder(tmp_path):
  _write_folder(tmp_path, {'train': TRAIN_SIZES, 'test': TEST_SIZES})
  _plant_corrupt_files(tmp_path)  # A garbage .jpg (left out when read) and a truncated .png.
  return tmp_path


def test_a_truncated_image_is_counted_once_however_many_epochs_meet_it(tmp_path, caplog):
  config = tiny_config.get_config(str(_folder(tmp_path)))
  config.batch, config.prefetch = 4, 1
  caplog.set_level('WARNING')
  info = data.get_dataset_info(config)
  batches = data.get_train_data(config, process_index=0, process_count=1)
  epochs = [[next(batches) for _ in range(-(-info.num_train // 4))] for _ in range(3)]
  for epoch in epochs:  # Weight 0 in its slot in every epoch...
    assert (np.concatenate([b['weight'] for b in epoch])[:info.num_train] == 0).sum() == 1
  # ... but one name, one warning.
  assert [n.endswith(TRUNCATED['train']) for n in batches.failures.names] == [True]
  assert batches.failures.count == 1
  log = '\n'.join(r.getMessage() for r in caplog.records)
  assert log.count('truncated.png') == 1
  assert batches.failures.take_new() == batches.failures.names
  assert batches.failures.take_new() == []


def test_failures_add_to_the_read_count_once_each():
  info = data.DatasetInfo(2, ['a', 'b'], 10, 5, None, num_train_corrupt=None,
                          num_test_corrupt=3)
  info = decode_failures.with_failures(info, ['x.png', 'y.png', 'x.png'], train=True)
  info = decode_failures.with_failures(info, ['y.png', 'z.png'], train=True)
  assert (info.train_decode_failures, info.num_train_corrupt) == (['x.png', 'y.png',
                                                                    'z.png'], 3)
  info = decode_failures.with_failures(info, ['t.png'], train=False)
  assert (info.test_decode_failures, info.num_test_corrupt) == (['t.png'], 4)
  assert decode_failures.with_failures(info, ['t.png'], train=False) is info


def test_names_from_every_host_are_gathered_in_process_order(monkeypatch):
  """Two hosts: this one's names, padded and stacked with the other's (process_allgather)."""
  other_names = ['b/ü.png', 'c.png']
  calls = []

  def fake_allgather(x):
    calls.append(x.dtype)
    other = np.frombuffer(json.dumps(other_names).encode(), np.uint8)
    if x.dtype == np.int32:  # (names, bytes) of each host.
      return np.stack([x, [len(other_names), other.size]])
    padded = np.zeros_like(x)
    padded[:other.size] = other
    return np.stack([x, padded])

  monkeypatch.setattr(decode_failures.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', fake_allgather)
  assert decode_failures.all_hosts(['a.png']) == ['a.png', 'b/ü.png', 'c.png']
  assert decode_failures.all_hosts([]) == ['b/ü.png', 'c.png']
  other_names, calls[:] = [], []
  assert decode_failures.all_hosts([]) == [] and calls == [np.int32]  # Nothing new anywhere.


def test_training_counts_decode_time_failures_in_dataset_info_and_keeps_them(tmp_path,
                                                                            caplog):
  """Without the cache the truncated PNG is found only when decoded: counted beside the
  garbage file left out when the folder was read, in the log and in dataset_info.json, for
  both splits; a later run in the same workdir still counts the training one."""
  config = tiny_config.get_config(str(_folder(tmp_path / 'images')))
  config.batch, config.batch_eval, config.total_steps, config.progress_every = 8, 8, 4, 2
  config.eval_every, config.checkpoint_every, config.warmup_steps = 0, 0, 1
  workdir = tmp_path / 'run'
  caplog.set_level('WARNING')
  train.train_and_evaluate(config, str(workdir))
  info = json.loads((workdir / 'dataset_info.json').read_text())
  assert (info['num_train_corrupt'], info['num_test_corrupt']) == (2, 2)
  for split in ('train', 'test'):
    assert [n.endswith(TRUNCATED[split]) for n in info[f'{split}_decode_failures']] == [True]
  log = '\n'.join(r.getMessage() for r in caplog.records)
  assert log.count('of the training split failed to decode or preprocess in this run') == 1
  assert 'dataset_info.json counts 2 corrupt image(s)' in log
  # A later run in this workdir (resumed, or evaluating only) starts from the file's names.
  fresh = data.get_dataset_info(config)
  assert fresh.num_train_corrupt == 1 and not fresh.train_decode_failures
  again = data.earlier_decode_failures(fresh, str(workdir))
  assert again.train_decode_failures == info['train_decode_failures']
  # Each evaluation reads the whole test split, so its failures are found again instead.
  assert again.num_train_corrupt == 2 and again.num_test_corrupt == 1


HOSTS_SCRIPT = '''
import dataclasses, json, sys
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from vit_jax_ft import data
from vit_jax_ft.data import batching
found = batching.DecodeFailures('skip', 'its weight is 0')
info = data.DatasetInfo(2, ['a', 'b'], 10, 5, None, num_train_corrupt=1)
rounds = {0: [['a.png', 'both.png'], [], []], 1: [['both.png', 'b/\\u00fc.png'], [], ['c.png']]}
for names in rounds[jax.process_index()]:  # Three report steps.
  found.check(np.arange(len(names) + 1) < len(names), lambda slots: [names[s] for s in slots])
  info = data.record_decode_failures(info, found, True, sys.argv[3])
  print('INFO', json.dumps(dataclasses.asdict(info)), flush=True)
'''


@pytest.mark.slow  # Two processes that import jax and TensorFlow: half a minute on 2 cores.
def test_two_hosts_gather_each_others_failures_and_process_0_writes_the_count(tmp_path):
  """Two `jax.distributed` processes: each finds some images (one found by both), then none,
  then only process 1 finds one; both hold the same counts after every report step."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = fresh_process_env()
  processes = [subprocess.Popen([sys.executable, '-c', HOSTS_SCRIPT, address, str(i),
                                 str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in outputs]
  infos = [[json.loads(line[5:]) for line in out.splitlines() if line.startswith('INFO ')]
           for out, _ in outputs]
  assert infos[0] == infos[1] and len(infos[0]) == 3
  first, second, third = infos[0]
  assert first['train_decode_failures'] == ['a.png', 'both.png', 'b/ü.png']
  assert first['num_train_corrupt'] == 1 + 3 and second == first
  assert third['train_decode_failures'][-1] == 'c.png' and third['num_train_corrupt'] == 5
  assert json.loads((tmp_path / 'dataset_info.json').read_text()) == third
