"""Fractions, images per class, rebalancing and the epoch order, checked by counting."""
import numpy as np
import pytest

from vit_jax_ft.data import sampling

LABELS = np.repeat(np.arange(4), [3, 10, 21, 40])  # Unbalanced classes.


def test_fraction_keeps_that_share_of_every_class_reproducibly():
  kept = sampling.select(LABELS, 4, fraction=0.25, seed=1)
  sizes = np.bincount(LABELS, minlength=4)
  np.testing.assert_array_equal(np.bincount(LABELS[kept], minlength=4),
                                np.round(0.25 * sizes).astype(int))
  np.testing.assert_array_equal(kept, sampling.select(LABELS, 4, fraction=0.25, seed=1))
  assert not np.array_equal(kept, sampling.select(LABELS, 4, fraction=0.25, seed=2))
  assert len(set(kept)) == len(kept)


def test_per_class_caps_each_class():
  kept = sampling.select(LABELS, 4, per_class=5, seed=0)
  np.testing.assert_array_equal(np.bincount(LABELS[kept]), [3, 5, 5, 5])


def test_epochs_are_seeded_permutations_of_the_kept_examples():
  kept = sampling.select(LABELS, 4, fraction=0.5)
  order = sampling.TrainOrder(kept, LABELS, 4, seed=3)
  assert order.epoch_size == len(kept)
  e0, e1 = order.epoch(0), order.epoch(1)
  np.testing.assert_array_equal(np.sort(e0), kept)
  np.testing.assert_array_equal(np.sort(e1), kept)
  assert not np.array_equal(e0, e1)
  positions = np.arange(len(kept) - 3, len(kept) + 3)  # Across the epoch boundary.
  np.testing.assert_array_equal(order.indices(positions), np.concatenate([e0[-3:], e1[:3]]))


@pytest.mark.parametrize('target', [0, 12])
def test_resample_gives_every_class_the_target(target):
  order = sampling.TrainOrder(np.arange(len(LABELS)), LABELS, 4, seed=0,
                              balance='resample', balance_target=target)
  want = target or round(len(LABELS) / 4)
  for epoch in range(2):
    chosen = order.epoch(epoch)
    np.testing.assert_array_equal(np.bincount(LABELS[chosen], minlength=4), [want] * 4)
    assert set(np.flatnonzero(LABELS == 0)) <= set(chosen)  # Small class: all of it, repeated.
  assert order.class_counts.tolist() == [want] * 4
  assert not np.array_equal(np.sort(order.epoch(0)), np.sort(order.epoch(1)))


def test_loss_weights_equalise_classes_with_mean_one():
  order = sampling.TrainOrder(np.arange(len(LABELS)), LABELS, 4, balance='loss_weights')
  weights = order.weights(np.arange(len(LABELS)))
  per_class = np.bincount(LABELS, weights=weights)
  np.testing.assert_allclose(per_class, len(LABELS) / 4)
  assert weights.mean() == pytest.approx(1.0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(fraction=0.0), 'train_fraction'),
    (dict(fraction=1.5), 'train_fraction'),
    (dict(per_class=-1), 'train_per_class'),
])
def test_bad_subset_options(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.select(LABELS, 4, **kwargs)


def test_bad_balance_mode():
  with pytest.raises(ValueError, match='config.balance'):
    sampling.TrainOrder(np.arange(3), LABELS, 4, balance='oversample')
