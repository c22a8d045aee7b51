"""Studies: a grid of fine-tuning cells, the paper's dev-split selection and the results table.

A study config is a normal config plus `config.sweep` (`sweep_options()`). Each cell is a
normal fine-tuning run in `DIR/<name from its swept values>`; a finished cell leaves
`study_result.json` (written atomically), so rerunning skips it and resumes the interrupted
cell from its checkpoint. Selection (the ViT paper's protocol): within each group of cells
that differ only in the selected axes, the cell with the highest top-1 on `dev_split` (held
out of `pp.train`) wins; ties go to the first cell in grid order. The table reports the test
top-1 of the winner, or of its retraining on `retrain_split` when given.
"""
import contextlib
import csv
import dataclasses
import difflib
import io
import itertools
import json
import logging as std_logging
import math
import os
import time
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import jax
import ml_collections
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorflow.io import gfile

from vit_jax_ft import defaults, logs, train
from vit_jax_ft.explain import curves

RESULT_FILE = 'study_result.json'
RETRAIN_DIR = 'retrain'
# Per-cell columns of results.csv after the swept keys; timing columns vary between runs.
METRIC_COLUMNS = ('dev_top1', 'dev_top5', 'test_top1', 'test_top5', 'test_macro_f1', 'steps')
TIMING_COLUMNS = ('wall_time_s', 'images_per_sec', 'ms_per_image')
# What `sweep.metrics` may put in the Markdown table: column title and format of a value.
TABLE_METRICS = {
    'test_top1': ('test top-1', lambda v: f'{100 * v:.2f}'),
    'test_top5': ('test top-5 (%)', lambda v: f'{100 * v:.2f}'),
    'test_macro_f1': ('macro F1 (%)', lambda v: f'{100 * v:.2f}'),
    'ms_per_image': ('ms per image', lambda v: f'{v:.3f}'),
}


def sweep_options() -> ml_collections.ConfigDict:
  """The `config.sweep` block of a study config, with the paper's selection defaults."""
  return ml_collections.ConfigDict({
      # Crossed axes, outermost first. Each entry is one axis `('key', (v1, v2, ...))` over a
      # config key ('base_lr', 'pp.crop', 'model_name', ...) or a tuple of such axes of equal
      # length that move together (zipped). Cells are named from each entry's first key.
      'axes': (),
      # Swept keys chosen on `dev_split` (highest dev top-1; ties: first in grid order).
      # Keys zipped with a selected key are selected with it. () reports every cell.
      'select': ('base_lr',),
      # The held-out part of the training split the selection uses; `pp.train` must exclude
      # it (the paper: 'train[:98%]' trains, 'train[98%:]' selects on CIFAR).
      'dev_split': 'train[98%:]',
      # '' reports the selected cell; a split (e.g. 'train') retrains the selected
      # configuration on it in DIR/retrain/<cell> and reports that run's test accuracy.
      'retrain_split': '',
      # Unselected swept keys indexing the table's rows and columns; () rows: all of them.
      'rows': (),
      'columns': (),
      # Published test top-1 in percent: ((row values..., column values...), value) pairs.
      'published': (),
      # The Markdown table's numbers per cell, from `TABLE_METRICS`: test top-1 (%), then
      # e.g. macro F1 (%) and the final model's inference time ('ms_per_image').
      'metrics': ('test_top1',),
  })


@dataclasses.dataclass(frozen=True)
class Cell:
  """One fine-tuning run of a study: its folder name and the config values it sets."""

  name: str
  values: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Grid:
  """The expanded study: cells in grid order and how they group for selection and tables."""

  cells: List[Cell]
  name_keys: List[str]  # The first key of each entry: what names, groups and tables use.
  selected: List[str]  # Name keys chosen on the dev split.
  rows: List[str]
  columns: List[str]

  def group(self, cell: Cell) -> Tuple:
    """Values of the unselected name keys: cells sharing them compete in one selection."""
    return tuple(cell.values[k] for k in self.name_keys if k not in self.selected)

  def position(self, cell: Cell) -> Tuple[Tuple, Tuple]:
    """(row values, column values) of the cell's group in the table."""
    return (tuple(cell.values[k] for k in self.rows),
            tuple(cell.values[k] for k in self.columns))


def format_value(value: Any) -> str:
  """A swept value as text in names and tables: 0.03, 384, ViT-B_16, a+b for tuples."""
  if isinstance(value, (tuple, list)):
    return '+'.join(format_value(v) for v in value)
  return repr(value) if isinstance(value, float) else str(value)


def cell_name(values: Dict[str, Any], name_keys: Sequence[str]) -> str:
  """`key=value,...` over the name keys, safe as a folder name on any filesystem."""
  text = ','.join(f'{k}={format_value(values[k])}' for k in name_keys)
  return ''.join(c if c.isalnum() or c in '._+=,-' else '_' for c in text)


def _entries(axes: Sequence) -> List[List[Tuple[str, tuple]]]:
  """Each entry of `sweep.axes` as a list of (key, values) axes, checked for shape."""
  how = ("write sweep.axes as (('base_lr', (0.01, 0.03)), (('pp.crop', (32, 40)), "
         "('pp.test_ops', (a, b)))): an axis is ('key', values), a tuple of axes is zipped")
  if not axes:
    raise ValueError(f'config.sweep.axes is empty; {how}.')
  entries = []
  for entry in axes:
    zipped = [entry] if isinstance(entry[0], str) else list(entry)
    for axis in zipped:
      if (len(axis) != 2 or not isinstance(axis[0], str)
          or not isinstance(axis[1], (tuple, list)) or not axis[1]):
        raise ValueError(f'Bad sweep axis {axis!r}; {how}.')
    lengths = {len(values) for _, values in zipped}
    if len(lengths) > 1:
      raise ValueError(f'Zipped axes {[k for k, _ in zipped]} have different lengths '
                       f'{[len(v) for _, v in zipped]}; zipped axes move together.')
    entries.append([(key, tuple(values)) for key, values in zipped])
  return entries


def _check_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Every swept key must name a config key (not `sweep` itself)."""
  known = [k for k, _ in defaults.flatten(config) if not k.startswith('sweep.')]
  for key in keys:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3) or known
      raise ValueError(f'Swept key {key!r} is not a config key; did you mean {close}?')
  repeated = sorted({k for k in keys if list(keys).count(k) > 1})
  if repeated:
    raise ValueError(f'Keys {repeated} appear in more than one sweep axis.')


def _subset(name: str, keys: Sequence[str], allowed: Sequence[str]) -> List[str]:
  bad = [k for k in keys if k not in allowed]
  if bad:
    raise ValueError(f'config.sweep.{name} has {bad}; allowed: {list(allowed)}.')
  return list(keys)


def expand(config: ml_collections.ConfigDict) -> Grid:
  """The cells of `config.sweep` in grid order (last entry fastest), validated."""
  sweep = config.sweep
  entries = _entries(sweep.axes)
  _check_keys(config, [k for entry in entries for k, _ in entry])
  name_keys = [entry[0][0] for entry in entries]
  selected = _subset('select', sweep.select, name_keys + [k for e in entries for k, _ in e[1:]])
  # A key zipped with a selected key is selected through its entry's first key.
  selected = [e[0][0] for e in entries if any(k in selected for k, _ in e)]
  if selected and not sweep.dev_split:
    raise ValueError(f'config.sweep.select={tuple(sweep.select)} needs sweep.dev_split (e.g. '
                     "'train[98%:]'); or set sweep.select=() to report every cell.")
  if sweep.dev_split and sweep.dev_split.split('[')[0] == config.pp.train:
    raise ValueError(f'config.pp.train={config.pp.train!r} contains the dev split '
                     f'{sweep.dev_split!r}; train on the rest, e.g. '
                     f"pp.train='{config.pp.train}[:98%]' with dev_split='train[98%:]'.")
  if sweep.retrain_split and sweep.retrain_split == config.pp.train:
    raise ValueError(f'config.sweep.retrain_split={sweep.retrain_split!r} is pp.train itself; '
                     "give the whole training split (e.g. 'train'), or '' to keep the cells.")
  _subset('metrics', sweep.metrics, list(TABLE_METRICS))
  unselected = [k for k in name_keys if k not in selected]
  rows = _subset('rows', sweep.rows, unselected)
  columns = _subset('columns', sweep.columns, [k for k in unselected if k not in rows])
  if not rows and not columns:
    rows = unselected
  cells = []
  for combo in itertools.product(*[range(len(e[0][1])) for e in entries]):
    values = {k: v[i] for e, i in zip(entries, combo) for k, v in e}
    cells.append(Cell(cell_name(values, name_keys), values))
  names = [c.name for c in cells]
  if len(set(names)) != len(names):
    raise ValueError(f'Cells share a name: {sorted({n for n in names if names.count(n) > 1})}; '
                     'give each axis distinct values.')
  grid = Grid(cells, name_keys, selected, rows, columns)
  positions = {}
  for cell in cells:
    if positions.setdefault(grid.position(cell), grid.group(cell)) != grid.group(cell):
      raise ValueError(f'The table rows {rows} and columns {columns} do not tell groups apart; '
                       f'add the other unselected keys {unselected} to sweep.rows or columns.')
  for key, _ in sweep.published:
    if tuple(key) not in {r + c for r, c in positions}:
      raise ValueError(f'config.sweep.published has {tuple(key)}, which is no table cell; '
                       f'entries are ((row values..., column values...), top-1 %), rows {rows}, '
                       f'columns {columns}.')
  for cell in cells:
    cell_config(config, cell)  # Type errors in swept values show before any training.
  return grid


def cell_config(config: ml_collections.ConfigDict, cell: Cell,
                **overrides: Any) -> ml_collections.ConfigDict:
  """The normal fine-tuning config of one cell: the study's config with its values set, and
  the final model's inference timed (results.csv's `ms_per_image`)."""
  result = config.copy_and_resolve_references()
  with result.unlocked():
    del result['sweep']
  result.time_inference = True
  for key, value in {**cell.values, **overrides}.items():
    try:
      result.update_from_flattened_dict({key: value})
    except TypeError as e:
      raise TypeError(f'Swept value {value!r} does not fit config.{key}: {e}') from e
  return result


def _write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename (gfile, so gs:// too)."""
  tmp = f'{path}.tmp'
  with gfile.GFile(tmp, 'w') as f:
    f.write(text)
  gfile.rename(tmp, path, overwrite=True)


def _images_per_sec(workdir: str) -> float:
  """Mean training throughput the run logged (NaN when it logged none)."""
  series = curves.read_scalars(workdir, '^images_per_sec$').get('images_per_sec')
  return float(series[1].mean()) if series is not None and series[1].size else math.nan


@contextlib.contextmanager
def _cell_log(workdir: str) -> Iterator[None]:
  """Copies the log of a cell into its workdir, as `python -m vit_jax_ft.main` does."""
  gfile.makedirs(workdir)
  name = f'train.process{jax.process_index()}.{time.strftime("%Y%m%d-%H%M%S")}.{os.getpid()}.log'
  stream = gfile.GFile(os.path.join(workdir, name), 'w')
  handler = std_logging.StreamHandler(stream)
  handler.setFormatter(logging.PythonFormatter())
  logging.get_absl_logger().addHandler(handler)
  try:
    yield
  finally:
    logging.get_absl_logger().removeHandler(handler)
    stream.close()


def run_cell(config: ml_collections.ConfigDict, workdir: str, dev_split: str) -> Dict[str, Any]:
  """Trains one cell (or finds it finished) and returns its dev and test metrics."""
  marker = os.path.join(workdir, RESULT_FILE)
  if gfile.exists(marker):
    with gfile.GFile(marker) as f:
      return json.load(f)
  started = time.time()
  with _cell_log(workdir):
    dev = {}
    if dev_split:
      dev_config = config.copy_and_resolve_references()
      dev_config.pp.test = dev_split
      dev = train.train_and_evaluate(dev_config, workdir)
    # The second call finds the final checkpoint and only evaluates, on the test split.
    test = train.train_and_evaluate(config, workdir)
  result = {'dev_top1': dev.get('accuracy_top1', math.nan),
            'dev_top5': dev.get('accuracy_top5', math.nan),
            'test_top1': test['accuracy_top1'], 'test_top5': test['accuracy_top5'],
            'test_macro_f1': test.get('macro_f1', math.nan), 'steps': config.total_steps,
            'wall_time_s': round(time.time() - started, 1),
            'ms_per_image': 1e3 * test.get('seconds_per_image', math.nan)}
  if jax.process_index() == 0:  # The only process that writes event files and the marker.
    result['images_per_sec'] = round(_images_per_sec(workdir), 1)
    _write_atomic(marker, json.dumps(result, indent=2))
  return result


def select(grid: Grid, results: Dict[str, Dict[str, Any]]) -> Dict[Tuple, Cell]:
  """group -> the cell of highest dev top-1 among its finished cells (ties: grid order)."""
  best = {}
  for cell in grid.cells:
    if cell.name not in results:
      continue
    group = grid.group(cell)
    score = results[cell.name]['dev_top1'] if grid.selected else 0.0
    if group not in best or score > results[best[group].name]['dev_top1']:
      best[group] = cell
  return best


def retrain_cell(cell: Cell) -> Cell:
  """The retraining of a selected cell, in DIR/retrain/<its name>."""
  return Cell(f'{RETRAIN_DIR}/{cell.name}', cell.values)


def results_csv(grid: Grid, results: Dict[str, Dict[str, Any]], workdir: str) -> str:
  """One row per finished cell (grid, then retrain): swept values, metrics, timing, folder."""
  keys = list(grid.cells[0].values)
  columns = ['name', 'role', 'selected', *keys, *METRIC_COLUMNS, *TIMING_COLUMNS, 'workdir']
  winners = {c.name for c in select(grid, results).values()}
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(columns)
  cells = [(c, 'grid') for c in grid.cells] + [(retrain_cell(c), 'retrain') for c in grid.cells]
  for cell, role in cells:
    if cell.name not in results:
      continue
    row = {'name': cell.name, 'role': role, 'selected': int(cell.name in winners),
           **{k: format_value(cell.values[k]) for k in keys}, **results[cell.name],
           'workdir': os.path.join(workdir, cell.name)}
    writer.writerow([row.get(c, '') for c in columns])  # Results of older versions lack some.
  return out.getvalue()


def _percent(value: float) -> str:
  return '' if value is None or math.isnan(value) else f'{100 * value:.2f}'


def results_markdown(config: ml_collections.ConfigDict, grid: Grid,
                     results: Dict[str, Dict[str, Any]]) -> str:
  """The Markdown table of reported test top-1 (%), the selected values, published numbers,
  and the other `sweep.metrics` of each reported cell."""
  sweep = config.sweep
  published = {tuple(k): v for k, v in sweep.published}
  extra = [m for m in sweep.metrics if m != 'test_top1']
  winners = select(grid, results)
  by_position = {}
  for group, cell in winners.items():
    retrained = results.get(retrain_cell(cell).name)
    if sweep.retrain_split and retrained is None:
      continue
    by_position[grid.position(cell)] = (cell, retrained or results[cell.name])
  row_values = list(dict.fromkeys(grid.position(c)[0] for c in grid.cells))
  column_values = list(dict.fromkeys(grid.position(c)[1] for c in grid.cells))
  header = list(grid.rows)
  for column in column_values:
    name = ' '.join(format_value(v) for v in column)
    label = name or 'test top-1'
    header += [label] + ([f'{label} published', f'{label} Δ'] if published else [])
    header += [f'{name} {TABLE_METRICS[m][0]}'.strip() for m in extra]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in row_values:
    fields = [format_value(v) for v in row]
    for column in column_values:
      cell, result = by_position.get((row, column), (None, {}))
      accuracy = result.get('test_top1')
      text = _percent(accuracy)
      if cell is not None and grid.selected:
        text += ' (' + ', '.join(f'{k}={format_value(cell.values[k])}'
                                 for k in grid.selected) + ')'
      fields.append(text)
      if published:
        paper = published.get(row + column)
        fields.append('' if paper is None else f'{paper:.2f}')
        fields.append('' if paper is None or accuracy is None
                      else f'{100 * accuracy - paper:+.2f}')
      for metric in extra:
        value = result.get(metric, math.nan)
        fields.append('' if math.isnan(value) else TABLE_METRICS[metric][1](value))
    lines.append('| ' + ' | '.join(fields) + ' |')
  rule = (f'selected by the highest top-1 on {sweep.dev_split} (ties: the first in grid order) '
          f'among {", ".join(grid.selected)}' if grid.selected else 'no selection')
  retrain = f', retrained on {sweep.retrain_split}' if sweep.retrain_split else ''
  also = ''.join(f', {TABLE_METRICS[m][0]}' for m in extra)
  caption = f'Test top-1 (%){also} on {config.pp.test}; {rule}{retrain}.'
  return caption + '\n\n' + '\n'.join(lines) + '\n'


def _write_png(figure: Figure, path: str) -> None:
  """Renders `figure` in memory and writes it through gfile."""
  FigureCanvasAgg(figure)
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=figure.dpi, bbox_inches='tight')
  with gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())


def _label(cell: Cell, keys: Sequence[str]) -> str:
  return ', '.join(f'{k}={format_value(cell.values[k])}' for k in keys) or 'all'


def plot(grid: Grid, results: Dict[str, Dict[str, Any]], key: str, path: str) -> None:
  """Accuracy against numeric axis `key`, one line per value of the other axes.

  A selected axis shows dev top-1 of every cell; another axis the reported test top-1.
  """
  selected_axis = key in grid.selected
  if selected_axis:
    points = [(c, results[c.name]['dev_top1']) for c in grid.cells if c.name in results]
    others = [k for k in grid.name_keys if k != key]
  else:
    points = [(c, (results.get(retrain_cell(c).name) or results[c.name])['test_top1'])
              for c in select(grid, results).values()]
    others = [k for k in grid.name_keys if k != key and k not in grid.selected]
  lines = {}
  for cell, accuracy in points:
    lines.setdefault(_label(cell, others), []).append((cell.values[key], 100 * accuracy))
  figure = Figure(figsize=(5, 3.5), dpi=100)
  ax = figure.subplots()
  for label, xy in lines.items():
    xs, ys = zip(*sorted(xy))
    ax.plot(xs, ys, marker='o', label=label)
  values = [c.values[key] for c in grid.cells]
  if min(values) > 0 and max(values) / min(values) >= 3:
    ax.set_xscale('log')
  ax.set_xlabel(key)
  ax.set_ylabel(('dev' if selected_axis else 'test') + ' top-1 (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  _write_png(figure, path)


def numeric_axes(grid: Grid) -> List[str]:
  """Name keys whose values are numbers, more than one of them: the plots' x axes."""
  def numeric(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)
  return [k for k in grid.name_keys
          if len({c.values[k] for c in grid.cells}) > 1
          and all(numeric(c.values[k]) for c in grid.cells)]


def write_outputs(config: ml_collections.ConfigDict, grid: Grid,
                  results: Dict[str, Dict[str, Any]], workdir: str) -> List[str]:
  """Writes results.csv, results.md and the plots into `workdir` (process 0 only)."""
  if jax.process_index():
    return []
  paths = [os.path.join(workdir, 'results.csv'), os.path.join(workdir, 'results.md')]
  _write_atomic(paths[0], results_csv(grid, results, workdir))
  _write_atomic(paths[1], results_markdown(config, grid, results))
  if grid.cells and all(c.name in results for c in grid.cells):
    for key in numeric_axes(grid):
      paths.append(os.path.join(workdir, f'plot_{key}.png'))
      plot(grid, results, key, paths[-1])
  return paths


def run_study(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Dict[str, Any]]:
  """Runs (or resumes) every cell, then the retrainings; writes the outputs after each."""
  grid = expand(config)
  sweep = config.sweep
  gfile.makedirs(workdir)
  results = {}
  todo = len(grid.cells) + (len(set(map(grid.group, grid.cells))) if sweep.retrain_split else 0)
  durations = []

  def run(cell: Cell, index: int, **overrides: Any) -> None:
    cell_dir = os.path.join(workdir, cell.name)
    finished = gfile.exists(os.path.join(cell_dir, RESULT_FILE))
    started = time.time()
    results[cell.name] = run_cell(cell_config(config, cell, **overrides), cell_dir,
                                  '' if overrides else sweep.dev_split)
    if not finished:
      durations.append(time.time() - started)
    eta = (logs.format_duration(sum(durations) / len(durations) * (todo - index))
           if durations else 'unknown')
    r = results[cell.name]
    logging.info('Cell %d/%d %s %s: dev top-1 %s, test top-1 %.4f; study ETA %s', index, todo,
                 cell.name, 'was finished' if finished else 'done',
                 'n/a' if math.isnan(r['dev_top1']) else f'{r["dev_top1"]:.4f}',
                 r['test_top1'], eta)
    write_outputs(config, grid, results, workdir)

  for index, cell in enumerate(grid.cells, 1):
    run(cell, index)
  if sweep.retrain_split:
    for index, cell in enumerate(select(grid, results).values(), len(grid.cells) + 1):
      run(retrain_cell(cell), index, **{'pp.train': sweep.retrain_split})
  paths = write_outputs(config, grid, results, workdir)
  logging.info('Study done: %s', ', '.join(paths))
  return results
