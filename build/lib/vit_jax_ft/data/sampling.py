"""Which training examples each epoch visits, and in which order: fractions, images per class, rebalancing.

All choices come from `numpy` generators keyed by (purpose, seed, epoch), so the
example at any position of the training stream can be computed without reading
the ones before it.
"""
import dataclasses
import functools
from typing import Optional

from absl import logging
import numpy as np

BALANCE_MODES = ('', 'resample', 'loss_weights')
_SUBSET, _RESAMPLE, _SHUFFLE = 1, 2, 3  # Purposes: independent random streams.


def _rng(purpose: int, seed: int, epoch: int = 0) -> np.random.Generator:
  return np.random.default_rng([purpose, seed % 2**32, epoch])


def select(labels: np.ndarray, num_classes: int, fraction: float = 1.0,
           per_class: int = 0, seed: int = 0) -> np.ndarray:
  """Indices kept for training: `fraction` of each class, then at most `per_class` of each."""
  if not 0 < fraction <= 1:
    raise ValueError(f'config.train_fraction={fraction} must be in (0, 1].')
  if per_class < 0:
    raise ValueError(f'config.train_per_class={per_class} must be >= 0 (0: all).')
  rng = _rng(_SUBSET, seed)
  kept = []
  for c in range(num_classes):
    members = rng.permutation(np.flatnonzero(labels == c))
    n = int(round(fraction * len(members)))
    if per_class:
      if n < per_class:
        logging.warning('Class %d has %d training images, fewer than train_per_class=%d.',
                        c, n, per_class)
      n = min(n, per_class)
    kept.append(members[:n])
  return np.sort(np.concatenate(kept)).astype(np.int64)


def loss_weights(counts: np.ndarray) -> np.ndarray:
  """Per-class weights `N / (K * n_c)`: every class weighs the same, the mean weight is 1."""
  present = counts > 0
  weights = np.zeros(len(counts), np.float32)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return weights


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable for the epoch cache.
class TrainOrder:
  """The infinite training stream: epoch after epoch of a seeded permutation of the kept examples."""
  kept: np.ndarray  # Indices into the split.
  labels: np.ndarray  # Labels of the whole split.
  num_classes: int
  seed: int = 0
  balance: str = ''
  balance_target: int = 0

  def __post_init__(self):
    if self.balance not in BALANCE_MODES:
      raise ValueError(f'config.balance={self.balance!r}; allowed: {BALANCE_MODES}.')
    if not len(self.kept):
      raise ValueError('No training examples left; check the split, train_fraction and '
                       'train_per_class.')

  @functools.cached_property
  def kept_counts(self) -> np.ndarray:
    """Images per class before rebalancing."""
    return np.bincount(self.labels[self.kept], minlength=self.num_classes)

  @functools.cached_property
  def target(self) -> int:
    """Images per present class after resampling."""
    counts = self.kept_counts[self.kept_counts > 0]
    return self.balance_target or max(1, int(round(counts.mean())))

  @property
  def class_counts(self) -> np.ndarray:
    """Images per class in every epoch."""
    if self.balance == 'resample':
      return np.where(self.kept_counts > 0, self.target, 0)
    return self.kept_counts

  @property
  def epoch_size(self) -> int:
    return int(self.class_counts.sum())

  @functools.lru_cache(maxsize=2)
  def epoch(self, epoch: int) -> np.ndarray:
    """Split indices of `epoch` in visiting order."""
    members = self.kept
    if self.balance == 'resample':
      members = self._resampled(epoch)
    return _rng(_SHUFFLE, self.seed, epoch).permutation(members)

  def _resampled(self, epoch: int) -> np.ndarray:
    """Every present class at `target` images: whole copies plus a random remainder."""
    rng = _rng(_RESAMPLE, self.seed, epoch)
    kept_labels = self.labels[self.kept]
    parts = []
    for c in np.flatnonzero(self.kept_counts):
      members = self.kept[kept_labels == c]
      copies, rest = divmod(self.target, len(members))
      parts += [members] * copies + [rng.choice(members, rest, replace=False)]
    return np.concatenate(parts)

  def indices(self, positions: np.ndarray) -> np.ndarray:
    """Split indices at stream `positions`."""
    epochs, offsets = np.divmod(positions, self.epoch_size)
    out = np.empty(len(positions), np.int64)
    for e in np.unique(epochs):
      at = epochs == e
      out[at] = self.epoch(int(e))[offsets[at]]
    return out

  def weights(self, indices: np.ndarray) -> Optional[np.ndarray]:
    """Per-example loss weights (`balance='loss_weights'`), else None."""
    if self.balance != 'loss_weights':
      return None
    return loss_weights(self.kept_counts)[self.labels[indices]]
