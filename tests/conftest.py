"""Shared test set-up: full-precision float32 matmuls, the shared data folder, helpers."""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from flax import traverse_util

jax.config.update('jax_default_matmul_precision', 'highest')

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
TESTS = pathlib.Path(__file__).resolve().parent
# The run's XLA compilation cache for fresh processes: set by the first pytest process (the
# xdist workers inherit it), so the many tiny trainings compile each of their steps once.
_XLA_CACHE = 'VIT_JAX_FT_TEST_XLA_CACHE'
_OWNED_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
  if _XLA_CACHE not in os.environ:
    os.environ[_XLA_CACHE] = config.stash[_OWNED_CACHE] = tempfile.mkdtemp(prefix='vit_xla_')


def pytest_unconfigure(config):
  if _OWNED_CACHE in config.stash:
    shutil.rmtree(config.stash[_OWNED_CACHE], ignore_errors=True)


def fresh_process_env(**extra: str) -> dict:
  """The environment of a fresh Python process that imports the package and the tests' modules."""
  path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get('PYTHONPATH', '')])
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS='cpu')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Compiled steps are reused across processes (the same executables a compile would give:
  # results do not change); a torn entry only makes jax warn and compile again.
  if _XLA_CACHE in os.environ:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', os.environ[_XLA_CACHE])
    env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    env.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  return dict(env, **extra)


def run_on_eight_devices(script: str) -> None:
  """Runs `script` in a fresh process with 8 CPU devices; it must print SAME."""
  env = fresh_process_env(XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'SAME' in out.stdout


@pytest.fixture
def shared_data() -> pathlib.Path:
  """`../shared/data` (real images); skips the test on machines without it."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent (only developer and CI machines have it)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def fashion_mnist_tfds_dir(tmp_path_factory) -> str:
  """A tfds data_dir with the real Fashion-MNIST prepared by the stock builder (~20 s)."""
  from vit_jax_ft.data import tfds_source  # pylint: disable=import-outside-toplevel
  manual_dir = SHARED_DATA / 'fashion_mnist'
  if not manual_dir.is_dir():
    pytest.skip(f'{manual_dir} is absent (only developer and CI machines have it)')
  data_dir = tmp_path_factory.mktemp('tfds')
  tfds_source.get_builder('fashion_mnist', str(data_dir), str(manual_dir), False)
  return str(data_dir)


def random_params(params, seed: int = 0, scale: float = 0.2):
  """Fills every leaf with noise (norm scales around 1) so no zero-initialised layer hides."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  out = {}
  for path, value in flat.items():
    noise = scale * rng.standard_normal(value.shape).astype(np.float32)
    out[path] = noise + (1.0 if path[-1] == 'scale' else 0.0)
  return traverse_util.unflatten_dict(out)
