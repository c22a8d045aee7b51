"""run_dir: a workdir written as training writes it, read back without the trainer onto other
devices, rebuilt from its recorded model spec when the registry changed, and bad input."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import fresh_process_env
from vit_jax_ft import models, run_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Saves a workdir as `train_and_evaluate` does (config.json, dataset_info.json, an orbax
# checkpoint of the whole train state through the training manager), on 4 devices.
SAVE_ON_FOUR_DEVICES = '''
import json, os, sys
import jax, numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
import tiny_config
from conftest import fresh_process_env
from vit_jax_ft import checkpointing, optim, parallel, run_dir, train
from conftest import fresh_process_env
assert jax.device_count() == 4, jax.devices()
workdir = sys.argv[1]
config = tiny_config.get_config('unused')
config.model.classifier = 'gap'
model = run_dir.build_model(config, 3)
mesh = parallel.create_mesh()
state = train.create_train_state(config, model, optim.make_optimizer(config), mesh)
manager = checkpointing.manager(workdir, config)
for step in (3, 7):
  manager.save(step, args=ocp.args.StandardSave(state.replace(step=state.step + step)),
               force=True)
manager.wait_until_finished()
manager.close()
with open(os.path.join(workdir, 'config.json'), 'w') as f:
  json.dump(run_dir.config_record(config, model), f)
with open(os.path.join(workdir, 'dataset_info.json'), 'w') as f:
  json.dump({'class_names': ['a', 'b', 'c']}, f)
np.savez(os.path.join(workdir, 'params.npz'), **traverse_util.flatten_dict(
    jax.device_get(state.params), sep='/'))
'''


@pytest.fixture(scope='module')
def four_device_workdir(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp('run')
  env = fresh_process_env(XLA_FLAGS='--xla_force_host_platform_device_count=4')
  out = subprocess.run([sys.executable, '-c', SAVE_ON_FOUR_DEVICES, str(workdir)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def saved_params(workdir):
  with np.load(workdir / 'params.npz') as npz:
    return {k: npz[k] for k in npz.files}


def test_restores_a_four_device_run_onto_this_machine(four_device_workdir):
  loaded = run_dir.load(str(four_device_workdir))
  assert loaded.step == 7 and loaded.class_names == ['a', 'b', 'c']
  assert run_dir.checkpoint_steps(str(four_device_workdir)) == [3, 7]
  flat = traverse_util.flatten_dict(loaded.params, sep='/')
  want = saved_params(four_device_workdir)
  assert sorted(flat) == sorted(want)
  for key, value in flat.items():
    assert value.sharding.device_set == set(jax.devices()), key
    np.testing.assert_array_equal(np.asarray(value), want[key])
  model = loaded.model
  assert (model.classifier, model.hidden_size, model.num_layers, model.patch_size,
          model.num_classes, model.dtype) == ('gap', 32, 2, (4, 4), 3, jnp.float32)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  assert model.apply({'params': loaded.params}, images).shape == (2, 3)
  assert run_dir.load(str(four_device_workdir), step=3).step == 3


def test_the_recorded_spec_outlives_registry_changes(four_device_workdir, tmp_path,
                                                     monkeypatch):
  monkeypatch.setitem(models.MODEL_SPECS, 'testing', dict(
      models.MODEL_SPECS['testing'], hidden_size=24, representation_size=5))
  loaded = run_dir.load(str(four_device_workdir))
  assert loaded.model.hidden_size == 32 and loaded.model.representation_size is None
  # A workdir from before the spec was recorded rebuilds from today's registry, here a
  # model that no longer fits: a clear error naming a differing parameter.
  old = tmp_path / 'old'
  shutil.copytree(four_device_workdir, old)
  config = json.loads((old / 'config.json').read_text())
  del config[run_dir.MODEL_SPEC_KEY]
  (old / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"does not fit testing at 16 px: .*'pre_logits/bias'"):
    run_dir.load(str(old))
  monkeypatch.undo()
  fallback = run_dir.load(str(old))
  assert fallback.model.classifier == 'gap' and fallback.model.hidden_size == 32


def test_spec_round_trips_through_json_for_every_family():
  for name, overrides in [('BiT-M-R50x1', {}), ('R26+ViT-S_32', {'dtype': jnp.bfloat16}),
                          ('ViT-B_16', {'representation_size': 7, 'attention': 'dot_product'}),
                          ('ViT-S_16', {'posemb': 'sincos2d', 'head_hidden': (16, 8)}),
                          ('mixer_b16_224', {}), ('swin_tiny_patch4_window7_224', {}),
                          ('resnet50', {})]:
    model = models.get_model(name, 4, **overrides)
    spec = json.loads(json.dumps(run_dir.model_spec(model)))
    rebuilt = run_dir.model_from_spec(spec)
    assert type(rebuilt) is type(model)
    assert json.loads(json.dumps(run_dir.model_spec(rebuilt))) == spec
    for field, value in overrides.items():
      assert getattr(rebuilt, field) == value
  assert run_dir.model_spec(models.get_model('BiT-M-R50x1', 4))['family'] == 'bit'
  with pytest.raises(ValueError, match="family 'convnext'"):
    run_dir.model_from_spec({'family': 'convnext', 'dtype': 'float32'})


def test_incomplete_checkpoints_and_bad_input(four_device_workdir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(four_device_workdir, workdir)
  checkpoints = workdir / 'checkpoints'
  (checkpoints / '9.orbax-checkpoint-tmp-123').mkdir()  # An interrupted save.
  shutil.copytree(checkpoints / '7', checkpoints / '7.corrupt-1700000000')  # Set aside.
  assert run_dir.checkpoint_steps(str(workdir)) == [3, 7]
  with pytest.raises(FileNotFoundError, match=r'No checkpoint 5 .* complete checkpoints: \[3, 7\]'):
    run_dir.load(str(workdir), step=5)
  shutil.rmtree(checkpoints / '7' / 'default')
  with pytest.raises(ValueError, match=r'Checkpoint 7 .* cannot be read'):
    run_dir.load(str(workdir), step=7)
  for data_file in (checkpoints / '3').glob('default/**/d/*'):
    os.truncate(data_file, 10)  # As a full disk or a crash during the copy leaves them.
  with pytest.raises(ValueError, match=r'Checkpoint 3 .* cannot be read.*complete: \[3, 7\]'):
    run_dir.load(str(workdir), step=3)
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    run_dir.load(str(tmp_path / 'nothing'))
  shutil.rmtree(checkpoints)
  with pytest.raises(FileNotFoundError, match=r'No checkpoint  in .* complete checkpoints: \[\]'):
    run_dir.load(str(workdir))


def test_readers_never_import_the_trainer():
  code = ('import sys, vit_jax_ft.predict, vit_jax_ft.run_dir, vit_jax_ft.explain.__main__, '
          'vit_jax_ft.export; print(sorted({m.split(".")[0] for m in sys.modules} & '
          '{"optax", "clu"}), "vit_jax_ft.train" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=fresh_process_env())
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['[]', 'False']
