"""Studies: grid expansion and names, dev selection, tables with published numbers, resuming."""
import csv
import importlib
import io
import itertools
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import pytest
from tensorflow.io import gfile

import tiny_study
from test_train_e2e import digits_folder  # pylint: disable=unused-import
from configs.paper import readme, table5
from configs.studies import embedded as embedded_study
from vit_jax_ft import defaults, studies
from conftest import fresh_process_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def toy_config(**sweep) -> ml_collections.ConfigDict:
  config = defaults.get_config()
  config.pp.train = 'train[:98%]'
  config.sweep = studies.sweep_options()
  config.sweep.update(sweep)
  return config


def test_grid_is_the_product_of_entries_with_zipped_axes_moving_together():
  config = toy_config(axes=(('model_name', ('ViT-B_16', 'ViT-L_16')),
                            (('pp.crop', (224, 384)), ('batch', (64, 32))),
                            ('base_lr', (0.001, 0.03))))
  grid = studies.expand(config)
  expected = [dict(model_name=m, **{'pp.crop': c, 'batch': b}, base_lr=lr)
              for m, (c, b), lr in itertools.product(('ViT-B_16', 'ViT-L_16'),
                                                     ((224, 64), (384, 32)), (0.001, 0.03))]
  assert [c.values for c in grid.cells] == expected
  assert grid.cells[0].name == 'model_name=ViT-B_16,pp.crop=224,base_lr=0.001'
  assert grid.cells[-1].name == 'model_name=ViT-L_16,pp.crop=384,base_lr=0.03'
  # Names depend only on the swept values: the same config expands to the same names.
  assert [c.name for c in studies.expand(config).cells] == [c.name for c in grid.cells]
  cell = studies.cell_config(config, grid.cells[3])
  assert (cell.model_name, cell.pp.crop, cell.batch, cell.base_lr) == ('ViT-B_16', 384, 32, 0.03)
  assert 'sweep' not in cell and cell.decay_type == config.decay_type


def test_names_are_safe_folder_names():
  config = toy_config(axes=(('pretrained_path', ('gs://b/x.npz', '/tmp/y z.npz')),), select=())
  assert [c.name for c in studies.expand(config).cells] == [
      'pretrained_path=gs___b_x.npz', 'pretrained_path=_tmp_y_z.npz']


@pytest.mark.parametrize('sweep, error', [
    (dict(axes=(('base_lrr', (0.1,)),)), r"'base_lrr' is not a config key.*'base_lr'"),
    (dict(axes=(('pp.crop', (32,)),)), r"sweep.select has \['base_lr'\]; allowed: \['pp.crop'\]"),
    (dict(axes=((('pp.crop', (32, 40)), ('batch', (8,))),)), 'different lengths'),
    (dict(axes=(('base_lr', 0.1),)), 'Bad sweep axis'),
    (dict(axes=()), 'sweep.axes is empty'),
    (dict(axes=(('base_lr', (0.1,)), ('base_lr', (0.2,)))), 'more than one sweep axis'),
    (dict(axes=(('base_lr', (0.1, 0.2)),), dev_split=''), 'needs sweep.dev_split'),
    (dict(axes=(('base_lr', (0.1,)), ('pp.crop', (32,))), rows=('seed',)),
     r"sweep.rows has \['seed'\]; allowed: \['pp.crop'\]"),
    (dict(axes=(('base_lr', (0.1,)), ('pp.crop', (32,))), published=(((64,), 99.0),)),
     r'published has \(64,\), which is no table cell'),
    (dict(axes=(('base_lr', ('fast',)),)), "'fast' does not fit config.base_lr"),
    (dict(axes=(('base_lr', (0.1,)),), retrain_split='train[:98%]'), 'is pp.train itself'),
])
def test_bad_sweeps_are_errors_naming_the_fix(sweep, error):
  with pytest.raises((ValueError, TypeError), match=error):
    studies.expand(toy_config(**sweep))


def test_dev_split_inside_the_training_split_is_an_error():
  config = toy_config(axes=(('base_lr', (0.1, 0.2)),))
  config.pp.train = 'train'
  with pytest.raises(ValueError, match=r"contains the dev split.*train\[:98%\]"):
    studies.expand(config)


def test_table_rows_must_tell_groups_apart():
  config = toy_config(axes=(('model_name', ('a', 'b')), ('pp.crop', (32, 40)),
                            ('base_lr', (0.1, 0.2))), rows=('model_name',))
  with pytest.raises(ValueError, match='do not tell groups apart'):
    studies.expand(config)


def fake_results(grid, dev, test=None):
  """Results per cell name from lists of dev and test top-1 in grid order."""
  test = test or [0.5] * len(dev)
  return {c.name: dict(dev_top1=d, dev_top5=1.0, test_top1=t, test_top5=1.0, steps=10,
                       wall_time_s=1.0, images_per_sec=2.0)
          for c, d, t in zip(grid.cells, dev, test)}


def test_selection_takes_the_best_dev_accuracy_per_group_and_the_first_of_ties():
  grid = studies.expand(toy_config(axes=(('pp.crop', (32, 40)),
                                         ('base_lr', (0.01, 0.03, 0.1)))))
  dev = [0.70, 0.90, 0.80,  # crop 32: the second lr.
         0.60, 0.60, 0.50]  # crop 40: a tie, the first in grid order wins.
  winners = studies.select(grid, fake_results(grid, dev))
  by_crop = {group[0]: cell.values['base_lr'] for group, cell in winners.items()}
  for crop, row in zip((32, 40), (dev[:3], dev[3:])):
    assert by_crop[crop] == (0.01, 0.03, 0.1)[row.index(max(row))]


def test_markdown_table_prints_selected_lr_published_values_and_differences():
  config = readme.get_config('short')
  grid = studies.expand(config)
  test = [0.9861, 0.9880, 0.8900, 0.9200]  # cifar10 500, 1000; cifar100 500, 1000.
  table = studies.results_markdown(config, grid, fake_results(grid, [0.0] * 4, test))
  lines = table.splitlines()
  assert lines[2] == ('| total_steps | cifar10 | cifar10 published | cifar10 Δ | cifar100 | '
                      'cifar100 published | cifar100 Δ |')
  published = readme.PUBLISHED_SHORT
  for line, steps, ours in zip(lines[4:], (500, 1000), ((test[0], test[2]), (test[1], test[3]))):
    fields = [f.strip() for f in line.strip('|').split('|')]
    assert fields[0] == str(steps)
    for i, dataset in enumerate(('cifar10', 'cifar100')):
      paper = published[steps][dataset]
      assert fields[1 + 3 * i:4 + 3 * i] == [
          f'{100 * ours[i]:.2f}', f'{paper:.2f}', f'{100 * ours[i] - paper:+.2f}']

  lr_config = toy_config(axes=(('pp.crop', (32, 40)), ('base_lr', (0.01, 0.03))),
                         published=(((32,), 91.0),))
  grid = studies.expand(lr_config)
  table = studies.results_markdown(lr_config, grid, fake_results(grid, [0.1, 0.2, 0.4, 0.3],
                                                                 [0.5, 0.6, 0.7, 0.8]))
  assert '| 32 | 60.00 (base_lr=0.03) | 91.00 | -31.00 |' in table
  assert '| 40 | 70.00 (base_lr=0.01) |  |  |' in table
  assert 'highest top-1 on train[98%:] (ties: the first in grid order)' in table


def test_outputs_go_through_gfile_csv_rows_and_plots():
  config = toy_config(axes=(('pp.crop', (32, 40)), ('base_lr', (0.01, 0.03))))
  grid = studies.expand(config)
  results = fake_results(grid, [0.1, 0.2, 0.4, 0.3], [0.5, 0.6, 0.7, 0.8])
  paths = studies.write_outputs(config, grid, results, 'ram://study')
  assert paths == ['ram://study/results.csv', 'ram://study/results.md',
                   'ram://study/plot_pp.crop.png', 'ram://study/plot_base_lr.png']
  with gfile.GFile(paths[0]) as f:
    rows = list(csv.DictReader(f))
  assert [r['name'] for r in rows] == [c.name for c in grid.cells]
  assert [r['selected'] for r in rows] == ['0', '1', '1', '0']
  assert rows[1]['pp.crop'] == '32' and rows[1]['base_lr'] == '0.03'
  assert float(rows[2]['dev_top1']) == 0.4 and float(rows[2]['test_top1']) == 0.7
  assert rows[3]['workdir'] == 'ram://study/pp.crop=40,base_lr=0.03'
  for png in paths[2:]:
    with gfile.GFile(png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_table5_expands_to_models_by_paper_learning_rates():
  for dataset, lrs, steps, held_out in [('cifar10', (0.001, 0.003, 0.01, 0.03), 10_000, 98),
                                        ('imagenet2012', (0.003, 0.01, 0.03, 0.06), 20_000, 99),
                                        ('oxford_iiit_pet', (0.001, 0.003, 0.01, 0.03), 500, 90)]:
    config = table5.get_config(dataset)
    grid = studies.expand(config)
    models = ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14')
    assert [(c.values['model_name'], c.values['base_lr']) for c in grid.cells] == list(
        itertools.product(models, lrs))
    assert config.sweep.dev_split == f'train[{held_out}%:]'
    cell = studies.cell_config(config, grid.cells[-1])
    assert (cell.model_name, cell.base_lr, cell.total_steps) == ('ViT-H_14', lrs[-1], steps)
    assert cell.pp.train == f'train[:{held_out}%]' and cell.pp.crop == 384
    assert (cell.batch, cell.optimizer, cell.momentum, cell.weight_decay) == (
        512, 'sgd', 0.9, 0.0)
    assert (cell.grad_norm_clip, cell.decay_type) == (1.0, 'cosine')
  published = dict(table5.get_config('cifar100').sweep.published)
  assert published[('ViT-L_16',)] == 93.44 and published[('ViT-H_14',)] == 93.82
  with pytest.raises(ValueError, match='known:'):
    table5.get_config('svhn')


def test_readme_table_expands_to_models_datasets_and_dropouts_with_all_numbers():
  config = readme.get_config()
  grid = studies.expand(config)
  assert len(grid.cells) == 5 * 3 * 2 and not grid.selected
  positions = {r + c for r, c in map(grid.position, grid.cells)}
  assert {tuple(k) for k, _ in config.sweep.published} == positions
  assert dict(config.sweep.published)[('ViT-L_32', 'imagenet2012', 0.1)] == 81.13
  for c in grid.cells:
    cell = studies.cell_config(config, c)
    imagenet = cell.dataset == 'imagenet2012'
    assert cell.total_steps == (20_000 if imagenet else 10_000)
    assert cell.pp.test == ('validation' if imagenet else 'test')
    assert cell.model.dropout_rate == c.values['model.dropout_rate']
    assert (cell.base_lr, cell.warmup_steps, cell.batch, cell.accum_steps) == (0.03, 500, 512, 8)
  short = studies.expand(readme.get_config('short'))
  assert [(c.values['dataset'], c.values['total_steps'], c.values['warmup_steps'])
          for c in short.cells] == [('cifar10', 500, 50), ('cifar10', 1000, 100),
                                    ('cifar100', 500, 50), ('cifar100', 1000, 100)]


def test_embedded_study_sweeps_resolution_with_its_ops_and_selects_lr_on_dev():
  config = embedded_study.get_config()
  grid = studies.expand(config)
  assert [c.name for c in grid.cells] == [f'pp.crop={c},base_lr={lr}' for c in (28, 32, 40)
                                          for lr in (0.01, 0.03)]
  cell = studies.cell_config(config, grid.cells[2])
  assert cell.pp.train_ops == cell.pp.test_ops == 'decode|resize(32)|value_range(-1,1)'
  assert (cell.pp.train, config.sweep.dev_split) == ('train[:90%]', 'train[90%:]')


def run_sweep(workdir, dataset, *flags, **popen):
  env = fresh_process_env()
  cmd = [sys.executable, '-m', 'vit_jax_ft.sweep', f'--config=tests/tiny_study.py:{dataset}',
         f'--workdir={workdir}', *flags]
  if popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_cli_typo_in_a_sweep_key_is_an_error(tmp_path):
  out = run_sweep(tmp_path, 'x', '--config.sweep.selct=()', '--dry_run')
  assert out.returncode != 0 and 'select' in out.stderr
  out = run_sweep(tmp_path, 'x', '--dry_run', "--config.sweep.axes=(('seed',(1,2)),)",
                  '--config.sweep.select=()')
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ['seed=1', 'seed=2']


def comparable(path: pathlib.Path):
  """results.csv without what differs between runs: timing and the study's folder."""
  rows = list(csv.DictReader(io.StringIO(path.read_text())))
  drop = set(studies.TIMING_COLUMNS) | {'workdir'}
  return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_finished_cells(digits_folder, tmp_path,
                                                              monkeypatch):
  reference = tmp_path / 'reference'
  out = run_sweep(reference, digits_folder)
  assert out.returncode == 0, out.stderr[-4000:]
  assert sum('study ETA' in line for line in out.stderr.splitlines()) == 2

  killed = tmp_path / 'killed'
  names = [c.name for c in studies.expand(tiny_study.get_config(str(digits_folder))).cells]
  process = run_sweep(killed, digits_folder, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (killed / names[1] / 'checkpoints' / '10').is_dir():
    assert process.poll() is None and time.time() < deadline, 'no checkpoint in cell 2'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert (killed / names[0] / studies.RESULT_FILE).exists()
  assert not (killed / names[1] / studies.RESULT_FILE).exists()
  first = (killed / names[0] / studies.RESULT_FILE).read_text()
  first_logs = sorted((killed / names[0]).glob('train.process0.*.log'))

  out = run_sweep(killed, digits_folder)
  assert out.returncode == 0, out.stderr[-4000:]
  assert f'{names[0]} was finished' in out.stderr
  assert 'Resumed from the checkpoint of step' in ''.join(
      p.read_text() for p in (killed / names[1]).glob('train.process0.*.log'))
  # The finished cell was not rerun: same result file, no new log.
  assert (killed / names[0] / studies.RESULT_FILE).read_text() == first
  assert sorted((killed / names[0]).glob('train.process0.*.log')) == first_logs
  assert comparable(killed / 'results.csv') == comparable(reference / 'results.csv')
  assert (killed / 'results.md').read_text() == (reference / 'results.md').read_text()
  rows = comparable(reference / 'results.csv')
  assert [r['name'] for r in rows] == names and sum(r['selected'] == '1' for r in rows) == 1
  dev = [float(r['dev_top1']) for r in rows]
  assert rows[dev.index(max(dev))]['selected'] == '1'
  assert list(reference.glob('plot_base_lr.png'))

  # Rerunning a finished study trains nothing and rewrites the same file.
  before = (killed / 'results.csv').read_text()
  (killed / 'results.csv').unlink()
  monkeypatch.setattr(studies.train, 'train_and_evaluate', None)  # Calling it would fail.
  studies.run_study(tiny_study.get_config(str(digits_folder)), str(killed))
  assert (killed / 'results.csv').read_text() == before


@pytest.mark.parametrize('module, arg, cells, keys', [
    ('resolution', 'oxford_flowers102', 20, ['pp.crop', 'base_lr']),
    ('data_fraction', 'cifar100', 32, ['train_fraction', 'model_name', 'base_lr']),
    ('optimizer_schedule', 'adam', 12, ['decay_type', 'base_lr']),
    ('head_only', 'cifar100', 8, ['freeze', 'base_lr']),
    ('folder_models', '/data/photos', 12, ['model_name', 'base_lr']),
])
def test_study_configs_expand_to_valid_cells(module, arg, cells, keys):
  config = importlib.import_module(f'configs.studies.{module}').get_config(arg)
  grid = studies.expand(config)
  assert len(grid.cells) == cells and grid.name_keys == keys and grid.selected == ['base_lr']
  held_out = config.pp.train.split('[:')[1].rstrip(']')
  assert config.sweep.dev_split == f'train[{held_out}:]'


def test_head_only_freezes_every_parameter_but_the_head():
  from configs.studies import head_only  # pylint: disable=import-outside-toplevel
  from vit_jax_ft import optim  # pylint: disable=import-outside-toplevel
  params = {'embedding': {'kernel': 0}, 'Transformer': {'encoder_norm': {'scale': 0}},
            'head': {'kernel': 0, 'bias': 0}, 'headless': {'bias': 0}}
  mask = optim.frozen_mask(head_only.HEAD_ONLY, params)
  assert mask == {'embedding': {'kernel': True}, 'Transformer': {'encoder_norm': {'scale': True}},
                  'head': {'kernel': False, 'bias': False}, 'headless': {'bias': True}}


def test_run_study_selects_on_dev_then_retrains_the_winner_on_the_whole_split(tmp_path,
                                                                              monkeypatch):
  calls = []
  dev_scores = {0.01: 0.6, 0.03: 0.8, 0.1: 0.7}

  def fake_train(config, workdir):
    calls.append((os.path.relpath(workdir, tmp_path), config.pp.train, config.pp.test))
    on_dev = config.pp.test == 'train[98%:]'
    accuracy = dev_scores[config.base_lr] if on_dev else config.base_lr + config.pp.crop / 100
    return {'accuracy_top1': accuracy, 'accuracy_top5': 1.0, 'loss': 0.0, 'num_examples': 1.0}

  monkeypatch.setattr(studies.train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(studies, '_images_per_sec', lambda workdir: 7.0)
  config = toy_config(axes=(('pp.crop', (32, 40)), ('base_lr', (0.01, 0.03, 0.1))),
                      retrain_split='train')
  studies.run_study(config, str(tmp_path))
  grid_calls = [(f'pp.crop={c},base_lr={lr}', split, test) for c in (32, 40)
                for lr in (0.01, 0.03, 0.1) for split, test in (('train[:98%]', 'train[98%:]'),
                                                                ('train[:98%]', 'test'))]
  retrain_calls = [(f'retrain/pp.crop={c},base_lr=0.03', 'train', 'test') for c in (32, 40)]
  assert calls == grid_calls + retrain_calls
  rows = list(csv.DictReader(io.StringIO((tmp_path / 'results.csv').read_text())))
  assert [r['role'] for r in rows] == ['grid'] * 6 + ['retrain'] * 2
  assert math.isnan(float(rows[-1]['dev_top1'])) and float(rows[-1]['test_top1']) == 0.03 + 0.4
  table = (tmp_path / 'results.md').read_text()
  assert '| 32 | 35.00 (base_lr=0.03) |' in table and '| 40 | 43.00 (base_lr=0.03) |' in table
  assert 'retrained on train' in table
  # Every cell has its result file: a rerun trains nothing.
  calls.clear()
  studies.run_study(config, str(tmp_path))
  assert not calls


def test_exponential_schedule_of_the_study_ends_at_one_percent_of_the_peak():
  from configs.studies import optimizer_schedule  # pylint: disable=import-outside-toplevel
  from vit_jax_ft import optim  # pylint: disable=import-outside-toplevel
  config = optimizer_schedule.get_config('sgd')
  config.decay_type, config.base_lr = 'exponential', 0.01
  schedule = optim.learning_rate_schedule(config)
  assert float(schedule(config.total_steps)) == pytest.approx(0.01 * 0.01, rel=1e-3)
