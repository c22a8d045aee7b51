"""Linear classifier on frozen features: the paper's few-shot evaluation.

As in the ViT paper (section 4.1, "few-shot accuracies") and big_vision's
few-shot evaluator: features are standardised with the training set's mean and
std, a constant column of `BIAS_CONSTANT` = 100 is appended (large, so the bias is almost
unregularised, as big_vision's `fewshot_lsr.py`), and a closed-form ridge regression maps them to
{-1, 1}^K targets. The predicted class is the largest regression output.
"""
import dataclasses
from typing import Any, Dict, Iterable, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from vit_jax_ft import parallel

# The paper's few-shot settings: images per class.
PAPER_SHOTS = (1, 5, 10, 25)
# big_vision's default L2 regularisation of the few-shot ridge regression.
DEFAULT_L2_REG = 2.0**10
# big_vision's bias feature: a constant this large is barely touched by the L2 penalty.
BIAS_CONSTANT = 100.0


@dataclasses.dataclass
class RidgeClassifier:
  """Standardisation statistics and the weights of the regression (bias last)."""

  mean: np.ndarray
  std: np.ndarray
  weights: np.ndarray  # (features + 1, classes)

  def scores(self, features: np.ndarray) -> np.ndarray:
    """Regression outputs, (n, classes); argmax is the prediction."""
    return _with_bias((features - self.mean) / self.std) @ self.weights


def _with_bias(x: np.ndarray) -> np.ndarray:
  """Appends the constant bias feature."""
  return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT, x.dtype)], axis=1)


def fit_ridge(features: np.ndarray, labels: np.ndarray, num_classes: int,
              l2_reg: float = DEFAULT_L2_REG) -> RidgeClassifier:
  """Closed-form ridge regression of standardised features onto {-1, 1} one-hot targets."""
  features = np.asarray(features, np.float64)
  mean = features.mean(axis=0)
  std = features.std(axis=0) + 1e-5
  x = _with_bias((features - mean) / std)
  targets = 2.0 * np.eye(num_classes)[labels] - 1.0
  weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ targets)
  return RidgeClassifier(mean, std, weights)


def few_shot_indices(labels: np.ndarray, shots: int, num_classes: int,
                     seed: int = 0) -> np.ndarray:
  """`shots` examples of every class, drawn without replacement by `seed` (0: all)."""
  if shots == 0:
    return np.arange(len(labels))
  rng = np.random.default_rng(seed)
  chosen = []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) < shots:
      raise ValueError(f'Class {label} has {len(members)} training examples, fewer than '
                       f'{shots} shots; use fewer shots or a larger training split.')
    chosen.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(chosen))


def few_shot_accuracy(train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray],
                      num_classes: int, shots: Sequence[int] = PAPER_SHOTS,
                      l2_reg: float = DEFAULT_L2_REG, seed: int = 0) -> Dict[int, float]:
  """Test accuracy of a probe fitted on `shots` images per class, for each entry (0: all)."""
  (train_x, train_y), (test_x, test_y) = train, test
  results = {}
  for n in shots:
    index = few_shot_indices(train_y, n, num_classes, seed)
    probe = fit_ridge(train_x[index], train_y[index], num_classes, l2_reg)
    results[n] = float(np.mean(probe.scores(test_x).argmax(-1) == test_y))
  return results


def extract_features(model: nn.Module, variables: Any,
                     batches: Iterable[Dict[str, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
  """Pre-logits features and labels of the real (mask 1) examples of padded batches.

  `model` must be built with `num_classes=0`, so that it returns its features; `variables`
  as `run_dir.Loaded.variables` (BatchNorm models normalise with their stored statistics).
  """
  if model.num_classes:
    raise ValueError('extract_features needs the model without its head: build it '
                     'with num_classes=0.')
  apply_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  mesh = parallel.create_mesh()
  variables = parallel.replicate(mesh, variables)
  with_mask = (dict(b, mask=b.get('mask', np.ones(len(b['label']), np.float32)))
               for b in batches)
  features, labels = [], []
  for batch in parallel.prefetch_to_mesh(mesh, with_mask, size=2):
    # Every host gets the features of all hosts' parts of the batch.
    x, y, keep = (multihost_utils.process_allgather(v, tiled=True) for v in
                  (apply_fn(variables, batch['image']), batch['label'], batch['mask']))
    features.append(x[keep.astype(bool)])
    labels.append(y[keep.astype(bool)])
  if not features:
    raise ValueError('No batches to extract features from; is the split empty?')
  return np.concatenate(features), np.concatenate(labels)
