"""Automatic accum_steps against a stated memory budget, and TensorFlow kept off GPUs."""
import ast
import pathlib
import types

import jax
import numpy as np
import pytest
import tensorflow as tf

from tiny_config import get_config
from vit_jax_ft import memory, optim, parallel, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_candidates_split_each_devices_share_evenly():
  assert memory.accum_candidates(48, 2) == [1, 2, 3, 4, 6, 8, 12, 24]
  assert memory.accum_candidates(8, 8) == [1]


@pytest.mark.parametrize('budget', [1, 35, 60, 99, 100, 1000])
def test_bisection_finds_the_fewest_that_fit(budget):
  candidates = [1, 2, 3, 4, 6, 8, 12, 24]
  table = {k: 200 // k + 10 for k in candidates}  # Falls as k grows.
  asked = []

  def need(k):
    asked.append(k)
    return table[k]
  fitting = [k for k in candidates if table[k] <= budget]
  assert memory.fewest_that_fit(candidates, need, budget) == (min(fitting) if fitting
                                                               else None)
  assert len(asked) <= 1 + int(np.ceil(np.log2(len(candidates))))


def tiny(batch):
  config = get_config()
  config.batch, config.auto_accum_steps, config.pp.crop = batch, True, 32  # 65 tokens.
  config.total_steps, config.warmup_steps = 10, 2
  return config, optim.make_optimizer(config), parallel.create_mesh()


def need_of(config, tx, mesh, accum_steps, remat=False):
  """Bytes the compiled step needs, read off XLA's memory analysis independently."""
  model = train.build_model(config, 5).clone(remat=remat)
  state = train.abstract_train_state(config, model, tx, mesh)
  size = config.pp.crop
  batch = {'image': jax.ShapeDtypeStruct((config.batch, size, size, 3), np.float32),
           'label': jax.ShapeDtypeStruct((config.batch,), np.int32)}
  step = train.jit_train_step(model, tx, accum_steps=accum_steps, seed=0)
  m = step.lower(state, batch).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def test_auto_accum_steps_picks_the_fewest_micro_batches_that_fit_the_budget():
  config, tx, mesh = tiny(batch=8)
  needs = {k: need_of(config, tx, mesh, k) for k in (1, 2)}
  assert needs[1] > needs[2]  # Smaller micro-batches, less memory.
  config.memory_budget_gb = (needs[2] + needs[1]) / 2 / 2**30
  accum_steps, model = train.fit_in_memory(config, train.build_model(config, 5), tx, mesh)
  assert accum_steps == 2 and not model.remat


def test_auto_accum_steps_turns_on_remat_only_when_no_split_fits():
  config, tx, mesh = tiny(batch=8)
  plain, remat = need_of(config, tx, mesh, 8), need_of(config, tx, mesh, 8, remat=True)
  assert remat < plain
  config.memory_budget_gb = (remat + plain) / 2 / 2**30
  accum_steps, model = train.fit_in_memory(config, train.build_model(config, 5), tx, mesh)
  assert accum_steps == 8 and model.remat


class FakeCompiled:
  """What `memory_analysis()` of a compiled step reports, for a stated need."""

  def __init__(self, need):
    self.need = need

  def memory_analysis(self):
    return types.SimpleNamespace(argument_size_in_bytes=self.need, output_size_in_bytes=10,
                                 alias_size_in_bytes=10, temp_size_in_bytes=0)


def test_a_step_that_fits_nowhere_is_an_error_naming_the_fixes():
  config, _, _ = tiny(batch=8)
  config.memory_budget_gb = 1.0
  tried = []

  def compile_step(k, remat):
    tried.append((k, remat))
    return FakeCompiled((16 if remat else 32) * 2**30 // k)
  with pytest.raises(ValueError, match=r'needs at least 2\.000 GiB .* over the 1\.000 GiB '
                     r'budget; use more devices'):
    memory.fit_accum_steps(config, compile_step)
  assert tried == [(8, False), (8, True)]  # The finest split without, then with remat.
  config.memory_budget_gb = 2.5
  assert memory.fit_accum_steps(config, compile_step) == (8, True)


def test_auto_accum_steps_without_a_limit_asks_for_a_budget():
  config, _, _ = tiny(batch=16)
  if (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit'):
    pytest.skip('this device reports its memory limit')
  with pytest.raises(ValueError, match='set config.memory_budget_gb'):
    memory.memory_budget(config)


@pytest.mark.parametrize('key, value, match', [
    ('accum_steps', 0, 'must be a positive integer'),
    ('accum_steps', 5, r'config.batch=16 must be a positive multiple of 5.*accum_steps=5'),
    ('memory_budget_gb', -1.0, 'must be positive'),
])
def test_bad_accumulation_settings_are_named(key, value, match):
  config, _, _ = tiny(batch=16)
  config.auto_accum_steps = False
  config[key] = value
  with pytest.raises(ValueError, match=match):
    memory.check_accum_steps(config)


def test_tensorflow_sees_no_gpu(monkeypatch):
  calls = []
  real = tf.config.set_visible_devices
  monkeypatch.setattr(tf.config, 'set_visible_devices',
                      lambda devices, kind: (calls.append((list(devices), kind)),
                                             real(devices, kind)))
  memory.hide_gpus_from_tensorflow()
  assert calls == [([], 'GPU')]
  assert tf.config.get_visible_devices('GPU') == []


ENTRY_POINTS = ['vit_jax_ft/evaluate.py', 'vit_jax_ft/predict.py',
                'vit_jax_ft/embedded.py', 'vit_jax_ft/explain/__main__.py',
                'vit_jax_ft/data/__main__.py', 'bench/input_pipeline.py',
                'bench/train_step.py', 'bench/compare_official.py']


# The training commands start through launch.start, whose first statement hides the GPUs.
LAUNCHED = ['vit_jax_ft/main.py', 'vit_jax_ft/sweep.py']


def _first_statement(path: str, function: str) -> str:
  tree = ast.parse((ROOT / path).read_text())
  body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function).body
  body = [s for s in body if not isinstance(s, ast.Expr)
          or not isinstance(s.value, ast.Constant)]  # Past a docstring.
  return ast.unparse(body[0])


@pytest.mark.parametrize('path', ENTRY_POINTS + LAUNCHED)
def test_every_entry_point_hides_gpus_from_tensorflow_first(path):
  first = _first_statement(path, 'main')
  assert first == ('launch.start()' if path in LAUNCHED
                   else 'memory.hide_gpus_from_tensorflow()'), (path, first)
  assert _first_statement('vit_jax_ft/launch.py', 'start') == (
      'memory.hide_gpus_from_tensorflow()')
