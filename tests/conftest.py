"""Shared test set-up: full-precision float32 matmuls, the shared data folder, helpers."""
import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util

jax.config.update('jax_default_matmul_precision', 'highest')

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'


@pytest.fixture
def shared_data() -> pathlib.Path:
  """`../shared/data` (real images); skips the test on machines without it."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent (only developer and CI machines have it)')
  return SHARED_DATA


def random_params(params, seed: int = 0, scale: float = 0.2):
  """Fills every leaf with noise (norm scales around 1) so no zero-initialised layer hides."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  out = {}
  for path, value in flat.items():
    noise = scale * rng.standard_normal(value.shape).astype(np.float32)
    out[path] = noise + (1.0 if path[-1] == 'scale' else 0.0)
  return traverse_util.unflatten_dict(out)
