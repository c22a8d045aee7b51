"""Swin, ResNet v1 and Mixer through training, evaluation, prediction and Grad-CAM: BatchNorm
statistics in the train state, synchronised over devices, per micro-batch or frozen."""
import csv
import functools
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import pytest
import safetensors.numpy

import tiny_zoo_config
from configs.studies import compare_models
from conftest import fresh_process_env, random_params, run_on_eight_devices
from test_train_e2e import digits_folder, read_log  # noqa: F401  (a fixture)
from vit_jax_ft import (checkpoint, data, defaults, hub, linear_probe, metrics, optim,
                        parallel, predict, run_dir, studies, train)
from vit_jax_ft.explain import gradcam
from vit_jax_ft.explain.__main__ import FIGURES, missing
from vit_jax_ft.models import get_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures'
MOMENTUM = 0.9  # Flax's momentum of the running statistics (PyTorch's 0.1 of the new ones).


def tiny_resnet(num_classes=3):
  return get_model('resnet50', num_classes, layers=(1, 1, 1, 1), channels=(4, 8, 8, 8))


def random_batch_stats(stats, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.normal(0, 0.5, x.shape) if path[-1].key == 'mean'
                       else rng.uniform(0.5, 2.0, x.shape)).astype(np.float32), stats)


def resnet_setup(batch=16, seed=0):
  """A tiny ResNet v1 with random weights and statistics, its optimiser, state and batch."""
  model = tiny_resnet()
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 10, 0, 0.1
  tx = optim.make_optimizer(config)
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 3, batch).astype(np.int32)
  variables = jax.device_get(model.init(jax.random.PRNGKey(seed), images[:1]))
  params = random_params(variables['params'], seed)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params),
                           batch_stats=random_batch_stats(variables['batch_stats']))
  return model, tx, state, {'image': images, 'label': labels}


def run_step(model, tx, state, batch, accum_steps):
  step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                      accum_steps=accum_steps,
                                      dropout_rng=jax.random.PRNGKey(1)))
  return step_fn(state, batch)


def stem_statistics(params, images):
  """Mean and (biased) variance of the stem convolution's output: what bn1 normalises."""
  conv = jax.lax.conv_general_dilated(
      jnp.asarray(images), params['conv1']['kernel'], (2, 2), [(3, 3), (3, 3)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')
  conv = np.asarray(conv, np.float64)
  return conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))


def test_micro_batches_update_the_running_statistics_one_after_the_other():
  model, tx, state, batch = resnet_setup()
  old = {k: np.asarray(v, np.float64) for k, v in state.batch_stats['bn1'].items()}
  split, _ = run_step(model, tx, state, batch, accum_steps=2)
  # Micro-batch i holds rows i, i + 2, ...: the first updates the statistics, then the second
  # (test_resnet_v1 checks the update of one batch).
  (mean_a, var_a), (mean_b, var_b) = (stem_statistics(state.params, batch['image'][i::2])
                                      for i in (0, 1))
  for key, a, b in (('mean', mean_a, mean_b), ('var', var_a, var_b)):
    after_a = MOMENTUM * old[key] + (1 - MOMENTUM) * a
    np.testing.assert_allclose(split.batch_stats['bn1'][key],
                               MOMENTUM * after_a + (1 - MOMENTUM) * b, rtol=1e-4, atol=1e-5)
  assert int(split.step) == 1 and jax.tree.structure(split) == jax.tree.structure(state)


def test_frozen_batch_norm_keeps_the_statistics_and_normalises_with_them():
  model, tx, state, batch = resnet_setup()
  config = defaults.get_config()
  assert config.batch_norm == 'train' and train.training_model(config, model) is model
  config.batch_norm = 'frozen'
  frozen_model = train.training_model(config, model)
  new_state, step_metrics = run_step(frozen_model, tx, state, batch, accum_steps=2)
  jax.tree.map(np.testing.assert_array_equal, new_state.batch_stats, state.batch_stats)
  logits = np.asarray(model.apply(state.variables, batch['image'], train=False), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -logp[np.arange(len(batch['label'])), batch['label']].mean()
  np.testing.assert_allclose(step_metrics['loss'], want, rtol=1e-5)
  assert not np.array_equal(new_state.params['conv1']['kernel'], state.params['conv1']['kernel'])
  config.batch_norm = 'running'
  with pytest.raises(ValueError, match="batch_norm='running'.*'train', 'frozen'"):
    train.check_batch_norm(config)



def test_frozen_batch_norm_of_maxvit_trains_as_it_infers():
  model = get_model('maxvit_tiny_tf_224', 3, embed_dim=(8, 8), depths=(1, 1),
                    stem_width=8, head_hidden_size=8, head_dim=4)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32)
  variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), images[:1]))
  variables = {'params': random_params(variables['params']),
               'batch_stats': random_batch_stats(variables['batch_stats'])}
  config = defaults.get_config()
  config.batch_norm = 'frozen'
  frozen = train.training_model(config, model)
  # Jitted: MaxViT's many small ops take seconds each way op by op.
  train_apply = lambda m: jax.jit(  # noqa: E731
      lambda v, x: m.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updated = train_apply(frozen)(variables, images)
  jax.tree.map(np.testing.assert_array_equal, updated['batch_stats'], variables['batch_stats'])
  inferred = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  np.testing.assert_allclose(logits, inferred, rtol=1e-5, atol=1e-6)
  moving, _ = train_apply(model)(variables, images)
  assert np.abs(np.asarray(moving) - np.asarray(logits)).max() > 1e-3

EIGHT_DEVICE_SCRIPT = '''
import jax, numpy as np
from jax.sharding import Mesh
import test_zoo_train as t
from vit_jax_ft import parallel
assert jax.device_count() == 8, jax.devices()
model, tx, state, batch = t.resnet_setup()
results = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  b = parallel.to_global(mesh, batch)
  assert len(b['image'].sharding.device_set) == len(devices)
  s, _ = t.run_step(model, tx, parallel.replicate(mesh, state), b, accum_steps=2)
  results.append(jax.device_get((s.params, s.batch_stats)))
moved = np.abs(results[0][1]['bn1']['mean'] - state.batch_stats['bn1']['mean']).max()
assert moved > 1e-3, moved
for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
print('SAME')
'''


def test_batch_statistics_on_eight_devices_equal_one_device():
  """Each micro-batch of 8 spans all 8 devices: the statistics are those of the global batch."""
  run_on_eight_devices(EIGHT_DEVICE_SCRIPT)


def test_pretrained_statistics_are_kept_and_the_head_replaced(tmp_path):
  reference = np.load(FIXTURES / 'resnet_timm.npz')
  state_dict = {k[len('tiny/sd/'):]: reference[k] for k in reference.files
                if k.startswith('tiny/sd/')}
  path = str(tmp_path / 'resnet.safetensors')
  safetensors.numpy.save_file(state_dict, path)
  spec = json.loads((FIXTURES / 'resnet_timm_counts.json').read_text())['cases']['tiny']
  model = get_model('resnet50', 3, layers=tuple(spec['layers']), channels=tuple(spec['channels']))
  init = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  got = checkpoint.load_pretrained_variables(path, init)
  np.testing.assert_array_equal(got['batch_stats']['layer2_1']['bn3']['var'],
                                state_dict['layer2.1.bn3.running_var'])
  np.testing.assert_array_equal(got['batch_stats']['bn1']['mean'], state_dict['bn1.running_mean'])
  np.testing.assert_array_equal(got['params']['fc']['kernel'], init['params']['fc']['kernel'])
  assert got['params']['fc']['kernel'].shape == (256, 3)
  np.testing.assert_array_equal(got['params']['conv1']['kernel'],
                                state_dict['conv1.weight'].transpose(2, 3, 1, 0))
  with pytest.raises(checkpoint.CheckpointError, match=r"collections \['batch_stats', 'params'\]"):
    checkpoint.load_pretrained_variables(path, {'params': init['params']})
  # Head-only training of a ResNet v1 trains its `fc`, nothing else.
  frozen = optim.frozen_mask(('backbone',), init['params'])
  assert {k for k, v in frozen.items() if not all(jax.tree.leaves(v))} == {'fc'}


# Family -> (registry name, tiny options), as in the end-to-end runs.
TINY = dict(tiny_zoo_config.MODELS, vit=('testing', dict(hidden_size=16, mlp_dim=16,
                                                           num_heads=2, num_layers=1,
                                                           patch_size=(8, 8))),
            bit=('BiT-S-R50x1', dict(block_sizes=(1,))))


@pytest.mark.parametrize('family', sorted(TINY))
def test_head_size_is_read_where_the_model_grows_with_the_classes(family):
  name, options = TINY[family]
  params = jax.eval_shape(lambda: get_model(name, 7, **options).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  assert predict.head_size(name, params, 32, **options) == 7
  headless = jax.eval_shape(lambda: get_model(name, 0, **options).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  assert predict.head_size(name, headless, 32, **options) == 0


def _independent_head(family, params, activation):
  """Logits from the Grad-CAM activation, written out: final norm, global mean, classifier."""
  def layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean)**2).mean(-1, keepdims=True) + eps) * scale + bias
  if family == 'resnet_v1':
    pooled, head = activation.mean(axis=(1, 2)), params['fc']
  elif family == 'maxvit':  # Mean, norm, tanh pre-logits, classifier (timm's NormMlp head).
    norm, head = params['head']['norm'], params['head']['pre_logits']['fc']
    pooled = jnp.tanh(layer_norm(activation.mean(axis=(1, 2)), norm['scale'], norm['bias'],
                                 1e-5) @ head['kernel'] + head['bias'])
    head = params['head']['fc']
  elif family == 'davit':  # Mean, then the norm.
    norm = params['norm']
    pooled = layer_norm(activation.mean(axis=(1, 2)), norm['scale'], norm['bias'], 1e-5)
    head = params['head']['fc']
  elif family == 'nat':
    norm = params['norm']
    pooled = layer_norm(activation, norm['scale'], norm['bias'], 1e-5).mean(axis=(1, 2))
    head = params['head']
  elif family == 'swin':
    norm = params['norm']
    pooled = layer_norm(activation, norm['scale'], norm['bias'], 1e-5).mean(axis=(1, 2))
    head = params['head']['fc']
  else:
    norm = params['pre_head_layer_norm']
    pooled = layer_norm(activation, norm['scale'], norm['bias'], 1e-6).mean(axis=(1, 2))
    head = params['head']
  return pooled @ head['kernel'] + head['bias']


@pytest.mark.parametrize('family', sorted(tiny_zoo_config.MODELS))
def test_gradcam_is_on_the_last_stage_and_its_gradient_is_the_heads(family):
  name, options = tiny_zoo_config.MODELS[family]
  model = get_model(name, 3, **options)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), images[:1]))
  variables['params'] = random_params(variables['params'])
  if 'batch_stats' in variables:
    variables['batch_stats'] = random_batch_stats(variables['batch_stats'])
  activation, gradient, logits = gradcam.activation_and_gradient(
      model, variables, images, class_index=np.array([1, 2]))
  grid = {'resnet_v1': (1, 1, 32), 'swin': (4, 4, 32), 'mixer': (4, 4, 16),
          'maxvit': (4, 4, 16), 'davit': (4, 4, 16), 'nat': (4, 4, 16)}[family]
  assert activation.shape == gradient.shape == (2,) + grid
  np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, images), rtol=1e-5,
                             atol=1e-5)

  def score(x):
    out = _independent_head(family, variables['params'], x)
    return out[0, 1] + out[1, 2], out

  expected, out = jax.grad(score, has_aux=True)(jnp.asarray(activation))
  np.testing.assert_allclose(out, logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)
  # The public entry point once (it compiles the model twice more).
  cams = (gradcam.gradcam(model, variables, images) if family == 'resnet_v1' else
          gradcam.cam_from(activation, gradient))
  assert cams.shape == (2,) + grid[:2] and cams.min() >= 0 and cams.max() <= 1


def test_vit_only_figures_say_which_figures_apply():
  name, options = tiny_zoo_config.MODELS['swin']
  reason = missing(FIGURES['rollout'], True, get_model(name, 3, **options), None)
  assert 'needs a ViT' in reason and 'SwinTransformer' in reason
  assert 'gradcam, curves' in reason
  assert missing(FIGURES['gradcam'], True, tiny_resnet(), None) is None


def test_time_per_image_is_the_step_time_over_the_global_batch():
  def slow_step(variables, batch):
    time.sleep(0.02)
    return jnp.sum(batch['mask']) + variables['params']['w']
  seconds = metrics.time_per_image(slow_step, {'params': {'w': jnp.ones(())}},
                                   parallel.create_mesh(), 8, 4, repeats=3)
  assert 0.02 / 8 <= seconds < 0.1 / 8


def test_comparison_study_reports_accuracy_macro_f1_and_time_in_one_table(tmp_path,
                                                                         monkeypatch):
  config = compare_models.get_config()
  grid = studies.expand(config)
  assert len(grid.cells) == 5 * 2 * 3 and config.dataset == 'cifar10'
  modes = {(c.values['freeze'], c.values['batch_norm']) for c in grid.cells}
  assert modes == {((), 'train'), (('backbone',), 'frozen')}
  # Each cell starts from a public checkpoint of its own model.
  assert all(hub.lookup(c.values['pretrained_path']).model_name == c.values['model_name']
             for c in grid.cells)
  assert {c.values['pretrained_path'] for c in grid.cells} >= {'timm/resnet152',
                                                                'imagenet21k/ViT-B_32'}
  model_cells = [c for c in grid.cells if c.values['base_lr'] == 0.01]
  scores = {c.name: (0.05 + i / 20, i / 40, 0.5 + i) for i, c in enumerate(model_cells)}

  def fake_train(cell_config, workdir):
    name = os.path.basename(workdir)
    top1, f1, ms = scores.get(name, (0.0, 0.0, 9.0))
    on_dev = cell_config.pp.test == config.sweep.dev_split
    assert cell_config.time_inference  # The runner times every cell's final model.
    return {'accuracy_top1': top1 if on_dev else top1 + 0.01, 'accuracy_top5': 1.0,
            'macro_f1': f1, 'seconds_per_image': ms / 1e3, 'loss': 0.0, 'num_examples': 1}

  monkeypatch.setattr(studies.train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(studies, '_images_per_sec', lambda workdir: 1.0)
  studies.run_study(config, str(tmp_path))
  table = (tmp_path / 'results.md').read_text()
  assert '| model_name | freeze | test top-1 | macro F1 (%) | ms per image |' in table
  assert 'Test top-1 (%), macro F1 (%), ms per image on test' in table
  for i, cell in enumerate(model_cells):  # The dev winner (lr 0.01) reports its test numbers.
    freeze = studies.format_value(cell.values['freeze'])
    assert (f'| {cell.values["model_name"]} | {freeze} | {100 * (0.05 + i / 20 + 0.01):.2f} '
            f'(base_lr=0.01) | {100 * i / 40:.2f} | {0.5 + i:.3f} |') in table
  rows = list(csv.DictReader(io.StringIO((tmp_path / 'results.csv').read_text())))
  row = next(r for r in rows if r['name'] == model_cells[3].name)
  assert float(row['test_macro_f1']) == 3 / 40
  assert float(row['ms_per_image']) == pytest.approx(3.5)
  bad = compare_models.get_config()
  bad.sweep.metrics = ('test_top1', 'f1')
  with pytest.raises(ValueError, match=r"sweep.metrics has \['f1'\]"):
    studies.expand(bad)


def _finished_state(workdir):
  loaded = run_dir.load(str(workdir))
  return jax.device_get((loaded.params, loaded.batch_stats))


def _fine_tune_killed_and_resumed(family, digits, tmp_path, caplog):
  """Trains through the CLI; resumes a copy cut back to step 2 (a run killed after that
  save) in this process; both end with the same bits."""
  dataset = f'{family},{digits}'
  reference = tmp_path / 'reference'
  env = fresh_process_env()
  out = subprocess.run([sys.executable, '-m', 'vit_jax_ft.main', f'--workdir={reference}',
                        f'--config=tests/tiny_zoo_config.py:{dataset}'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert 'Step 6/6' in read_log(reference)
  killed = tmp_path / 'killed'
  shutil.copytree(reference, killed)
  for step in (4, 6):
    shutil.rmtree(killed / 'checkpoints' / str(step))
  config = tiny_zoo_config.get_config(dataset)
  config.time_inference = True  # As the studies' runner sets it.
  with caplog.at_level(logging.INFO):
    final = train.train_and_evaluate(config, str(killed))
  assert 'Resumed from the checkpoint of step 2' in caplog.text
  jax.tree.map(np.testing.assert_array_equal, _finished_state(killed),
               _finished_state(reference))
  return run_dir.load(str(reference)), config, final


@pytest.mark.slow
@pytest.mark.parametrize('family', ['mixer', 'resnet_v1', 'swin'])
def test_each_family_fine_tunes_resumes_exactly_and_evaluates(family, digits_folder, tmp_path,
                                                              caplog):
  loaded, config, final = _fine_tune_killed_and_resumed(family, digits_folder, tmp_path, caplog)
  assert type(loaded.model).__name__ == {'mixer': 'MlpMixer', 'resnet_v1': 'ResNetV1',
                                         'swin': 'SwinTransformer', 'maxvit': 'MaxVit'}[family]
  assert (loaded.batch_stats is not None) == (family in ('resnet_v1', 'maxvit'))
  if loaded.batch_stats is not None:  # Trained in 'train' mode: the statistics (init 1) moved.
    variances = [np.asarray(v) for path, v in traverse_util.flatten_dict(
        loaded.batch_stats).items() if path[-1] == 'var']
    assert max(np.abs(v - 1).max() for v in variances) > 1e-3
  test_files = sorted((digits_folder / 'test').glob('*/*.png'))
  assert final['num_examples'] == len(test_files) and np.isfinite(final['loss'])
  assert 0 < final['macro_f1'] <= 1 and final['seconds_per_image'] > 0
  images = predict.load_images([str(p) for p in test_files[:4]], loaded.config)
  probabilities = predict.predict_probabilities(loaded.model, loaded.variables, images)
  logits = loaded.model.apply(loaded.variables, images, train=False)
  np.testing.assert_allclose(probabilities, jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)
  headless = predict.load_model(workdir=str(tmp_path / 'reference'), with_head=False)
  features, labels = linear_probe.extract_features(
      headless.model, headless.variables, data.get_eval_data(config))
  assert len(features) == len(labels) == len(test_files) and np.isfinite(features).all()
