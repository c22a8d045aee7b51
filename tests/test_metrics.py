"""Metrics against sklearn and hand counts on known predictions."""
import numpy as np
import pytest
from sklearn import metrics as skm

from vit_jax_ft import metrics


def random_predictions(seed=0, n=200, k=7):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.standard_normal((n, k))
  logits[np.arange(n), labels] += 1.0  # Better than chance, worse than perfect.
  return logits, labels


def test_accumulated_batches_match_sklearn_on_the_unmasked_examples():
  logits, labels = random_predictions()
  mask = np.ones(len(labels), bool)
  mask[-13:] = False  # Padding of the last batch.
  labels_padded = labels.copy()
  labels_padded[-13:] = 0
  acc = metrics.MetricsAccumulator(7, top_k=(1, 5))
  for start in range(0, len(labels), 64):
    s = slice(start, start + 64)
    acc.update(logits[s], labels_padded[s], mask[s])
  result = acc.result()
  y, scores = labels[mask], logits[mask]
  pred = scores.argmax(-1)
  assert result.num_examples == mask.sum()
  assert result.top1 == pytest.approx(skm.accuracy_score(y, pred))
  assert result.top_k_accuracy(5) == pytest.approx(
      skm.top_k_accuracy_score(y, scores, k=5, labels=np.arange(7)))
  np.testing.assert_array_equal(result.confusion,
                                skm.confusion_matrix(y, pred, labels=np.arange(7)))
  assert result.macro_f1 == pytest.approx(skm.f1_score(y, pred, average='macro'))
  np.testing.assert_allclose(result.per_class_accuracy,
                             skm.recall_score(y, pred, average=None))
  summary = result.summary()
  assert summary['top1_error'] == pytest.approx(1 - summary['top1'])


def test_confusion_matrix_sums_and_hand_counts():
  labels = np.array([0, 0, 1, 2, 2, 2])
  predictions = np.array([0, 1, 1, 2, 0, 2])
  confusion = metrics.confusion_matrix(labels, predictions, 4)
  assert confusion.sum() == 6
  np.testing.assert_array_equal(confusion.sum(axis=1), [2, 1, 3, 0])
  np.testing.assert_array_equal(confusion.sum(axis=0), [2, 2, 2, 0])
  assert confusion[2, 0] == 1 and confusion[0, 1] == 1
  accuracy = metrics.per_class_accuracy(confusion)
  np.testing.assert_allclose(accuracy[:3], [1 / 2, 1, 2 / 3])
  assert np.isnan(accuracy[3])  # No examples of class 3.
  # F1: class 0: 2*1/(2+2); class 1: 2*1/(1+2); class 2: 2*2/(3+2); class 3 absent.
  assert metrics.macro_f1(confusion) == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)


def test_top_k_caps_k_at_the_number_of_classes():
  logits, labels = random_predictions(k=3, n=20)
  assert metrics.top_k_hits(logits, labels, 5).all()


def test_labels_outside_the_head_are_an_error():
  with pytest.raises(ValueError, match='num_classes'):
    metrics.MetricsAccumulator(3).update(np.zeros((2, 3)), np.array([0, 3]))
  with pytest.raises(ValueError, match='head match the dataset'):
    metrics.MetricsAccumulator(3).update(np.zeros((2,)), np.array([0, 1]))
