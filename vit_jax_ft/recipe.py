"""The train step's regularisers beyond the plain update: label smoothing, mixup and CutMix
(timm's `Mixup` in its 'batch' mode, on the device), and the EMA decay of the parameters.

Mixing happens on the global batch before it is split into micro-batches, so `accum_steps`
stays a memory knob: a step with accumulation equals the step without, mixing included. Each
image is mixed with the image at the mirrored position of the global batch (`flip`), which XLA
fetches across devices under data parallelism. The randomness comes from the step's key, so a
resumed run mixes every step as the uninterrupted run did.
"""
import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

# `fold_in` data of the mixing key from the step's key; micro-batch dropout keys use
# 0..accum_steps-1, so mixing never shares their randomness.
MIX_STREAM = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class StepRecipe:
  """The config keys the train step reads beyond the optimiser; the defaults change nothing."""

  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mixup_switch_prob: float = 0.5
  ema_decay: float = 0.0

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  @property
  def soft_targets(self) -> bool:
    """Whether the loss takes (batch, classes) targets instead of the integer labels."""
    return self.mixes or self.label_smoothing > 0


# Allowed values of each key of `StepRecipe`, as a test and its description.
_RULES = {
    'label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1) (0: off, timm uses 0.1)'),
    'mixup_alpha': (lambda v: v >= 0, '>= 0 (0: off, timm uses 0.8)'),
    'cutmix_alpha': (lambda v: v >= 0, '>= 0 (0: off, timm uses 1.0)'),
    'mix_prob': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'mixup_switch_prob': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'ema_decay': (lambda v: 0 <= v < 1, 'in [0, 1) (0: off, e.g. 0.9999)'),
}


def from_config(config: ml_collections.ConfigDict) -> StepRecipe:
  """The recipe of `config`; a bad value is an error naming the allowed ones."""
  values = {key: config[key] for key in _RULES}
  for key, value in values.items():
    valid, allowed = _RULES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
      raise ValueError(f'config.{key}={value!r}; allowed: a number {allowed}.')
  return StepRecipe(**{k: float(v) for k, v in values.items()})


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float,
                 weights: Optional[jax.Array]) -> jax.Array:
  """Smoothed one-hot targets (timm's: 1 - s + s/K on the label, s/K elsewhere), times each
  example's loss weight: the cross-entropy is linear in the target, so the weighted sum of
  losses is unchanged, and mixing the weighted targets weights each label by its own example."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32),
                                smoothing)
  return targets if weights is None else targets * weights[:, None]


class Mix(NamedTuple):
  """One batch's mixing: the share `lam` of each image and target kept, and CutMix's box."""

  lam: jax.Array  # float32; 1 when the batch is not mixed.
  cutmix: jax.Array  # bool: a box pasted (else a mixup blend).
  box: jax.Array  # int32 (top, bottom, left, right), rows top..bottom-1; empty for mixup.


def sample(rng: jax.Array, step_recipe: StepRecipe, height: int, width: int) -> Mix:
  """timm's draw per batch: mixed with probability `mix_prob`; CutMix with probability
  `mixup_switch_prob` when both are on; lam ~ Beta(alpha, alpha); a box of area about
  (1 - lam) centred uniformly, clipped to the image, and lam corrected to its exact area."""
  r = step_recipe
  apply_key, switch_key, lam_key, y_key, x_key = jax.random.split(rng, 5)
  if r.mixup_alpha > 0 and r.cutmix_alpha > 0:
    cutmix = jax.random.uniform(switch_key) < r.mixup_switch_prob
  else:
    cutmix = jnp.asarray(r.cutmix_alpha > 0)
  alpha = jnp.where(cutmix, r.cutmix_alpha, r.mixup_alpha)
  lam = jax.random.beta(lam_key, alpha, alpha).astype(jnp.float32)
  lam = jnp.where(jax.random.uniform(apply_key) < r.mix_prob, lam, 1.0)
  side = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * side).astype(jnp.int32)
  cut_w = jnp.floor(width * side).astype(jnp.int32)
  cy = jax.random.randint(y_key, (), 0, height)
  cx = jax.random.randint(x_key, (), 0, width)
  top, left = cy - cut_h // 2, cx - cut_w // 2
  box = jnp.stack([jnp.clip(top, 0, height), jnp.clip(top + cut_h, 0, height),
                   jnp.clip(left, 0, width), jnp.clip(left + cut_w, 0, width)])
  box = jnp.where(cutmix, box, 0)
  area = (box[1] - box[0]) * (box[3] - box[2])
  lam = jnp.where(cutmix, 1.0 - area / (height * width), lam).astype(jnp.float32)
  return Mix(lam, cutmix, box)


def apply(mix: Mix, images: jax.Array, targets: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Mixes each image and target with those of the flipped batch as `mix` says."""
  height, width = images.shape[1:3]
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = ((rows >= mix.box[0]) & (rows < mix.box[1]) & (cols >= mix.box[2])
            & (cols < mix.box[3]))
  # Per pixel, the share of the image kept: lam everywhere (mixup), or 0 in the box (CutMix).
  keep = jnp.where(mix.cutmix, (~inside).astype(jnp.float32), mix.lam)[None, :, :, None]
  keep = keep.astype(images.dtype)
  images = keep * images + (1 - keep) * jnp.flip(images, axis=0)
  targets = mix.lam * targets + (1 - mix.lam) * jnp.flip(targets, axis=0)
  return images, targets


def mix_batch(rng: jax.Array, step_recipe: StepRecipe, images: jax.Array,
              targets: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """`apply` of a `sample` drawn from `rng`."""
  return apply(sample(rng, step_recipe, *images.shape[1:3]), images, targets)


def ema_update(ema_params, params, decay: float):
  """One step of the parameters' exponential moving average: decay * ema + (1 - decay) * p."""
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
