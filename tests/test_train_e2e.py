"""End to end: the CLI fine-tunes, evaluates every test image once, and resumes exactly."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from vit_jax_ft import run_dir
from conftest import fresh_process_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory) -> pathlib.Path:
  """scikit-learn's real 8x8 digits as an image folder ROOT/{train,test}/CLASS/*.png."""
  root = tmp_path_factory.mktemp('digits')
  digits = load_digits()
  for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    split = 'test' if i % 4 == 0 else 'train'
    folder = root / split / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f'{i}.png')
  return root


def run_cli(workdir, dataset, *flags, check=True, extra_env=None, **popen):
  env = fresh_process_env(**(extra_env or {}))
  cmd = [sys.executable, '-m', 'vit_jax_ft.main', f'--config=tests/tiny_config.py:{dataset}',
         f'--workdir={workdir}', *flags]
  if popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def final_params(workdir):
  return run_dir.load(str(workdir)).params


def read_log(workdir, process=0) -> str:
  """The log files of a process in the workdir, oldest run first."""
  files = sorted(pathlib.Path(workdir).glob(f'train.process{process}.*.log'),
                 key=lambda p: p.stat().st_mtime)
  return ''.join(p.read_text() for p in files)


def final_test_accuracy(workdir) -> float:
  return float(read_log(workdir).rsplit('test top-1 ', 1)[1].split(',')[0])


def evaluated_examples(workdir, process=0) -> int:
  log = read_log(workdir, process)
  return int(float(log.rsplit(' examples', 1)[0].rsplit(' on ', 1)[1]))


@pytest.fixture(scope='module')
def reference_run(digits_folder, tmp_path_factory) -> pathlib.Path:
  """One uninterrupted CLI run on the digits folder, given a relative --workdir."""
  workdir = tmp_path_factory.mktemp('reference')
  out = run_cli(os.path.relpath(workdir, ROOT), digits_folder)
  (workdir.parent / f'{workdir.name}.stderr').write_text(out.stderr)
  return workdir


def test_terminal_shows_a_start_line_each_report_and_an_end_line(reference_run):
  terminal = (reference_run.parent / f'{reference_run.name}.stderr').read_text().splitlines()
  # tests/tiny_config.py: 60 steps, a report every 10, an evaluation every 30.
  assert sum('Step ' in line and '/60: loss' in line and 'ETA' in line for line in terminal) == 6
  assert sum('Training testing (' in line for line in terminal) == 1
  assert sum('Done: 60 steps' in line for line in terminal) == 1
  assert len(terminal) <= 6 + 2 + 2 + 8, '\n'.join(terminal)
  for noise in ['orbax', 'checkpoint_manager.py', 'logging_writer.py', 'oneDNN', 'libtpu']:
    assert not any(noise in line for line in terminal), noise
  # The workdir's log file keeps the libraries' lines.
  assert 'checkpoint_manager.py' in read_log(reference_run)


def test_cli_learns_digits_and_counts_every_test_image(digits_folder, reference_run):
  config = json.loads((reference_run / 'config.json').read_text())
  assert config['model_name'] == 'testing' and config['total_steps'] == 60
  info = json.loads((reference_run / 'dataset_info.json').read_text())
  train_files = [len(list(d.glob('*.png'))) for d in sorted((digits_folder / 'train').iterdir())]
  assert info['class_names'] == [str(i) for i in range(10)]
  assert info['train_class_counts'] == train_files
  assert 'training examples per class' in read_log(reference_run)
  assert 'steps/s' in read_log(reference_run) and 'ETA' in read_log(reference_run)
  assert evaluated_examples(reference_run) == len(list((digits_folder / 'test').glob('*/*.png')))
  assert final_test_accuracy(reference_run) > 0.5  # Chance is 0.1.
  assert sorted(p.name for p in (reference_run / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['20', '40', '60']
  assert list(reference_run.glob('events.out.tfevents.*'))


def test_cli_learns_real_fashion_mnist_from_tfds(fashion_mnist_tfds_dir, tmp_path):
  workdir = tmp_path / 'fmnist'
  run_cli(workdir, 'fashion_mnist', f'--config.tfds_data_dir={fashion_mnist_tfds_dir}',
          "--config.pp.train=train[:20%]", "--config.pp.test=test[:2000]")
  assert evaluated_examples(workdir) == 2000
  assert final_test_accuracy(workdir) > 0.4  # Chance is 0.1.


def test_config_typo_is_an_error(digits_folder, tmp_path):
  out = run_cli(tmp_path / 'run', digits_folder, '--config.base_lrr=0.1', check=False)
  assert out.returncode != 0 and 'base_lr' in out.stderr


def _wait_for_checkpoint(workdir, step, process, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (workdir / 'checkpoints' / str(step)).is_dir():
      return
    assert process.poll() is None, 'training ended before the checkpoint appeared'
    time.sleep(0.05)
  raise TimeoutError(f'no checkpoint {step} in {workdir}')


def test_sigterm_saves_and_the_rerun_resumes_to_the_same_result(digits_folder, reference_run,
                                                                  tmp_path):
  # SIGKILL, at a save and anywhere else, is test_sigkill_at_random_moments_... below.
  interrupted = tmp_path / 'interrupted'
  process = run_cli(interrupted, digits_folder, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
  _wait_for_checkpoint(interrupted, 20, process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 143
  steps = sorted(int(p.name) for p in (interrupted / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 60, steps
  run_cli(interrupted, digits_folder)
  for a, b in zip(jax.tree.leaves(final_params(reference_run)),
                  jax.tree.leaves(final_params(interrupted))):
    np.testing.assert_array_equal(a, b)
  assert final_test_accuracy(interrupted) == final_test_accuracy(reference_run)


def test_damaged_latest_checkpoint_falls_back_to_the_same_result(digits_folder, reference_run,
                                                                 tmp_path):
  workdir = tmp_path / 'damaged'
  shutil.copytree(reference_run, workdir)
  data_file = max((workdir / 'checkpoints' / '60').rglob('d/*'), key=lambda p: p.stat().st_size)
  os.truncate(data_file, data_file.stat().st_size // 2)  # As a crash or a full disk leaves it.
  out = run_cli(workdir, digits_folder)
  assert out.stderr.count('cannot be read') == 1, out.stderr[-4000:]
  assert 'checkpoint of step 60 cannot be read' in out.stderr and 'resuming from step 40' in out.stderr
  assert 'Event loop is closed' not in out.stderr
  assert len(list((workdir / 'checkpoints').glob('60.corrupt-*'))) == 1
  for a, b in zip(jax.tree.leaves(final_params(reference_run)),
                  jax.tree.leaves(final_params(workdir))):
    np.testing.assert_array_equal(a, b)


def test_unwritable_workdir_fails_at_start(digits_folder, tmp_path):
  (tmp_path / 'file').write_text('a file, not a directory')
  out = run_cli(tmp_path / 'file' / 'run', digits_folder, check=False)
  assert out.returncode == 2
  assert f'Cannot write to --workdir={tmp_path}/file/run' in out.stderr
  assert 'Traceback' not in out.stderr


def test_crop_that_disagrees_with_the_ops_fails_before_compiling(digits_folder, tmp_path):
  out = run_cli(tmp_path / 'run', digits_folder, '--config.pp.crop=20', check=False)
  assert out.returncode != 0
  assert 'config.pp.crop=20' in out.stderr and 'make 16x16 images' in out.stderr
  assert 'ScopeParamShapeError' not in out.stderr and 'compiles' not in out.stderr


def _saves_in_progress(workdir):
  folder = workdir / 'checkpoints'
  return [p.name for p in folder.iterdir() if 'tmp' in p.name] if folder.is_dir() else []


def _kill_during_a_save(workdir, process):
  """SIGKILL as soon as orbax's temporary directory of a save appears."""
  while not _saves_in_progress(workdir):
    assert process.poll() is None, 'the run ended before a save was seen'
    time.sleep(0.001)
  process.kill()


def _kill_in_training(workdir, process, runs_before, delay):
  """SIGKILL `delay` seconds after this run logs that training starts."""
  while read_log(workdir).count('The first step compiles.') == runs_before:
    assert process.poll() is None, 'the run ended before training'
    time.sleep(0.01)
  time.sleep(delay)
  process.kill()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(digits_folder, reference_run,
                                                                tmp_path):
  workdir = tmp_path / 'faults'
  rng = np.random.default_rng(0)
  for attempt in range(3):
    runs_before = read_log(workdir).count('The first step compiles.') if workdir.is_dir() else 0
    process = run_cli(workdir, digits_folder, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    if attempt == 0:
      _kill_during_a_save(workdir, process)
    else:  # Anywhere: steps, saves, evaluations, or already done.
      _kill_in_training(workdir, process, runs_before, rng.uniform(0, 3))
    assert process.wait(timeout=120) in (-signal.SIGKILL, 0)
    if attempt == 0:
      assert _saves_in_progress(workdir), 'the save completed before the kill'
  run_cli(workdir, digits_folder)
  assert not _saves_in_progress(workdir)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['20', '40', '60']
  for a, b in zip(jax.tree.leaves(final_params(reference_run)),
                  jax.tree.leaves(final_params(workdir))):
    np.testing.assert_array_equal(a, b)
  assert final_test_accuracy(workdir) == final_test_accuracy(reference_run)


def test_non_finite_loss_stops_with_a_clear_message(digits_folder, tmp_path):
  out = run_cli(tmp_path / 'run', digits_folder, '--config.base_lr=1e30',
                '--config.grad_norm_clip=0', '--config.warmup_steps=0', check=False)
  assert out.returncode != 0
  assert 'training loss became' in out.stderr and 'checkpoint' in out.stderr


def test_two_processes_train_together(digits_folder, tmp_path):
  """`jax.distributed` over two local processes, each feeding its own two CPU devices."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'multi'
  processes = [
      run_cli(workdir, digits_folder, f'--coordinator_address=127.0.0.1:{port}',
              '--num_processes=2', f'--process_id={i}', '--config.total_steps=20',
              '--config.eval_every=0', '--config.checkpoint_every=10',
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
              extra_env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-4000:]
  num_test = len(list((digits_folder / 'test').glob('*/*.png')))
  for i in range(2):
    assert f'Process {i} of 2' in read_log(workdir, i)
    assert evaluated_examples(workdir, i) == num_test
  assert (workdir / 'checkpoints' / '20').is_dir()
