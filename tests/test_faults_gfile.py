"""Files a run writes go through gfile: checked on tf.io.gfile's in-memory `ram://` filesystem."""
import io
import logging
import uuid

import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image
from tensorflow.io import gfile

from vit_jax_ft import checkpoint, checkpointing, main
from vit_jax_ft.explain import figures


@pytest.fixture
def remote_dir() -> str:
  """A fresh folder on a filesystem that local-file calls (open, savefig) cannot reach."""
  path = f'ram://run-{uuid.uuid4().hex}/workdir'
  yield path
  gfile.rmtree(path.rsplit('/', 1)[0])


def _png_size(path):
  with gfile.GFile(path, 'rb') as f:
    image = Image.open(io.BytesIO(f.read()))
  assert image.format == 'PNG'
  return image.size


def test_figures_reach_a_remote_workdir(remote_dir):
  confusion = np.array([[5, 1], [2, 7]])
  path = figures.confusion_matrix(confusion, ['a', 'b'], f'{remote_dir}/eval/confusion.png')
  assert path == f'{remote_dir}/eval/confusion.png' and min(_png_size(path)) > 50
  series = {'train_loss': (np.arange(1, 11), np.linspace(2, 1, 10))}
  assert min(_png_size(figures.curves(series, f'{remote_dir}/explain/curves.png'))) > 50


def test_released_checkpoint_files_reach_a_remote_path(remote_dir):
  params = {'head': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3),
                     'bias': np.zeros(3, np.float32)}}
  checkpoint.save(params, f'{remote_dir}/export/vit.npz')
  with gfile.GFile(f'{remote_dir}/export/vit.npz', 'rb') as f:
    saved = np.load(io.BytesIO(f.read()))
    np.testing.assert_array_equal(saved['head/kernel'], params['head']['kernel'])


def test_the_log_and_the_workdir_check_reach_a_remote_workdir(remote_dir):
  checkpointing.check_workdir(remote_dir)
  assert gfile.listdir(remote_dir) == []  # The probe is removed.
  logger = absl_logging.get_absl_logger()
  before = list(logger.handlers)
  main.add_gfile_logger(remote_dir)
  [handler] = [h for h in logger.handlers if h not in before]
  try:
    with_level = logger.level
    logger.setLevel(logging.INFO)
    absl_logging.info('remote log line %d', 42)
  finally:
    logger.setLevel(with_level)
    logger.removeHandler(handler)
    handler.close()
  [name] = gfile.listdir(remote_dir)
  assert name.startswith('train.process0.') and name.endswith('.log')
  with gfile.GFile(f'{remote_dir}/{name}') as f:
    assert 'remote log line 42' in f.read()
