"""Classification metrics: the one evaluation step, its sums over a split, and the rates.

The training loop and `python -m vit_jax_ft.evaluate` share `eval_step` and `evaluate`:
each batch adds, on the devices, the confusion matrix, the top-5 hits and the loss of its
real (unmasked) examples, so padding is never counted and memory does not grow with the
split. Top-1, per-class accuracy and F1 are all read from the confusion matrix, which
holds classes**2 int32 counts per device (4 MB for 1000 classes).
"""
import dataclasses
import time
from typing import Any, Callable, Dict, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax_ft import parallel

Sums = Dict[str, jax.Array]

# The k of the top-k accuracy besides top-1 (capped at the number of classes).
TOP_K = 5


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> Sums:
  """Sums over the examples with mask 1: count, loss, top-k hits, confusion counts."""
  num_classes = logits.shape[-1]
  real = mask.astype(jnp.int32)
  top = jax.lax.top_k(logits, min(TOP_K, num_classes))[1]
  hits = jnp.any(top == labels[:, None], axis=1)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  # True classes on rows, predicted (top-1) on columns; labels outside the head are dropped,
  # which `ClassificationMetrics.from_sums` reports.
  confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, top[:, 0]].add(
      real, mode='drop', wrap_negative_indices=False)
  return {'count': jnp.sum(real), 'loss_sum': jnp.sum(mask * losses),
          'correct_top5': jnp.sum(real * hits), 'confusion': confusion}


def eval_step(variables: Any, batch: Dict[str, jax.Array], *, model: nn.Module) -> Sums:
  """`batch_sums` of the model's logits on a padded batch; `variables` are the Flax
  collections (`{'params': ...}`, plus `'batch_stats'` for BatchNorm models)."""
  logits = model.apply(variables, batch['image'], train=False)
  return batch_sums(logits, batch['label'], batch['mask'])


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """Recall of each true class; NaN for classes without examples."""
  support = confusion.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.diag(confusion) / support


def f1_scores(confusion: np.ndarray) -> np.ndarray:
  """F1 of each class; NaN for classes neither present nor predicted."""
  true_positives = np.diag(confusion).astype(np.float64)
  denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return 2 * true_positives / denominator


def macro_f1(confusion: np.ndarray) -> float:
  """Mean F1 over the classes that occur as labels or predictions (as sklearn does)."""
  return float(np.nanmean(f1_scores(confusion))) if confusion.sum() else float('nan')


@dataclasses.dataclass
class ClassificationMetrics:
  """The sums of one evaluation and the rates derived from them."""

  confusion: np.ndarray  # (classes, classes): true on rows, predicted on columns.
  correct_top5: int
  loss_sum: float

  @classmethod
  def from_sums(cls, sums: Sums) -> 'ClassificationMetrics':
    """From the (device) sums of `batch_sums`; errors when a label fell outside the head."""
    sums = jax.device_get(sums)
    confusion = np.asarray(sums['confusion'], np.int64)
    if confusion.sum() != sums['count']:
      raise ValueError(
          f'{int(sums["count"]) - confusion.sum()} labels lie outside [0, {len(confusion)}), '
          'the classes of the model head. Is num_classes right for this dataset?')
    return cls(confusion, int(sums['correct_top5']), float(sums['loss_sum']))

  @property
  def num_examples(self) -> int:
    return int(self.confusion.sum())

  @property
  def top1(self) -> float:
    return float(np.trace(self.confusion)) / max(self.num_examples, 1)

  @property
  def top5(self) -> float:
    return self.correct_top5 / max(self.num_examples, 1)

  @property
  def loss(self) -> float:
    return self.loss_sum / max(self.num_examples, 1)

  @property
  def per_class_accuracy(self) -> np.ndarray:
    return per_class_accuracy(self.confusion)

  @property
  def macro_f1(self) -> float:
    return macro_f1(self.confusion)

  def summary(self) -> Dict[str, float]:
    """Scalar metrics, as written to TensorBoard and the results JSON."""
    return {'num_examples': self.num_examples, 'top1': self.top1,
            'top1_error': 1.0 - self.top1, 'macro_f1': self.macro_f1, 'top5': self.top5,
            'loss': self.loss}


@dataclasses.dataclass
class Timing:
  """Time of the evaluation step on one global batch after compilation and a warm-up run."""

  batch_size: int
  seconds_per_batch: float  # Median over `repeats` runs.
  repeats: int

  @property
  def seconds_per_image(self) -> float:
    return self.seconds_per_batch / self.batch_size


def time_inference(step_fn, variables: Any, batch: Dict[str, jax.Array],
                   repeats: int) -> Timing:
  """Median wall time of `step_fn` on `batch`, excluding compilation and warm-up."""
  jax.block_until_ready(step_fn(variables, batch))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step_fn(variables, batch))
    seconds.append(time.perf_counter() - start)
  return Timing(len(batch['image']), float(np.median(seconds)), repeats)


def time_per_image(eval_fn: Callable[[Any, Dict[str, jax.Array]], Sums], variables: Any,
                   mesh: jax.sharding.Mesh, batch_size: int, image_size: int,
                   repeats: int = 5) -> float:
  """Seconds per image of `eval_fn` on a global batch of `batch_size` blank images (the
  step's time does not depend on the pixels), after compilation and a warm-up run."""
  local = batch_size // jax.process_count()
  batch = {'image': np.zeros((local, image_size, image_size, 3), np.float32),
           'label': np.zeros((local,), np.int32), 'mask': np.ones((local,), np.float32)}
  timing = time_inference(eval_fn, variables, parallel.to_global(mesh, batch), repeats)
  return timing.seconds_per_image


def evaluate_each(named_variables: Dict[str, Any],
                  eval_fn: Callable[[Any, Dict[str, jax.Array]], Sums],
                  mesh: jax.sharding.Mesh, batches: Iterable[Dict[str, np.ndarray]],
                  prefetch: int) -> Dict[str, ClassificationMetrics]:
  """Metrics of each variable set (the raw parameters and their moving average) over every
  example of a split, each counted once, reading the split once; sums stay on the devices."""
  totals = None
  for batch in parallel.prefetch_to_mesh(mesh, batches, prefetch):
    sums = {name: eval_fn(variables, batch) for name, variables in named_variables.items()}
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('The evaluation split is empty.')
  return {name: ClassificationMetrics.from_sums(s) for name, s in totals.items()}


def evaluate(variables: Any, eval_fn: Callable[[Any, Dict[str, jax.Array]], Sums],
             mesh: jax.sharding.Mesh, batches: Iterable[Dict[str, np.ndarray]],
             prefetch: int) -> ClassificationMetrics:
  """`evaluate_each` of one variable set (`{'params': ...}`, plus `batch_stats` if any)."""
  return evaluate_each({'': variables}, eval_fn, mesh, batches, prefetch)['']
