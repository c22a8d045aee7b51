"""Classification metrics from logits, labels and padding masks (pure numpy).

Evaluation streams batches through `MetricsAccumulator`: it keeps a confusion
matrix and top-k hit counts, so memory does not grow with the test split.
Padded examples (mask 0) are never counted.
"""
import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np


def top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Whether each label is among the `k` highest logits (k is capped at the class count)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  k = min(k, logits.shape[-1])
  top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
  return np.any(top == labels[:, None], axis=-1)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                     mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Counts with true classes on rows and predicted classes on columns."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if mask is not None:
    keep = np.asarray(mask).astype(bool)
    labels, predictions = labels[keep], predictions[keep]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'Labels must lie in [0, {num_classes}); got {labels.min()}..'
                     f'{labels.max()}. Is num_classes right for this dataset?')
  counts = np.bincount(labels * num_classes + predictions, minlength=num_classes**2)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


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
  """Counts of one evaluation and the rates derived from them."""

  confusion: np.ndarray
  top_k_counts: Dict[int, int]

  @property
  def num_examples(self) -> int:
    return int(self.confusion.sum())

  def top_k_accuracy(self, k: int) -> float:
    return self.top_k_counts[k] / max(self.num_examples, 1)

  @property
  def top1(self) -> float:
    return float(np.trace(self.confusion)) / max(self.num_examples, 1)

  @property
  def per_class_accuracy(self) -> np.ndarray:
    return per_class_accuracy(self.confusion)

  @property
  def macro_f1(self) -> float:
    return macro_f1(self.confusion)

  def summary(self) -> Dict[str, float]:
    """Scalar metrics, as written to TensorBoard and the results JSON."""
    out = {'num_examples': self.num_examples, 'top1': self.top1,
           'top1_error': 1.0 - self.top1, 'macro_f1': self.macro_f1}
    out.update({f'top{k}': self.top_k_accuracy(k) for k in sorted(self.top_k_counts)
                if k != 1})
    return out


class MetricsAccumulator:
  """Accumulates a confusion matrix and top-k hits over padded, masked batches."""

  def __init__(self, num_classes: int, top_k: Sequence[int] = (1, 5)):
    self.num_classes = num_classes
    self.confusion = np.zeros((num_classes, num_classes), np.int64)
    self.top_k_counts = {k: 0 for k in top_k}

  def update(self, logits: np.ndarray, labels: np.ndarray,
             mask: Optional[np.ndarray] = None) -> None:
    """Adds one batch; examples with mask 0 (padding) are ignored."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
      raise ValueError(f'Expected logits of shape (batch, {self.num_classes}); got '
                       f'{logits.shape}. Does the model head match the dataset?')
    keep = (np.ones(len(labels), bool) if mask is None
            else np.asarray(mask).astype(bool))
    logits, labels = logits[keep], labels[keep]
    self.confusion += confusion_matrix(labels, logits.argmax(-1), self.num_classes)
    for k in self.top_k_counts:
      self.top_k_counts[k] += int(top_k_hits(logits, labels, k).sum())

  def result(self) -> ClassificationMetrics:
    return ClassificationMetrics(self.confusion.copy(), dict(self.top_k_counts))
