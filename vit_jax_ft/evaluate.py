r"""Evaluates a fine-tuned workdir or a released checkpoint on a dataset split.

  python -m vit_jax_ft.evaluate --workdir=/tmp/run1
  python -m vit_jax_ft.evaluate --checkpoint=checkpoints/imagenet21k+imagenet2012/ViT-B_16.npz \
      --model_name=ViT-B_16 --image_size=384 --dataset=imagenet2012 --output_dir=/tmp/eval
  python -m vit_jax_ft.evaluate --checkpoint=checkpoints/imagenet21k/ViT-B_16.npz \
      --model_name=ViT-B_16 --image_size=224 --dataset=cifar10 --linear_probe \
      --output_dir=/tmp/probe

Writes `metrics.json`, `confusion_matrix.csv` and `confusion_matrix.png` to the
output folder (default for a workdir: WORKDIR/evaluation/SPLIT_stepN), the scalars
to TensorBoard (the workdir itself, beside the training curves), and a table to
the terminal. `--linear_probe` instead fits the paper's few-shot linear
classifier on frozen features (1, 5, 10, 25 images per class; 0 = all).
"""
import csv
import dataclasses
import functools
import itertools
import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from clu import metric_writers
from tensorflow.io import gfile

from vit_jax_ft import (data, defaults, linear_probe, logs, memory, metrics, parallel, predict,
                        run_dir)
from vit_jax_ft.explain import figures
from vit_jax_ft.metrics import ClassificationMetrics, Timing, f1_scores, time_inference

FLAGS = flags.FLAGS


def evaluate_model(model: nn.Module, variables: Any, batches: Iterable[Dict[str, np.ndarray]],
                   timing_repeats: int = 5, prefetch: int = 2
                   ) -> Tuple[ClassificationMetrics, Optional[Timing]]:
  """Metrics over every real example of padded `batches` (the training loop's evaluation
  step and sums), and the time of that step on the first batch.

  Batches are this host's parts of global batches (as `data.get_eval_data` yields them);
  `variables` (as `run_dir.Loaded.variables`) are replicated and batches split over all
  devices.
  """
  batches = iter(batches)
  first = next(batches, None)
  if first is None:
    raise ValueError('The evaluation split is empty.')
  parallel.check_batch_size(len(first['image']) * jax.process_count(), 'batch_eval')
  mesh = parallel.create_mesh()
  variables = parallel.replicate(mesh, variables)
  eval_fn = jax.jit(functools.partial(metrics.eval_step, model=model))
  timing = (time_inference(eval_fn, variables, parallel.to_global(mesh, first), timing_repeats)
            if timing_repeats else None)
  result = metrics.evaluate(variables, eval_fn, mesh, itertools.chain([first], batches), prefetch)
  return result, timing


def per_class_rows(result: ClassificationMetrics,
                   class_names: Sequence[str]) -> List[Dict[str, Any]]:
  """Per class: name, examples, accuracy (recall) and F1 (None where undefined)."""
  def number(x):
    return None if np.isnan(x) else float(x)
  return [{'class': name, 'examples': int(support), 'accuracy': number(accuracy),
           'f1': number(f1)}
          for name, support, accuracy, f1 in zip(
              class_names, result.confusion.sum(axis=1), result.per_class_accuracy,
              f1_scores(result.confusion))]


def write_report(output_dir: str, result: ClassificationMetrics, class_names: Sequence[str],
                 timing: Optional[Timing], about: Dict[str, Any]) -> Dict[str, Any]:
  """Writes metrics.json, confusion_matrix.csv and .png; returns the JSON content."""
  gfile.makedirs(output_dir)
  report = dict(about, **result.summary(), per_class=per_class_rows(result, class_names))
  if timing:
    report['timing'] = dict(dataclasses.asdict(timing),
                            seconds_per_image=timing.seconds_per_image,
                            device=jax.devices()[0].device_kind,
                            devices=jax.device_count())
  with gfile.GFile(os.path.join(output_dir, 'metrics.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with gfile.GFile(os.path.join(output_dir, 'confusion_matrix.csv'), 'w') as f:
    writer = csv.writer(f)
    writer.writerow(['true \\ predicted'] + list(class_names))
    for name, row in zip(class_names, result.confusion):
      writer.writerow([name] + row.tolist())
  figures.confusion_matrix(result.confusion, class_names,
                           os.path.join(output_dir, 'confusion_matrix.png'))
  return report


def format_table(report: Dict[str, Any], worst: int = 10) -> str:
  """The headline numbers and the per-class accuracies (the worst ones for many classes)."""
  lines = [f'{"examples":<22}{report["num_examples"]:>10d}',
           f'{"top-1 accuracy":<22}{report["top1"]:>10.4f}',
           f'{"top-1 error":<22}{report["top1_error"]:>10.4f}']
  if 'top5' in report:
    lines.append(f'{"top-5 accuracy":<22}{report["top5"]:>10.4f}')
  lines.append(f'{"macro F1":<22}{report["macro_f1"]:>10.4f}')
  if 'timing' in report:
    timing = report['timing']
    lines += [f'{"ms per image":<22}{1e3 * timing["seconds_per_image"]:>10.3f}',
              f'{"ms per batch of " + str(timing["batch_size"]):<22}'
              f'{1e3 * timing["seconds_per_batch"]:>10.2f}']
  rows = [r for r in report['per_class'] if r['accuracy'] is not None]
  if len(rows) > 2 * worst:
    rows = sorted(rows, key=lambda r: r['accuracy'])[:worst]
    lines.append(f'the {worst} least accurate classes:')
  lines += [f'  {r["class"][:30]:<30}{r["accuracy"]:>8.4f}  ({r["examples"]} examples)'
            for r in rows]
  return '\n'.join(lines)


def write_scalars(logdir: str, step: int, scalars: Dict[str, float]) -> None:
  """Adds the scalars to the TensorBoard event files of `logdir` (lead host only)."""
  writer = metric_writers.create_default_writer(
      logdir, just_logging=jax.process_index() > 0, asynchronous=False)
  writer.write_scalars(step, scalars)
  writer.close()


def evaluation_config(config: ml_collections.ConfigDict, dataset: Optional[str] = None,
                      split: Optional[str] = None, train_split: Optional[str] = None,
                      batch_eval: Optional[int] = None, data_dir: Optional[str] = None,
                      manual_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """A run's config pointed at the data to evaluate on (unlike `defaults.with_dataset`, which
  applies a whole training preset); unset arguments keep the config's values
  (a preset's test split for a newly named dataset)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if dataset:
    preset = defaults.DATASET_PRESETS.get(dataset, {}).get('pp', {})
    config.dataset = dataset
    config.pp.test = preset.get('test', 'test')
    config.pp.train = preset.get('train', 'train')
  config.pp.test = split or config.pp.test
  config.pp.train = train_split or config.pp.train
  config.batch_eval = batch_eval or config.batch_eval
  config.tfds_data_dir = data_dir or config.get('tfds_data_dir')
  config.tfds_manual_dir = manual_dir or config.get('tfds_manual_dir')
  if not config.dataset:
    raise ValueError('No dataset to evaluate on: give --dataset (a tfds name or an image '
                     'folder) with --checkpoint.')
  return config


def default_output_dir(workdir: Optional[str], split: str, step: Optional[int],
                       ema: bool = False) -> str:
  """WORKDIR/evaluation/SPLIT_stepN (SPLIT_stepN_ema for the moving average) for a workdir;
  released checkpoints need --output_dir."""
  if not workdir:
    raise ValueError('Give --output_dir for the results of a --checkpoint evaluation.')
  name = f'{re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_")}_step{step}'
  return os.path.join(workdir, 'evaluation', name + ('_ema' if ema else ''))


def run_linear_probe(loaded: run_dir.Loaded, config: ml_collections.ConfigDict,
                     shots: Sequence[int], l2_reg: float, seed: int) -> Dict[int, float]:
  """Few-shot accuracy of ridge probes on the frozen features of the train split."""
  train = linear_probe.extract_features(
      loaded.model, loaded.variables, data.get_eval_data(config, split=config.pp.train))
  test = linear_probe.extract_features(loaded.model, loaded.variables,
                                       data.get_eval_data(config))
  num_classes = data.get_dataset_info(config).num_classes
  return linear_probe.few_shot_accuracy(train, test, num_classes, shots, l2_reg, seed)


def define_flags() -> None:
  """The command's flags (defined only when run, to keep importers' flags clean)."""
  predict.define_model_flags()
  flags.DEFINE_string('dataset', None, 'tfds name or image folder (default: the workdir '
                      "config's dataset).")
  flags.DEFINE_string('split', None, 'Split to evaluate (default: config.pp.test).')
  flags.DEFINE_string('train_split', None, 'Split the linear probe is fitted on.')
  flags.DEFINE_integer('batch_eval', None, 'Global evaluation batch (default: config).')
  flags.DEFINE_string('tfds_data_dir', None, 'tensorflow_datasets data_dir.')
  flags.DEFINE_string('tfds_manual_dir', None, 'tensorflow_datasets manual_dir.')
  flags.DEFINE_string('output_dir', None, 'Folder for the JSON, CSV and PNG results.')
  flags.DEFINE_integer('timing_repeats', 5, 'Timed runs of one batch (0: no timing).')
  flags.DEFINE_bool('linear_probe', False, 'Fit a linear probe on frozen features instead.')
  flags.DEFINE_list('shots', [str(s) for s in linear_probe.PAPER_SHOTS],
                    'Images per class for the linear probe (0: all).')
  flags.DEFINE_float('l2_reg', linear_probe.DEFAULT_L2_REG, 'Ridge regularisation.')
  flags.DEFINE_integer('seed', 0, 'Seed of the few-shot image choice.')


def main(argv: List[str]) -> None:
  memory.hide_gpus_from_tensorflow()
  logs.configure_terminal()  # Other libraries' INFO (orbax's restore) off the terminal.
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  loaded = predict.model_from_flags(with_head=not FLAGS.linear_probe)
  config = evaluation_config(loaded.config, FLAGS.dataset, FLAGS.split, FLAGS.train_split,
                        FLAGS.batch_eval, FLAGS.tfds_data_dir, FLAGS.tfds_manual_dir)
  split, step = config.pp.test, loaded.step or 0
  output_dir = FLAGS.output_dir or default_output_dir(FLAGS.workdir, split, loaded.step,
                                                      FLAGS.ema)
  about = {'model_name': config.model_name, 'dataset': config.dataset, 'split': split,
           'workdir': FLAGS.workdir, 'checkpoint': FLAGS.checkpoint, 'step': loaded.step,
           'ema': FLAGS.ema}
  if FLAGS.linear_probe:
    accuracy = run_linear_probe(loaded, config, [int(s) for s in FLAGS.shots],
                                FLAGS.l2_reg, FLAGS.seed)
    report = dict(about, l2_reg=FLAGS.l2_reg, seed=FLAGS.seed,
                  few_shot_accuracy={str(k): v for k, v in accuracy.items()})
    if jax.process_index() == 0:
      gfile.makedirs(output_dir)
      with gfile.GFile(os.path.join(output_dir, 'linear_probe.json'), 'w') as f:
        json.dump(report, f, indent=2)
      print('\n'.join(f'{(str(k) if k else "all") + "-shot":<10}{v:.4f}'
                      for k, v in accuracy.items()))
    write_scalars(FLAGS.workdir or output_dir, step,
                  {f'linear_probe/{split}/{k or "all"}_shot': v for k, v in accuracy.items()})
    return
  result, timing = evaluate_model(loaded.model, loaded.variables, data.get_eval_data(config),
                                  FLAGS.timing_repeats, config.prefetch)
  if jax.process_index() == 0:
    report = write_report(output_dir, result, loaded.class_names, timing, about)
    print(format_table(report))
  prefix = f'evaluate/{split}/' + ('ema_' if FLAGS.ema else '')
  write_scalars(FLAGS.workdir or output_dir, step,
                {prefix + k: v for k, v in result.summary().items() if k != 'num_examples'})
  logging.info('Results written to %s', output_dir)


if __name__ == '__main__':
  define_flags()
  app.run(main)
