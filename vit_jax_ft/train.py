"""Fine-tuning loop: `create_train_state`, `train_step`, `train_and_evaluate`.

Data parallel through `jax.jit` over a 1-D device mesh: parameters replicated, batches
sharded, so the mean loss is over the global batch and gradients are averaged over
devices and hosts by construction. One step on 8 devices equals one step on 1 device.

BatchNorm models (ResNet v1, MaxViT) carry their running statistics in `TrainState.batch_stats`.
With `config.batch_norm='train'` the step normalises with the statistics of its batch (the
global batch, or the global micro-batch with accumulation: the mean over a sharded axis
is a cross-device reduction under jit, so the statistics are synchronised by construction)
and updates the running ones; micro-batches update them one after the other, as PyTorch
does when it accumulates. With 'frozen' BatchNorm normalises with the stored statistics,
which never change.
"""
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from flax import struct, traverse_util
from tensorflow.io import gfile

from vit_jax_ft import (checkpoint, checkpointing, data, defaults, image_size, logs, memory,
                        models, optim, parallel, recipe, run_dir)
from vit_jax_ft.metrics import eval_step, evaluate_each, time_per_image
from vit_jax_ft.pretrained import pretrained_path
from vit_jax_ft.run_dir import build_model

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


# config.batch_norm: what fine-tuning does with BatchNorm statistics (models without
# BatchNorm ignore it).
BATCH_NORM_MODES = ('train', 'frozen')


class TrainState(struct.PyTreeNode):
  """What a checkpoint holds: the step, parameters, optimiser state (with the reduce-on-plateau
  state), BatchNorm statistics, and the parameters' moving average when `config.ema_decay` is
  set."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  batch_stats: Any = struct.field(default_factory=dict)  # {} for models without BatchNorm.

  @property
  def variables(self) -> Dict[str, Any]:
    """The Flax variables the model is applied with for evaluation."""
    return variables_of(self.params, self.batch_stats)


def variables_of(params: Any, batch_stats: Any) -> Dict[str, Any]:
  """`{'params': ...}`, with `'batch_stats'` when the model has BatchNorm."""
  return {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}


def check_batch_norm(config: ml_collections.ConfigDict) -> None:
  """Fails before any compile on an unknown `config.batch_norm`."""
  if config.batch_norm not in BATCH_NORM_MODES:
    raise ValueError(f'config.batch_norm={config.batch_norm!r}; choose {BATCH_NORM_MODES}: '
                     "'train' updates the BatchNorm statistics, 'frozen' keeps them.")


def training_model(config: ml_collections.ConfigDict, model: nn.Module) -> nn.Module:
  """The model the training step applies: BatchNorm on its stored statistics when frozen."""
  if config.batch_norm == 'frozen' and 'frozen_batch_norm' in model.__dataclass_fields__:
    return model.clone(frozen_batch_norm=True)
  return model


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def initial_variables(config: ml_collections.ConfigDict, model: nn.Module) -> Dict[str, Any]:
  """The variables training starts from, on the host: the pretrained file's with a fresh head,
  or a fresh init. With a file only the head is computed (XLA drops the rest of the init, which
  would take seconds to compile); its values equal those of the whole init."""
  size = config.pp.crop
  rng = jax.device_put(jax.random.PRNGKey(config.seed), jax.local_devices(backend='cpu')[0])

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, size, size, 3)), train=False)
    return variables_of(variables['params'], variables.get('batch_stats'))
  path = pretrained_path(config)
  if not path:
    logging.warning('No pretrained checkpoint: training %s from scratch.', config.model_name)
    return jax.device_get(jax.jit(init)(rng))
  logging.info('Loading pretrained weights from %s', path)
  head = jax.device_get(jax.jit(lambda rng: checkpoint.head_of(init(rng)))(rng))
  template = {name: traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(tree, sep='/'), **head[name]}, sep='/')
              for name, tree in jax.eval_shape(init, rng).items()}
  return checkpoint.load_pretrained_variables(path, template)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                       ) -> TrainState:
  """The model's initial variables (`initial_variables`) and the optimiser, replicated."""
  variables = initial_variables(config, model)
  # The average starts at the first parameters, in buffers of its own (the state is donated).
  ema_params = parallel.replicate(mesh, variables['params']) if config.ema_decay else None
  variables = parallel.replicate(mesh, variables)
  params = variables['params']
  opt_state = jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(params)
  step = parallel.replicate(mesh, jnp.zeros((), jnp.int32))
  return TrainState(step=step, params=params, opt_state=opt_state, ema_params=ema_params,
                    batch_stats=variables.get('batch_stats', {}))


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                         tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                         ) -> TrainState:
  """Shapes, dtypes and shardings of the train state, to restore a checkpoint into."""
  variables = models.abstract_variables(model, config.pp.crop)
  params = variables['params']
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=jax.eval_shape(tx.init, params),
                     ema_params=params if config.ema_decay else None,
                     batch_stats=variables.get('batch_stats', {}))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: Optional[jax.Array],
                           normaliser: Any) -> jax.Array:
  """sum(weight * cross-entropy) / normaliser, so micro-batches add up to the batch mean;
  `labels` are integers or (batch, classes) targets (`recipe.soft_targets`)."""
  logits = logits.astype(jnp.float32)
  losses = (optax.softmax_cross_entropy(logits, labels) if labels.ndim == 2 else
            optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return jnp.sum(losses if weights is None else weights * losses) / normaliser


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, accum_steps: int,
               dropout_rng: jax.Array, frozen: Optional[Any] = None,
               step_recipe: recipe.StepRecipe = recipe.StepRecipe()
               ) -> Tuple[TrainState, Metrics]:
  """One update on a global batch, its gradient accumulated over `accum_steps` micro-batches.

  `accum_steps=1` is a single forward/backward with no loop. Otherwise the first micro-batch
  starts the sums and a `lax.fori_loop` adds the rest (as the official code does), so no
  zero-initialised gradient tree is kept and added. `frozen` (a tree of bools like the params)
  stops gradients at frozen parameters, so XLA skips their backward pass and `grad_norm`
  covers only what is trained. `step_recipe` smooths and mixes the global batch's targets
  before the split (`recipe`), and updates `ema_params` when the state has them. BatchNorm
  statistics pass from each micro-batch to the next (a model built with `frozen_batch_norm`
  returns them unchanged).
  """
  weights = batch.get('weight')
  # Without weights the normaliser is the static batch size: no reduction, no weight multiply.
  normaliser = batch['label'].shape[0] if weights is None else jnp.sum(weights)
  rng = jax.random.fold_in(dropout_rng, state.step)
  params = state.params
  images, labels = batch['image'], batch['label']
  if step_recipe.soft_targets:  # The weights go into the targets (the normaliser stays).
    labels = recipe.soft_targets(labels, model.num_classes, step_recipe.label_smoothing,
                                 weights)
    weights = None
    if step_recipe.mixes:
      images, labels = recipe.mix_batch(jax.random.fold_in(rng, recipe.MIX_STREAM),
                                        step_recipe, images, labels)

  def loss_fn(params, batch_stats, images, labels, w, index):
    if frozen is not None:  # Inside the differentiated function, or it would stop nothing.
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    logits, updated = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, rngs={'dropout': jax.random.fold_in(rng, index)},
                                  mutable=['batch_stats'])
    return (weighted_cross_entropy(logits, labels, w, normaliser),
            updated.get('batch_stats', {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  inputs = {'image': images, 'label': labels, 'weight': weights}
  if accum_steps == 1:
    (loss, batch_stats), grads = grad_fn(params, state.batch_stats, inputs['image'],
                                         inputs['label'], weights, 0)
  else:
    # Strided split: micro-batch i takes rows i, i+k, ..., so every device keeps a share.
    micro = jax.tree.map(
        lambda x: x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]
                            ).swapaxes(0, 1), inputs)

    def grads_of(i, batch_stats):
      part = jax.tree.map(lambda x: x[i], micro)
      return grad_fn(params, batch_stats, part['image'], part['label'], part['weight'], i)

    def accumulate(i, carry):
      (loss, batch_stats), grads = carry
      (part_loss, batch_stats), part_grads = grads_of(i, batch_stats)
      return (loss + part_loss, batch_stats), jax.tree.map(jnp.add, grads, part_grads)

    (loss, batch_stats), grads = jax.lax.fori_loop(1, accum_steps, accumulate,
                                                   grads_of(0, state.batch_stats))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = recipe.ema_update(ema_params, new_params, step_recipe.ema_decay)
  new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                            ema_params=ema_params, batch_stats=batch_stats)
  return new_state, {'loss': loss, 'grad_norm': optax.global_norm(grads),
                     'param_norm': optax.global_norm(new_params)}


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, *, accum_steps: int,
                   seed: int, frozen: Optional[Any] = None,
                   step_recipe: recipe.StepRecipe = recipe.StepRecipe()):
  """`train_step` jitted with its accumulation and the dropout seed; the state is donated."""
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, accum_steps=accum_steps,
                                   dropout_rng=dropout_rng, frozen=frozen,
                                   step_recipe=step_recipe),
                 donate_argnums=0)


def fit_in_memory(config: ml_collections.ConfigDict, base: nn.Module,
                  tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                  frozen: Optional[Any] = None) -> Tuple[int, nn.Module]:
  """(accum_steps, model): the fewest micro-batches (then `base` with remat) whose compiled
  step fits the device memory or `config.memory_budget_gb` (`config.auto_accum_steps`)."""
  state = abstract_train_state(config, base, tx, mesh)
  size, sharding = config.pp.crop, parallel.batch_sharded(mesh)
  batch = {'image': jax.ShapeDtypeStruct((config.batch, size, size, 3), jnp.float32,
                                         sharding=sharding),
           'label': jax.ShapeDtypeStruct((config.batch,), jnp.int32, sharding=sharding)}

  def model_with(remat):
    return base.clone(remat=True) if remat else base

  def compile_step(accum_steps, remat):
    step = jit_train_step(model_with(remat), tx, accum_steps=accum_steps, seed=config.seed,
                          frozen=frozen, step_recipe=recipe.from_config(config))
    return step.lower(state, batch).compile()
  accum_steps, remat = memory.fit_accum_steps(config, compile_step)
  return accum_steps, model_with(remat)


class Preempted(Exception):
  """Training saved a checkpoint and stopped after SIGTERM; rerun the command to resume."""


class _Preemption:
  """Turns SIGTERM into a request to save and stop at a step boundary every host agrees on.

  On one process our handler sets a flag. On several, `jax.distributed`'s preemption service
  owns SIGTERM (a handler of ours would replace its own and stop nothing): it tells the other
  hosts, and `reached_preemption` is then true at the same step on all of them. The service
  counts calls from 0, so it is given the steps of this run, not the global step: a notice
  before the first step of a resumed run then stops at its first step.
  """

  def __init__(self, manager: ocp.CheckpointManager, start_step: int):
    self._manager = manager
    self._start_step = start_step
    self._requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self._requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to stop at `step`; called at every step, as the preemption service requires."""
    if jax.process_count() > 1:
      return self._manager.reached_preemption(step - self._start_step)
    return self._requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(unchecked: List[Metrics], first_step: int, last_saved: Optional[int]) -> None:
  """Raises when a loss or the parameters since the last check are NaN or infinite."""
  if not unchecked:
    return
  values = jax.device_get([(m['loss'], m['param_norm']) for m in unchecked])
  bad = [i for i, (loss, norm) in enumerate(values) if not np.isfinite([loss, norm]).all()]
  if bad:
    loss, norm = values[bad[0]]
    where = (f'the last good checkpoint (step {last_saved}) is kept'
             if last_saved else 'no checkpoint was written')
    raise NonFiniteLossError(
        f'The training loss became {loss} (parameter norm {norm}) at step '
        f'{first_step + bad[0]}; {where}. Lower config.base_lr, keep grad_norm_clip, or '
        'check the data.')


def write_run_files(config: ml_collections.ConfigDict, workdir: str,
                    info: 'data.DatasetInfo', model: nn.Module) -> None:
  """Writes the resolved config with the model built, the classes and the examples used next
  to the checkpoints, so inference rebuilds the same network without the trainer."""
  logging.info('Dataset %s: %d classes, %d training examples per epoch, %d test examples; '
               'training examples per class: %s', config.dataset, info.num_classes,
               info.num_train, info.num_test, info.train_class_counts)
  if jax.process_index():
    return
  gfile.makedirs(workdir)
  with gfile.GFile(os.path.join(workdir, run_dir.CONFIG_FILE), 'w') as f:
    json.dump(run_dir.config_record(config, model), f, indent=2)
  data.write_dataset_info(workdir, info)


def log_start(config: ml_collections.ConfigDict, state: TrainState, info: 'data.DatasetInfo',
              start: int, workdir: str) -> None:
  """One line that says what this run trains, on what, how and where."""
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info('Training %s (%s parameters) on %s: %d classes, %d training and %d test '
               'images; steps %d..%d, batch %d (accum_steps %d), %s base_lr %g %s; %d %s '
               'device(s); workdir %s. The first step compiles.', config.model_name,
               f'{num_params:,}', config.dataset, info.num_classes, info.num_train,
               info.num_test, start + 1, config.total_steps, config.batch,
               config.accum_steps, config.optimizer, config.base_lr, config.decay_type,
               jax.device_count(), jax.devices()[0].platform, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Fine-tunes `config.model_name` on `config.dataset`; returns the final test metrics."""
  started = time.time()
  mesh = parallel.create_mesh()
  memory.check_accum_steps(config)
  parallel.check_batch_size(config.batch_eval, 'batch_eval')
  step_recipe = recipe.from_config(config)
  check_batch_norm(config)
  info = data.get_dataset_info(config)
  model = build_model(config, info.num_classes)
  image_size.check(config, model)
  info = data.earlier_decode_failures(info, workdir)
  write_run_files(config, workdir, info, model)
  tx = optim.make_optimizer(config)
  lr_fn = optim.learning_rate_schedule(config)
  plateau = config.decay_type == 'reduce_on_plateau'
  if plateau:
    plateau_fn = jax.jit(optim.plateau_step(config), out_shardings=parallel.replicated(mesh),
                         donate_argnums=0)

  manager = checkpointing.manager(workdir, config)
  target = abstract_train_state(config, model, tx, mesh)
  checkpointing.check_space(workdir, target)
  # Resuming: build shapes only, then restore; no need to read the pretrained file.
  state = checkpointing.restore_latest(manager, target)
  if state is None:
    state = create_train_state(config, model, tx, mesh)
  start = int(jax.device_get(state.step))
  if start:
    logging.info('Resumed from the checkpoint of step %d in %s', start, workdir)

  frozen = optim.frozen_mask(config.freeze, state.params) if config.freeze else None
  accum_steps, step_model = config.accum_steps, training_model(config, model)
  if config.auto_accum_steps:
    accum_steps, step_model = fit_in_memory(config, step_model, tx, mesh, frozen)
  step_fn = jit_train_step(step_model, tx, accum_steps=accum_steps, seed=config.seed,
                           frozen=frozen, step_recipe=step_recipe)
  eval_fn = jax.jit(functools.partial(eval_step, model=model))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                          for k, v in defaults.flatten(config)})
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.progress_every or None)

  def run_eval(step):
    """Test metrics of the parameters, and of their average as `ema_*` when kept."""
    nonlocal info
    named = {'': state.variables}
    if state.ema_params is not None:
      named['ema_'] = variables_of(state.ema_params, state.batch_stats)
    eval_data = data.get_eval_data(config)
    with progress.timed('eval'):
      results = evaluate_each(named, eval_fn, mesh, eval_data, config.prefetch)
    info = data.record_decode_failures(info, eval_data.failures, False, workdir)
    metrics = {}
    for prefix, result in results.items():
      metrics.update({f'{prefix}accuracy_top1': result.top1,
                      f'{prefix}accuracy_top5': result.top5, f'{prefix}loss': result.loss})
    metrics['macro_f1'] = results[''].macro_f1
    metrics['num_examples'] = results[''].num_examples
    if config.time_inference and step >= config.total_steps:  # How fast it classifies.
      metrics['seconds_per_image'] = time_per_image(eval_fn, state.variables, mesh,
                                                    config.batch_eval, config.pp.crop)
    writer.write_scalars(step, {f'test_{k}': v for k, v in metrics.items()})
    ema = (f'; EMA top-1 {metrics["ema_accuracy_top1"]:.4f}, top-5 '
           f'{metrics["ema_accuracy_top5"]:.4f}' if state.ema_params is not None else '')
    logging.info('Step %d: test top-1 %.4f, top-5 %.4f on %d examples%s', step,
                 metrics['accuracy_top1'], metrics['accuracy_top5'], metrics['num_examples'],
                 ema)
    return metrics

  def eval_and_plateau(step):
    """`run_eval`, then the plateau's move on its loss (after warm-up only)."""
    nonlocal state
    metrics = run_eval(step)
    if plateau and step > config.warmup_steps:
      state = state.replace(opt_state=plateau_fn(state.opt_state, metrics['loss']))
    return metrics

  def is_eval_step(step):
    return step == config.total_steps or bool(config.eval_every and step % config.eval_every == 0)

  try:
    if start >= config.total_steps:
      logging.info('The checkpoint of step %d already reaches total_steps=%d: evaluating only.',
                   start, config.total_steps)
      return run_eval(start)
    train_data = data.get_train_data(config, start_step=start)
    batches = parallel.prefetch_to_mesh(mesh, train_data, config.prefetch)
    unchecked, first_unchecked, last_saved = [], start + 1, start or None
    metrics = {}
    if plateau and start and is_eval_step(start):
      # A checkpoint holds the state before its step's evaluation moved the plateau (the
      # save comes first; a preempted run skips that evaluation): evaluate again, as then.
      eval_and_plateau(start)
    log_start(config, state, info, start, workdir)
    bar = logs.Progress(start, config.total_steps, show_bar=None if jax.process_index() == 0
                        else False)
    with _Preemption(manager, start) as preemption:
      for step in range(start + 1, config.total_steps + 1):
        state, step_metrics = step_fn(state, next(batches))
        unchecked.append(step_metrics)
        if step == start + 1:  # Throughput is measured from the end of the compile.
          jax.block_until_ready(step_metrics)
          window_start, window_step = time.time(), step
        progress(step)
        bar.update(step)
        last = step == config.total_steps
        stop = preemption.should_stop(step)
        report = (config.progress_every and step % config.progress_every == 0) or last
        save = (config.checkpoint_every and step % config.checkpoint_every == 0) or last or stop
        if report or save:
          _check_finite(unchecked, first_unchecked, last_saved)
          unchecked, first_unchecked = [], step + 1
        if report:  # At the same steps on every host: it gathers the names from all.
          info = data.record_decode_failures(info, train_data.failures, True, workdir)
        if report and step > window_step:
          images_per_sec = config.batch * (step - window_step) / (time.time() - window_start)
          scalars = jax.device_get(step_metrics)
          writer.write_scalars(step, {
              'train_loss': scalars['loss'], 'grad_norm': scalars['grad_norm'],
              # Host numbers: the writer's thread must not read device arrays later.
              'learning_rate': float(lr_fn(step - 1) * optim.plateau_scale(state.opt_state)),
              'images_per_sec': images_per_sec,
              'images_per_sec_per_device': images_per_sec / jax.device_count()})
          logging.info('Step %d/%d: loss %.4f, %.1f images/s, ETA %s', step,
                       config.total_steps, scalars['loss'], images_per_sec, bar.eta(step))
          window_start, window_step = time.time(), step
        if save:  # Before the evaluation, so a preempted run saves within its grace period.
          checkpointing.save(manager, step, state)
          last_saved = step
        if stop and not last:
          raise Preempted(f'Saved the checkpoint of step {step} after SIGTERM; rerun the same '
                          'command to resume.')
        if is_eval_step(step):
          metrics = eval_and_plateau(step)
    bar.close()
    logging.info('Done: %d steps in %s; test top-1 %.4f, top-5 %.4f. Next: python -m '
                 'vit_jax_ft.evaluate --workdir=%s', config.total_steps - start,
                 logs.format_duration(time.time() - started), metrics['accuracy_top1'],
                 metrics['accuracy_top5'], workdir)
    return metrics
  finally:
    checkpointing.finish(manager)
    writer.flush()
