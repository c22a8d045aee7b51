"""The paper's optimisation recipe as an optax chain: schedule, clipping, SGD momentum, decoupled
weight decay, freezing, and the reduce-on-plateau scale."""
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib
from flax import traverse_util

# End value of the official linear decay (`vit_jax/utils.py`).
LINEAR_END = 1e-5


def _decay_schedule(config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """The schedule after warm-up, over its `steps` steps, from `config.decay_type`."""
  base, warmup = config.base_lr, config.warmup_steps

  def step_decay():
    milestones = tuple(config.decay_milestones)
    if (not milestones or list(milestones) != sorted(set(milestones))
        or not warmup < milestones[0] or not milestones[-1] < config.total_steps):
      raise ValueError(f'decay_milestones={milestones} must be increasing steps in '
                       f'(warmup_steps={warmup}, total_steps={config.total_steps}).')
    return optax.piecewise_constant_schedule(
        base, {m - warmup: config.decay_factor for m in milestones})

  def exponential_decay():
    if not 0.0 < config.decay_rate <= 1.0:
      raise ValueError(f'decay_rate={config.decay_rate} must be in (0, 1]: the factor of '
                       'the learning rate per step.')
    return optax.exponential_decay(base, transition_steps=1, decay_rate=config.decay_rate)

  decays = {
      'cosine': lambda: optax.cosine_decay_schedule(base, steps),
      'linear': lambda: optax.linear_schedule(base, LINEAR_END, steps),
      'constant': lambda: optax.constant_schedule(base),
      'exponential': exponential_decay,
      'step': step_decay,
      # The scale `scale_by_plateau` multiplies in lowers it from the evaluation loss.
      'reduce_on_plateau': lambda: optax.constant_schedule(base),
  }
  if config.decay_type not in decays:
    raise ValueError(f'decay_type={config.decay_type!r}; allowed: {sorted(decays)}.')
  if config.decay_type == 'step' and not 0.0 < config.decay_factor:
    raise ValueError(f'decay_factor={config.decay_factor} must be positive.')
  return decays[config.decay_type]()


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to `base_lr`, then the decay of `decay_type` (official cosine/linear)."""
  total, warmup, base = config.total_steps, config.warmup_steps, config.base_lr
  if not 0 <= warmup < total:
    raise ValueError(f'warmup_steps={warmup} must be in [0, total_steps={total}).')
  decay = _decay_schedule(config, total - warmup)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])


_BLOCK = re.compile(r'(^|/)encoderblock_(\d+)/')
# Parameters after the last block: they learn at the full rate under layer decay.
_TOP = re.compile(r'(^|/)(encoder_norm|pre_logits|head)/')


def layer_decay_scales(params: Any, rate: float) -> Any:
  """timm's layer-wise learning-rate scale per parameter: rate ** (depth + 1 - layer id).

  Layer ids: 0 for the embeddings (patches, class token, position embeddings, hybrid stem),
  i + 1 for `encoderblock_i`, depth + 1 for the final norm, pre-logits and head.
  """
  names = list(traverse_util.flatten_dict(params, sep='/'))
  blocks = [int(m.group(2)) for m in map(_BLOCK.search, names) if m]
  if not blocks:
    raise ValueError('config.layer_decay needs a transformer with `encoderblock_N` layers; '
                     f'parameter names look like {names[:3]}.')
  depth = max(blocks) + 1

  def layer_id(name: str) -> int:
    block = _BLOCK.search(name)
    if block:
      return int(block.group(2)) + 1
    return depth + 1 if _TOP.search(name) else 0

  return traverse_util.unflatten_dict(
      {n: rate ** (depth + 1 - layer_id(n)) for n in names}, sep='/')


def scale_by_layer_decay(rate: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's `layer_decay_scales` (a static tree)."""

  def update(updates, state, params=None):
    del params
    scales = layer_decay_scales(updates, rate)
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def plateau_transform(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """optax.contrib's reduce-on-plateau with the `plateau_*` keys, checked by name."""
  checks = {
      'plateau_factor': (0 < config.plateau_factor < 1, 'in (0, 1)'),
      'plateau_patience': (isinstance(config.plateau_patience, int)
                           and config.plateau_patience >= 1, 'an integer >= 1'),
      'plateau_cooldown': (isinstance(config.plateau_cooldown, int)
                           and config.plateau_cooldown >= 0, 'an integer >= 0'),
      'plateau_rtol': (0 <= config.plateau_rtol <= 1, 'in [0, 1]'),
      'plateau_atol': (config.plateau_atol >= 0, '>= 0'),
      'eval_every': (config.eval_every >= 1, 'an integer >= 1 with reduce_on_plateau, which '
                     'reads the loss of each evaluation'),
  }
  for key, (valid, allowed) in checks.items():
    if not valid:
      raise ValueError(f'config.{key}={config[key]!r}; allowed: {allowed}.')
  if not config.plateau_rtol and not config.plateau_atol:
    raise ValueError('config.plateau_rtol and config.plateau_atol are both 0; make one '
                     'positive (an improvement must beat the best loss by a margin).')
  return optax.contrib.reduce_on_plateau(
      factor=config.plateau_factor, patience=config.plateau_patience,
      rtol=config.plateau_rtol, atol=config.plateau_atol, cooldown=config.plateau_cooldown)


def scale_by_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Multiplies the updates by the reduce-on-plateau scale of its state, which only
  `plateau_step` changes: the evaluation loss is known at evaluations, not at every step."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: (state.scale * u).astype(u.dtype), updates), state

  return optax.GradientTransformation(plateau_transform(config).init, update)


def _is_plateau(node: Any) -> bool:
  return isinstance(node, optax.contrib.ReduceLROnPlateauState)


def plateau_step(config: ml_collections.ConfigDict) -> Callable[[Any, Any], Any]:
  """(opt_state, evaluation loss) -> opt_state with its plateau state moved by optax's rule:
  one evaluation counts as one epoch of `plateau_patience` and `plateau_cooldown`."""
  transform = plateau_transform(config)

  def step(opt_state, loss):
    return jax.tree.map(
        lambda s: transform.update({}, s, value=loss)[1] if _is_plateau(s) else s,
        opt_state, is_leaf=_is_plateau)
  return step


def plateau_scale(opt_state: Any) -> float:
  """The reduce-on-plateau scale of the learning rate in `opt_state` (1 without one)."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_plateau) if _is_plateau(s)]
  return float(jnp.asarray(states[0].scale)) if states else 1.0


def _scale_by_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The gradient statistics of `config.optimizer`, before weight decay and learning rate."""
  optimizers = {
      'sgd': lambda: (optax.trace(decay=config.momentum, accumulator_dtype=config.optim_dtype)
                      if config.momentum else optax.identity()),
      'adam': lambda: optax.scale_by_adam(mu_dtype=config.optim_dtype),
      'adamw': lambda: optax.scale_by_adam(mu_dtype=config.optim_dtype),
  }
  if config.optimizer not in optimizers:
    raise ValueError(f'optimizer={config.optimizer!r}; allowed: {sorted(optimizers)}.')
  return optimizers[config.optimizer]()


def decayed_mask(pattern: str) -> Callable[[Any], Any]:
  """True for each parameter whose '/'-joined name matches `pattern` (default: kernels only)."""
  compiled = re.compile(pattern)

  def mask(params):
    flat = traverse_util.flatten_dict(params, sep='/')
    if not any(compiled.search(name) for name in flat):
      raise ValueError(f'config.weight_decay_params={pattern!r} matches no parameter; names '
                       f'look like {list(flat)[:3]}.')
    return traverse_util.unflatten_dict({k: bool(compiled.search(k)) for k in flat}, sep='/')
  return mask


def _base_optimizer(config: ml_collections.ConfigDict,
                    lr: optax.Schedule) -> optax.GradientTransformation:
  """The optimiser's statistics, decoupled weight decay, then the learning rate.

  With `weight_decay` > 0 every optimiser subtracts `lr * weight_decay * param` beside its
  own update (Loshchilov and Hutter's decoupled decay; `sgd` becomes SGDW, `adam` AdamW),
  only for the parameters `weight_decay_params` matches: kernels by default, so biases, norms,
  the class token and position embeddings are not decayed. Without decay the chain is
  `optax.sgd`'s (or `optax.adam`'s) exactly, the official recipe.
  """
  parts = [_scale_by_optimizer(config)]
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay,
                                           decayed_mask(config.weight_decay_params)))
  parts.append(optax.scale_by_learning_rate(lr))
  if config.decay_type == 'reduce_on_plateau':
    parts.append(scale_by_plateau(config))
  return optax.chain(*parts)


# Words that `config.freeze` may hold instead of a regex.
FREEZE_PRESETS = {
    # Head-only fine-tuning (a linear probe trained by SGD): all but the classifier and its
    # hidden layers.
    'backbone': r'^(?!(head(_hidden_\d+)?|fc)/)',  # ResNet v1's head is `fc`.
}


def frozen_labels(patterns: Sequence[str]) -> Callable[[Any], Any]:
  """Labels each parameter 'frozen' when its '/'-joined path matches one of `patterns`.

  A pattern is a regex or a word of `FREEZE_PRESETS`; one that matches no parameter is a
  typo, and an error.
  """
  compiled = [re.compile(FREEZE_PRESETS.get(p, p)) for p in patterns]

  def label(params):
    names = list(traverse_util.flatten_dict(params, sep='/'))
    for pattern in compiled:
      if not any(pattern.search(n) for n in names):
        raise ValueError(f'config.freeze pattern {pattern.pattern!r} matches no parameter; '
                         f'names look like {names[:3]}.')
    return traverse_util.unflatten_dict(
        {k: 'frozen' if any(p.search(k) for p in compiled) else 'trained' for k in names},
        sep='/')
  return label


def frozen_mask(patterns: Sequence[str], params: Any) -> Any:
  """True for each parameter `patterns` freeze (the tree of `params`)."""
  labels = frozen_labels(tuple(patterns))(params)
  return jax.tree.map(lambda label: label == 'frozen', labels)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clipping at global norm `grad_norm_clip`, the optimiser, layer decay; frozen params get no
  update."""
  parts = []
  if config.grad_norm_clip:
    parts.append(optax.clip_by_global_norm(config.grad_norm_clip))
  parts.append(_base_optimizer(config, learning_rate_schedule(config)))
  if config.layer_decay:
    if not 0.0 < config.layer_decay <= 1.0:
      raise ValueError(f'layer_decay={config.layer_decay} must be in (0, 1] (0: off).')
    parts.append(scale_by_layer_decay(config.layer_decay))
  tx = optax.chain(*parts)
  if config.freeze:
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()},
                               frozen_labels(tuple(config.freeze)))
  return tx
