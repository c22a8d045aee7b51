"""The evaluation step and its sums against sklearn, numpy and hand counts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from vit_jax_ft import metrics, models, parallel


def random_predictions(seed=0, n=200, k=7):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.standard_normal((n, k)).astype(np.float32)
  logits[np.arange(n), labels] += 1.0  # Better than chance, worse than perfect.
  return logits, labels


def summed(logits, labels, mask, batch=64):
  """The sums of `batch_sums` over batches, added as the evaluation loop adds them."""
  parts = [metrics.batch_sums(jnp.asarray(logits[s]), jnp.asarray(labels[s]),
                              jnp.asarray(mask[s]))
           for s in (slice(i, i + batch) for i in range(0, len(labels), batch))]
  return metrics.ClassificationMetrics.from_sums(
      functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts))


def test_batch_sums_match_sklearn_on_the_unmasked_examples():
  logits, labels = random_predictions()
  mask = np.ones(len(labels), np.float32)
  mask[-13:] = 0  # Padding of the last batch.
  labels_padded = labels.copy()
  labels_padded[-13:] = 0
  result = summed(logits, labels_padded, mask)
  real = mask > 0
  y, scores = labels[real], logits[real]
  pred = scores.argmax(-1)
  assert result.num_examples == real.sum()
  assert result.top1 == pytest.approx(skm.accuracy_score(y, pred))
  assert result.top5 == pytest.approx(
      skm.top_k_accuracy_score(y, scores, k=5, labels=np.arange(7)))
  np.testing.assert_array_equal(result.confusion,
                                skm.confusion_matrix(y, pred, labels=np.arange(7)))
  assert result.macro_f1 == pytest.approx(skm.f1_score(y, pred, average='macro'))
  np.testing.assert_allclose(result.per_class_accuracy,
                             skm.recall_score(y, pred, average=None))
  assert result.loss == pytest.approx(skm.log_loss(y, jax.nn.softmax(scores), labels=range(7)),
                                      rel=1e-5)
  summary = result.summary()
  assert summary['top1_error'] == pytest.approx(1 - summary['top1'])


def test_hand_counts_of_the_confusion_matrix():
  labels = np.array([0, 0, 1, 2, 2, 2])
  logits = np.eye(4, dtype=np.float32)[[0, 1, 1, 2, 0, 2]]  # Predictions 0 1 1 2 0 2.
  result = summed(logits, labels, np.ones(6, np.float32))
  confusion = result.confusion
  assert confusion.sum() == 6
  np.testing.assert_array_equal(confusion.sum(axis=1), [2, 1, 3, 0])
  np.testing.assert_array_equal(confusion.sum(axis=0), [2, 2, 2, 0])
  assert confusion[2, 0] == 1 and confusion[0, 1] == 1
  accuracy = result.per_class_accuracy
  np.testing.assert_allclose(accuracy[:3], [1 / 2, 1, 2 / 3])
  assert np.isnan(accuracy[3])  # No examples of class 3.
  # F1: class 0: 2*1/(2+2); class 1: 2*1/(1+2); class 2: 2*2/(3+2); class 3 absent.
  assert result.macro_f1 == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)
  assert result.top1 == pytest.approx(4 / 6) and result.top5 == 1.0  # k capped at 4 classes.


def test_eval_step_sums_only_real_examples_on_the_device_mesh():
  model = models.get_model('testing', 7, hidden_size=16, mlp_dim=32, num_heads=2,
                           num_layers=1, patch_size=(8, 8))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), images[:1])['params']
  params['head']['kernel'] = jnp.asarray(rng.normal(0, 1, params['head']['kernel'].shape),
                                         jnp.float32)
  labels = rng.integers(0, 7, 16).astype(np.int32)
  mask = np.array([1] * 10 + [0] * 6, np.float32)
  batch = {'image': images, 'label': labels, 'mask': mask}
  mesh = parallel.create_mesh()
  eval_fn = jax.jit(functools.partial(metrics.eval_step, model=model))
  result = metrics.evaluate(parallel.replicate(mesh, {'params': params}), eval_fn, mesh, [batch, batch], 2)
  logits = np.asarray(model.apply({'params': params}, images))
  order = np.argsort(-logits, axis=1)
  real = mask > 0
  assert result.num_examples == 20  # Two batches of ten real examples.
  np.testing.assert_array_equal(result.confusion, 2 * skm.confusion_matrix(
      labels[real], order[real, 0], labels=range(7)))
  assert result.correct_top5 == 2 * np.sum(np.any(order[:, :5] == labels[:, None], 1)[real])
  with pytest.raises(ValueError, match='empty'):
    metrics.evaluate({'params': params}, eval_fn, mesh, [], 2)


def test_labels_outside_the_head_are_an_error():
  sums = metrics.batch_sums(jnp.zeros((2, 3)), jnp.array([0, 3]), jnp.ones(2))
  with pytest.raises(ValueError, match=r'1 labels lie outside \[0, 3\).*num_classes'):
    metrics.ClassificationMetrics.from_sums(sums)
