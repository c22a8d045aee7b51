"""Evaluate and the linear probe: metrics of a model on padded batches against sklearn,
the report files, the ridge probe against least squares, and the CLI on real photos."""
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

import tiny_config
from conftest import SHARED_DATA, fresh_process_env, random_params
from vit_jax_ft import checkpoint, data, evaluate, linear_probe, metrics, predict, train
from vit_jax_ft.explain import curves
from vit_jax_ft.models import get_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=16, mlp_dim=16, num_heads=2, num_layers=1, patch_size=(8, 8))


@pytest.fixture(scope='module')
def tiny_model():
  model = get_model('testing', 4, **TINY)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']
  return model, random_params(params, seed=1, scale=1.0)


def padded_batches(images, labels, batch):
  """Batches as the input pipeline yields them: the last one padded, mask 0 on padding."""
  for start in range(0, len(images), batch):
    x, y = images[start:start + batch], labels[start:start + batch]
    pad = batch - len(x)
    yield {'image': np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]),
           'label': np.concatenate([y, np.zeros(pad, y.dtype)]),
           'mask': np.concatenate([np.ones(len(x)), np.zeros(pad)]).astype(np.float32)}


def test_evaluate_model_counts_every_real_example_once(tiny_model):
  model, params = tiny_model
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (21, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 4, 21)
  result, timing = evaluate.evaluate_model(model, {'params': params},
                                           padded_batches(images, labels, 8), timing_repeats=2)
  logits = np.asarray(model.apply({'params': params}, images, train=False))
  predictions = logits.argmax(-1)
  assert result.num_examples == 21
  assert result.top1 == pytest.approx(skm.accuracy_score(labels, predictions))
  np.testing.assert_array_equal(result.confusion, skm.confusion_matrix(
      labels, predictions, labels=range(4)))
  assert result.summary()['top5'] == 1.0  # Four classes: always within the top 5.
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  assert result.loss == pytest.approx(-log_p[np.arange(21), labels].mean(), rel=1e-5)
  assert timing.batch_size == 8 and timing.repeats == 2
  assert 0 < timing.seconds_per_image < timing.seconds_per_batch


def test_report_files_agree_with_the_metrics(tmp_path):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 50)
  logits = rng.standard_normal((50, 3)) + 2 * np.eye(3)[labels]
  result = metrics.ClassificationMetrics.from_sums(metrics.batch_sums(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.ones(50)))
  names = ['cat', 'dog', 'bird']
  timing = evaluate.Timing(batch_size=8, seconds_per_batch=0.04, repeats=3)
  report = evaluate.write_report(str(tmp_path), result, names, timing, {'split': 'test'})
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  assert saved == json.loads(json.dumps(report))
  predictions = logits.argmax(-1)
  assert saved['top1'] == pytest.approx(skm.accuracy_score(labels, predictions))
  assert saved['macro_f1'] == pytest.approx(skm.f1_score(labels, predictions,
                                                         average='macro'))
  f1 = skm.f1_score(labels, predictions, average=None)
  assert [r['class'] for r in saved['per_class']] == names
  np.testing.assert_allclose([r['f1'] for r in saved['per_class']], f1)
  assert saved['timing']['seconds_per_image'] == pytest.approx(0.005)
  with open(tmp_path / 'confusion_matrix.csv') as f:
    rows = list(csv.reader(f))
  assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names
  np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], int),
                                skm.confusion_matrix(labels, predictions))
  assert (tmp_path / 'confusion_matrix.png').stat().st_size > 1000
  table = evaluate.format_table(saved)
  assert f'{saved["top1"]:.4f}' in table and 'ms per image' in table and 'bird' in table


def test_table_of_many_classes_lists_the_least_accurate():
  rows = [{'class': f'c{i}', 'examples': 10, 'accuracy': i / 100, 'f1': 0.5}
          for i in range(100)]
  report = {'num_examples': 1000, 'top1': 0.5, 'top1_error': 0.5, 'macro_f1': 0.5,
            'per_class': rows}
  listed = [line.split()[0] for line in evaluate.format_table(report, worst=3).splitlines()
            if line.startswith('  ')]
  assert listed == ['c0', 'c1', 'c2']


def test_dataset_flags_and_their_errors():
  config = evaluate.defaults.get_config()
  imagenet = evaluate.evaluation_config(config, 'imagenet2012', batch_eval=16)
  assert (imagenet.pp.test, imagenet.pp.train, imagenet.batch_eval) == (
      'validation', 'train[:99%]', 16)
  assert evaluate.evaluation_config(imagenet, split='validation[:10]').pp.test == 'validation[:10]'
  assert config.dataset == ''  # The given config is not modified.
  with pytest.raises(ValueError, match='--dataset'):
    evaluate.evaluation_config(config)
  with pytest.raises(ValueError, match='--output_dir'):
    evaluate.default_output_dir(None, 'test', None)
  assert evaluate.default_output_dir('/w', 'train[:10%]', 7) == '/w/evaluation/train_10_step7'


def test_ridge_probe_is_the_regularised_least_squares_solution():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((30, 5)) * [1, 2, 3, 4, 5] + 7
  labels = rng.integers(0, 3, 30)
  probe = linear_probe.fit_ridge(features, labels, 3, l2_reg=2.5)
  # Independent: least squares of the stacked system [X; sqrt(l2) I] w = [Y; 0].
  x = (features - features.mean(0)) / (features.std(0) + 1e-5)
  x = np.hstack([x, np.full((30, 1), 100.0)])  # big_vision's bias feature (fewshot_lsr.py).
  targets = np.where(np.eye(3)[labels] > 0, 1.0, -1.0)
  stacked_x = np.vstack([x, np.sqrt(2.5) * np.eye(6)])
  stacked_y = np.vstack([targets, np.zeros((6, 3))])
  expected = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
  np.testing.assert_allclose(probe.weights, expected, atol=1e-10)
  np.testing.assert_allclose(probe.scores(features[:4]), x[:4] @ expected, atol=1e-10)


def test_few_shot_choice_and_accuracy():
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((4, 16)) * 3
  train_y = np.repeat(np.arange(4), 30)
  test_y = np.repeat(np.arange(4), 20)
  train_x = centres[train_y] + rng.standard_normal((120, 16))
  test_x = centres[test_y] + rng.standard_normal((80, 16))
  index = linear_probe.few_shot_indices(train_y, 5, 4, seed=3)
  np.testing.assert_array_equal(np.bincount(train_y[index]), [5] * 4)
  np.testing.assert_array_equal(index, linear_probe.few_shot_indices(train_y, 5, 4, seed=3))
  assert len(linear_probe.few_shot_indices(train_y, 0, 4)) == 120
  accuracy = linear_probe.few_shot_accuracy((train_x, train_y), (test_x, test_y), 4,
                                            shots=(1, 10, 0), l2_reg=1.0)
  for shots, value in accuracy.items():
    chosen = linear_probe.few_shot_indices(train_y, shots, 4)
    probe = linear_probe.fit_ridge(train_x[chosen], train_y[chosen], 4, 1.0)
    assert value == np.mean(probe.scores(test_x).argmax(-1) == test_y)
  assert accuracy[0] > 0.9  # Well separated clusters.
  with pytest.raises(ValueError, match='fewer than 31 shots'):
    linear_probe.few_shot_indices(train_y, 31, 4)


def test_features_of_the_real_examples_only(tiny_model):
  model, params = tiny_model
  with pytest.raises(ValueError, match='num_classes=0'):
    linear_probe.extract_features(model, {'params': params}, [])
  headless = model.clone(num_classes=0)
  trunk = {k: v for k, v in params.items() if k != 'head'}
  images = np.random.default_rng(2).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
  labels = np.arange(5) % 4
  features, got_labels = linear_probe.extract_features(
      headless, {'params': trunk}, padded_batches(images, labels, 4))
  np.testing.assert_array_equal(got_labels, labels)
  expected = headless.apply({'params': trunk}, images, train=False)
  np.testing.assert_allclose(features, expected, atol=1e-5)


@pytest.fixture
def cifar_folder(shared_data, tmp_path):
  """ROOT/{train,test}/CLASS/*.png of real CIFAR-10 photos, 3 classes."""
  with np.load(shared_data / 'cifar10_partial.npz') as npz:
    splits = {'train': (npz['x_train'], npz['y_train']), 'test': (npz['x_test'], npz['y_test'])}
  names = ['airplane', 'automobile', 'bird']
  for split, (x, y) in splits.items():
    for label, name in enumerate(names):
      folder = tmp_path / 'cifar' / split / name
      folder.mkdir(parents=True)
      for i, image in enumerate(x[y == label][:4 if split == 'train' else 3]):
        Image.fromarray(image).save(folder / f'{i}.png')
  return tmp_path / 'cifar', names


def run_cli(*args):
  result = subprocess.run([sys.executable, '-m', 'vit_jax_ft.evaluate', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=fresh_process_env())
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_cli_on_a_folder_of_real_photos(cifar_folder, tmp_path):
  root, names = cifar_folder
  model = get_model('testing', 3)
  params = jax.tree.map(np.asarray, random_params(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params'], seed=2, scale=0.5))
  path = str(tmp_path / 'testing.npz')
  checkpoint.save(params, path)
  names_file = tmp_path / 'names.txt'
  names_file.write_text('\n'.join(names))
  out = tmp_path / 'eval'
  stdout = run_cli(f'--checkpoint={path}', '--model_name=testing', '--image_size=32',
                   f'--dataset={root}', '--batch_eval=4', f'--output_dir={out}',
                   f'--class_names={names_file}', '--timing_repeats=1')
  saved = json.loads((out / 'metrics.json').read_text())
  # Independent: the 9 test photos through the model, sorted by class folder.
  files = [root / 'test' / n / f'{i}.png' for n in names for i in range(3)]
  pixels = np.stack([np.asarray(Image.open(f)) for f in files]) / 127.5 - 1
  predictions = np.asarray(model.apply({'params': params}, pixels, train=False)).argmax(-1)
  labels = np.repeat(np.arange(3), 3)
  assert saved['num_examples'] == 9
  assert saved['top1'] == pytest.approx(skm.accuracy_score(labels, predictions))
  assert [r['class'] for r in saved['per_class']] == names
  assert f'{saved["top1"]:.4f}' in stdout
  assert (out / 'confusion_matrix.png').stat().st_size > 1000
  assert list(out.glob('events.out.tfevents*'))  # TensorBoard scalars.

  # The linear probe of the same checkpoint (in-process: the CLI path is the same code).
  loaded = predict.load_model(checkpoint_path=path, model_name='testing', image_size=32,
                              with_head=False)
  config = evaluate.evaluation_config(loaded.config, str(root), batch_eval=4)
  accuracy = evaluate.run_linear_probe(loaded, config, (1, 2, 0), l2_reg=1.0, seed=0)
  trunk = {k: v for k, v in params.items() if k != 'head'}
  headless = model.clone(num_classes=0)
  train_split = data.load_split(config, 'train')  # The pipeline's (seeded) file order.
  train_x = np.asarray(headless.apply({'params': trunk}, np.stack(
      [np.asarray(Image.open(f)) for f in train_split.data]) / 127.5 - 1, train=False))
  test_x = np.asarray(headless.apply({'params': trunk}, pixels, train=False))
  train_y = train_split.labels
  np.testing.assert_array_equal(np.bincount(train_y), [4, 4, 4])
  for shots in (1, 2, 0):
    chosen = linear_probe.few_shot_indices(train_y, shots, 3, seed=0)
    probe = linear_probe.fit_ridge(train_x[chosen], train_y[chosen], 3, 1.0)
    assert accuracy[shots] == pytest.approx(
        np.mean(probe.scores(test_x).argmax(-1) == labels), abs=1e-6)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A two-step fine-tuning run of a tiny ViT on a folder of real CIFAR-10 photos."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent (only developer and CI machines have it)')
  root = tmp_path_factory.mktemp('data') / 'cifar'
  with np.load(SHARED_DATA / 'cifar10_partial.npz') as npz:
    splits = {'train': (npz['x_train'], npz['y_train']), 'test': (npz['x_test'], npz['y_test'])}
  for split, (x, y) in splits.items():
    for label, name in enumerate(['airplane', 'automobile', 'bird']):
      (root / split / name).mkdir(parents=True)
      for i, image in enumerate(x[y == label][:8]):
        Image.fromarray(image).save(root / split / name / f'{i}.png')
  config = tiny_config.get_config(str(root))
  config.total_steps, config.warmup_steps, config.eval_every = 2, 1, 0
  config.checkpoint_every, config.batch, config.batch_eval = 2, 8, 8
  workdir = str(tmp_path_factory.mktemp('run'))
  final = train.train_and_evaluate(config, workdir)
  return workdir, root, final


def test_workdir_evaluation_agrees_with_the_training_loop(trained_workdir):
  workdir, root, final = trained_workdir
  stdout = run_cli(f'--workdir={workdir}', '--timing_repeats=1')
  saved = json.loads(open(os.path.join(workdir, 'evaluation', 'test_step2',
                                       'metrics.json')).read())
  assert saved['step'] == 2 and saved['num_examples'] == final['num_examples'] == 24
  assert saved['top1'] == pytest.approx(final['accuracy_top1'])
  assert saved['top5'] == pytest.approx(final['accuracy_top5'])
  assert 'airplane' in stdout
  # Predict on the same files gives the same accuracy; the curves hold both evaluations.
  loaded = predict.load_model(workdir=workdir)
  assert loaded.step == 2 and loaded.class_names == ['airplane', 'automobile', 'bird']
  paths = sorted(str(p) for p in (root / 'test').glob('*/*.png'))
  probabilities = predict.predict_probabilities(
      loaded.model, loaded.variables, predict.load_images(paths, loaded.config))
  labels = [loaded.class_names.index(os.path.basename(os.path.dirname(p))) for p in paths]
  assert np.mean(probabilities.argmax(-1) == labels) == pytest.approx(saved['top1'])
  series = curves.read_scalars(workdir, 'top1')
  assert series['evaluate/test/top1'][1][-1] == pytest.approx(saved['top1'])
  assert series['test_accuracy_top1'][1][-1] == pytest.approx(final['accuracy_top1'])
