"""The PNG figures, drawn headless on matplotlib's Agg canvas (no pyplot, no display).

Every function takes arrays computed elsewhere (attention, embeddings,
gradcam, curves, metrics) and writes one PNG; none needs a display.
"""
import io
import math
import os
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorflow.io import gfile

# tag -> (steps, values), as `curves.read_scalars` returns them.
Series = Mapping[str, Tuple[np.ndarray, np.ndarray]]


def _save(figure: Figure, path: str) -> str:
  """Writes `figure` as a PNG to `path` (local or gs://, folders created); returns the path."""
  FigureCanvasAgg(figure)
  buffer = io.BytesIO()  # matplotlib writes local files only; gfile takes the bytes anywhere.
  figure.savefig(buffer, format='png', dpi=figure.dpi, bbox_inches='tight')
  gfile.makedirs(os.path.dirname(path) or '.')
  with gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())
  return path


def _as_rgb(image: np.ndarray) -> np.ndarray:
  """An RGB image in [0, 1] (`Inputs.display_images`: model inputs un-normalised), clipped."""
  return np.clip(np.asarray(image, np.float32), 0, 1)


def _overlay(ax, image: np.ndarray, heat: Optional[np.ndarray], title: str = '') -> None:
  """Draws `image` with `heat` (any grid, stretched to the image) on top."""
  height, width = image.shape[:2]
  ax.imshow(_as_rgb(image))
  if heat is not None:
    ax.imshow(heat, cmap='jet', alpha=0.5, extent=(0, width, height, 0),
              interpolation='bilinear')
  ax.set_title(title, fontsize=7)
  ax.axis('off')


def attention_maps(image: np.ndarray, maps: np.ndarray, path: str) -> str:
  """Class-token attention of one image: a row per layer, a column per head."""
  layers, heads = maps.shape[:2]
  figure = Figure(figsize=(1.4 * heads + 0.5, 1.4 * layers), dpi=100)
  axes = figure.subplots(layers, heads, squeeze=False)
  for layer in range(layers):
    for head in range(heads):
      _overlay(axes[layer, head], image, maps[layer, head],
               f'layer {layer} head {head}')
  return _save(figure, path)


def heat_overlays(images: np.ndarray, maps: np.ndarray, path: str,
                  titles: Optional[Sequence[str]] = None, name: str = 'map') -> str:
  """Each image, its map, and the two overlaid (attention rollout, Grad-CAM)."""
  figure = Figure(figsize=(7.5, 2.6 * len(images)), dpi=100)
  axes = figure.subplots(len(images), 3, squeeze=False)
  for row, (image, heat) in enumerate(zip(images, maps)):
    _overlay(axes[row, 0], image, None, titles[row] if titles else '')
    axes[row, 1].imshow(heat, cmap='jet', vmin=0, vmax=1)
    axes[row, 1].set_title(name, fontsize=7)
    axes[row, 1].axis('off')
    _overlay(axes[row, 2], image, heat, 'overlay')
  return _save(figure, path)


def position_similarity(similarity: np.ndarray, path: str) -> str:
  """The paper's grid of grids: tile (i, j) is patch (i, j)'s similarity map."""
  rows, cols = similarity.shape[:2]
  gap = 1
  mosaic = np.full((rows * (rows + gap), cols * (cols + gap)), np.nan)
  for i in range(rows):
    for j in range(cols):
      top, left = i * (rows + gap), j * (cols + gap)
      mosaic[top:top + rows, left:left + cols] = similarity[i, j]
  figure = Figure(figsize=(7, 6.2), dpi=120)
  ax = figure.subplots()
  shown = ax.imshow(mosaic, cmap='viridis', vmin=-1, vmax=1, interpolation='nearest')
  ax.set_xticks([(j + 0.5) * (cols + gap) - 1 for j in range(cols)], range(1, cols + 1),
                fontsize=6)
  ax.set_yticks([(i + 0.5) * (rows + gap) - 1 for i in range(rows)], range(1, rows + 1),
                fontsize=6)
  ax.set_xlabel('Input patch column')
  ax.set_ylabel('Input patch row')
  ax.set_title('Position embedding similarity')
  figure.colorbar(shown, ax=ax, label='Cosine similarity', shrink=0.8)
  return _save(figure, path)


def filter_components(components: np.ndarray, path: str) -> str:
  """Principal components of the RGB patch filters, each stretched to [0, 1]."""
  count = len(components)
  cols = min(7, count)
  rows = math.ceil(count / cols)
  figure = Figure(figsize=(1.2 * cols, 1.2 * rows + 0.4), dpi=100)
  axes = figure.subplots(rows, cols, squeeze=False)
  for index, ax in enumerate(axes.ravel()):
    ax.axis('off')
    if index < count:
      c = components[index]
      ax.imshow((c - c.min()) / max(float(np.ptp(c)), 1e-12), interpolation='nearest')
  figure.suptitle('RGB embedding filters (principal components)')
  return _save(figure, path)


def attention_distance(distances: np.ndarray, path: str,
                       image_size: Optional[int] = None) -> str:
  """Mean attention distance of every head (dots) against network depth."""
  layers, heads = distances.shape
  figure = Figure(figsize=(5, 4), dpi=120)
  ax = figure.subplots()
  for head in range(heads):
    ax.scatter(np.arange(layers), distances[:, head], s=12, label=f'head {head}')
  ax.set_xticks(np.arange(layers))
  ax.set_xlabel('Network depth (layer)')
  ax.set_ylabel('Mean attention distance (pixels)')
  if image_size:
    ax.set_ylim(0, image_size * 0.75)
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2)
  return _save(figure, path)


def curves(series: Series, path: str) -> str:
  """One panel per scalar tag against the training step."""
  if not series:
    raise ValueError('No scalar series to plot; check the tag pattern.')
  cols = min(3, len(series))
  rows = math.ceil(len(series) / cols)
  figure = Figure(figsize=(4.2 * cols, 3 * rows), dpi=100)
  axes = figure.subplots(rows, cols, squeeze=False)
  for ax, (tag, (steps, values)) in zip(axes.ravel(), series.items()):
    ax.plot(steps, values, marker='.' if len(steps) < 30 else None)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[len(series):]:
    ax.axis('off')
  figure.tight_layout()
  return _save(figure, path)


def confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: str) -> str:
  """Row-normalised heatmap; counts written in the cells up to 30 classes,
  every class named up to 200, and a tick every tenth class beyond."""
  n = len(confusion)
  with np.errstate(invalid='ignore', divide='ignore'):
    rates = confusion / confusion.sum(axis=1, keepdims=True)
  side = float(np.clip(0.45 * n, 5, 30))
  figure = Figure(figsize=(side + 1.5, side), dpi=100)
  ax = figure.subplots()
  shown = ax.imshow(np.nan_to_num(rates), cmap='Blues', vmin=0, vmax=1,
                    interpolation='nearest')
  step = 1 if n <= 200 else 10
  ticks = np.arange(0, n, step)
  font = float(np.clip(0.6 * step * side * 72 / n, 3, 9))  # Fits the tick spacing.
  labels = [class_names[i] for i in ticks]
  ax.set_xticks(ticks, labels, rotation=90, fontsize=font)
  ax.set_yticks(ticks, labels, fontsize=font)
  if n <= 30:
    for (i, j), count in np.ndenumerate(confusion):
      if count:
        ax.text(j, i, str(count), ha='center', va='center', fontsize=font,
                color='white' if rates[i, j] > 0.5 else 'black')
  ax.set_xlabel('Predicted class')
  ax.set_ylabel('True class')
  figure.colorbar(shown, ax=ax, label='Fraction of the true class', shrink=0.6)
  return _save(figure, path)

