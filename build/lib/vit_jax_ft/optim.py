"""The paper's optimisation recipe as an optax chain: schedule, clipping, SGD momentum, freezing."""
import re
from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax
from flax import traverse_util

# End value of the official linear decay (`vit_jax/utils.py`).
LINEAR_END = 1e-5


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to `base_lr`, then cosine, linear or constant decay (official formula)."""
  total, warmup, base = config.total_steps, config.warmup_steps, config.base_lr
  if not 0 <= warmup < total:
    raise ValueError(f'warmup_steps={warmup} must be in [0, total_steps={total}).')
  decays = {
      'cosine': lambda: optax.cosine_decay_schedule(base, total - warmup),
      'linear': lambda: optax.linear_schedule(base, LINEAR_END, total - warmup),
      'constant': lambda: optax.constant_schedule(base),
  }
  if config.decay_type not in decays:
    raise ValueError(f'decay_type={config.decay_type!r}; allowed: {sorted(decays)}.')
  decay = decays[config.decay_type]()
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])


def _base_optimizer(config: ml_collections.ConfigDict,
                    lr: optax.Schedule) -> optax.GradientTransformation:
  """The optimiser named by `config.optimizer`."""
  optimizers = {
      'sgd': lambda: optax.sgd(lr, momentum=config.momentum,
                               accumulator_dtype=config.optim_dtype),
      'adam': lambda: optax.adam(lr, mu_dtype=config.optim_dtype),
      'adamw': lambda: optax.adamw(lr, mu_dtype=config.optim_dtype,
                                   weight_decay=config.weight_decay),
  }
  if config.optimizer not in optimizers:
    raise ValueError(f'optimizer={config.optimizer!r}; allowed: {sorted(optimizers)}.')
  if config.weight_decay and config.optimizer != 'adamw':
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optimizers[config.optimizer]())
  return optimizers[config.optimizer]()


def frozen_labels(patterns: Sequence[str]) -> Callable[[Any], Any]:
  """Labels each parameter 'frozen' when its '/'-joined path matches one of `patterns`.

  A pattern that matches no parameter is a typo, and an error.
  """
  compiled = [re.compile(p) for p in patterns]

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
  """Clipping at global norm `grad_norm_clip`, then the optimiser; frozen params get no update."""
  parts = []
  if config.grad_norm_clip:
    parts.append(optax.clip_by_global_norm(config.grad_norm_clip))
  parts.append(_base_optimizer(config, learning_rate_schedule(config)))
  tx = optax.chain(*parts)
  if config.freeze:
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()},
                               frozen_labels(tuple(config.freeze)))
  return tx
