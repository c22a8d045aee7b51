r"""Figures of what a model attends to and learns, as PNG files.

  python -m vit_jax_ft.explain --workdir=/tmp/run1 cat.jpg dog.jpg
  python -m vit_jax_ft.explain --checkpoint=checkpoints/imagenet21k/ViT-B_16.npz \
      --model_name=ViT-B_16 --image_size=224 --figures=posembed,filters,distance \
      --output_dir=/tmp/figures photo.jpg

Figures (`--figures`, default `all`: every one that the inputs allow):
  attention  class-token attention per layer and head, one PNG per image
  rollout    attention rollout through all layers (Abnar & Zuidema 2020)
  gradcam    Grad-CAM of the predicted (or --class_index) class; every family (the ViT's
             last block input, the last stage of the CNNs and hierarchical transformers,
             Mixer's last block)
  posembed   cosine similarity of the position embeddings (grid of grids)
  filters    principal components of the RGB patch-embedding filters
  distance   mean attention distance per head against depth, over the images
  curves     training curves (loss, accuracy, learning rate) of --workdir
Attention, rollout, posembed, filters and distance exist only in ViTs; for the other
families the command says so and names the figures that apply.
"""
import dataclasses
import functools
import os
from typing import Callable, Dict, List, Optional

import numpy as np
from absl import app, flags, logging

from vit_jax_ft import logs, memory, models, predict, run_dir
from vit_jax_ft.explain import attention, curves, embeddings, figures, gradcam
from vit_jax_ft.models.vit import VisionTransformer

FLAGS = flags.FLAGS


@dataclasses.dataclass
class Inputs:
  """What the figures are drawn from."""

  loaded: Optional[run_dir.Loaded]  # None when only training curves are drawn.
  image_paths: List[str]
  images: Optional[np.ndarray]
  workdir: Optional[str]
  output_dir: str
  class_index: Optional[int] = None  # Grad-CAM's class; None: the predicted one.
  tags: str = ''  # Regex of the training-curve tags.

  def path(self, name: str) -> str:
    return os.path.join(self.output_dir, name)

  @functools.cached_property
  def display_images(self) -> np.ndarray:
    """The images in [0, 1], undoing the model's input normalisation: its convention's mean
    and std under the default ops; explicit `pp.test_ops` end in `value_range(-1,1)` here."""
    config = self.loaded.config
    if config.pp.test_ops is None:
      convention = models.input_convention(config.model_name)
      mean, std = np.asarray(convention.mean), np.asarray(convention.std)
    else:
      mean = std = np.full(3, 0.5)
    return self.images * std + mean

  @functools.cached_property
  def attention(self) -> np.ndarray:
    """Attention weights of all layers for the images, computed once for all figures."""
    return attention.attention_weights(self.loaded.model, self.loaded.params, self.images)

  @functools.cached_property
  def titles(self) -> List[str]:
    """Each image's file name and predicted class."""
    if not self.loaded.model.num_classes:
      return [os.path.basename(p) for p in self.image_paths]
    probabilities = predict.predict_probabilities(self.loaded.model, self.loaded.variables,
                                                  self.images)
    return [f'{os.path.basename(p)}: {self.loaded.class_names[i]} ({q[i]:.2f})'
            for p, q, i in zip(self.image_paths, probabilities, probabilities.argmax(-1))]


def _attention(inputs: Inputs) -> List[str]:
  maps = attention.class_token_maps(inputs.attention)
  return [figures.attention_maps(image, maps[:, i], inputs.path(f'attention_{i}.png'))
          for i, image in enumerate(inputs.display_images)]


def _rollout(inputs: Inputs) -> List[str]:
  maps = attention.rollout_maps(inputs.attention,
                                attention.has_class_token(inputs.loaded.params))
  return [figures.heat_overlays(inputs.display_images, maps, inputs.path('rollout.png'),
                                inputs.titles, 'attention rollout')]


def _gradcam(inputs: Inputs) -> List[str]:
  class_index = (None if inputs.class_index is None
                 else np.full(len(inputs.images), inputs.class_index))
  maps = gradcam.gradcam(inputs.loaded.model, inputs.loaded.variables, inputs.images,
                         class_index)
  return [figures.heat_overlays(inputs.display_images, maps, inputs.path('gradcam.png'),
                                inputs.titles, 'Grad-CAM')]


def _posembed(inputs: Inputs) -> List[str]:
  similarity = embeddings.position_similarity(inputs.loaded.params)
  return [figures.position_similarity(similarity, inputs.path('position_embeddings.png'))]


def _filters(inputs: Inputs) -> List[str]:
  components = embeddings.filter_components(inputs.loaded.params)
  return [figures.filter_components(components, inputs.path('embedding_filters.png'))]


def _distance(inputs: Inputs) -> List[str]:
  distances = attention.mean_attention_distance(
      inputs.attention, inputs.images.shape[1],
      attention.has_class_token(inputs.loaded.params))
  return [figures.attention_distance(distances, inputs.path('attention_distance.png'),
                                     inputs.images.shape[1])]


def _curves(inputs: Inputs) -> List[str]:
  return [figures.curves(curves.read_scalars(inputs.workdir, inputs.tags),
                         inputs.path('training_curves.png'))]


@dataclasses.dataclass(frozen=True)
class Figure:
  draw: Callable[[Inputs], List[str]]
  needs_images: bool = False
  needs_vit: bool = False  # Attention and embeddings exist only in a ViT.
  needs_model: bool = True
  needs_workdir: bool = False
  needs_patch_pixels: bool = False  # A plain ViT: its patch embedding sees RGB pixels.


FIGURES: Dict[str, Figure] = {
    'attention': Figure(_attention, needs_images=True, needs_vit=True),
    'rollout': Figure(_rollout, needs_images=True, needs_vit=True),
    'gradcam': Figure(_gradcam, needs_images=True),
    'posembed': Figure(_posembed, needs_vit=True),
    'filters': Figure(_filters, needs_vit=True, needs_patch_pixels=True),
    'distance': Figure(_distance, needs_images=True, needs_vit=True),
    'curves': Figure(_curves, needs_model=False, needs_workdir=True),
}


def missing(figure: Figure, has_images: bool, model: Optional[object],
            workdir: Optional[str]) -> Optional[str]:
  """Why `figure` cannot be drawn from these inputs, or None."""
  if figure.needs_workdir and not workdir:
    return 'needs --workdir (training metrics)'
  if figure.needs_images and not has_images:
    return 'needs image files as arguments'
  is_vit = isinstance(model, VisionTransformer)
  if figure.needs_vit and model is not None and not is_vit:
    applicable = [name for name, other in FIGURES.items() if not other.needs_vit]
    return (f'needs a ViT: {type(model).__name__} {model.model_name or ""} has no ViT '
            f'attention or position embeddings; the figures that apply are '
            f'{", ".join(applicable)}')
  if figure.needs_patch_pixels and is_vit and model.resnet_layers is not None:
    return 'needs a plain ViT (a hybrid embeds ResNet features, not pixels)'
  return None


def define_flags() -> None:
  """The command's flags (defined only when run, to keep importers' flags clean)."""
  predict.define_model_flags()
  flags.DEFINE_list('figures', ['all'], f'Figures to draw: all or some of {list(FIGURES)}.')
  flags.DEFINE_string('output_dir', None, 'Folder of the PNGs (default: WORKDIR/explain).')
  flags.DEFINE_integer('class_index', None, 'Grad-CAM class (default: the predicted one).')
  flags.DEFINE_string('tags', 'loss|accuracy|learning_rate|top[15]$',
                      'Regex of the training-curve tags to plot ("" for all).')


def main(argv: List[str]) -> None:
  memory.hide_gpus_from_tensorflow()
  logs.configure_terminal()  # Other libraries' INFO (orbax's restore) off the terminal.
  image_paths = argv[1:]
  unknown = set(FLAGS.figures) - set(FIGURES) - {'all'}
  if unknown:
    raise app.UsageError(f'Unknown figures {sorted(unknown)}; choose from {list(FIGURES)}.')
  chosen = list(FIGURES) if 'all' in FLAGS.figures else FLAGS.figures
  output_dir = FLAGS.output_dir or (FLAGS.workdir and os.path.join(FLAGS.workdir, 'explain'))
  if not output_dir:
    raise app.UsageError('Give --output_dir for figures of a --checkpoint.')
  needs_model = any(FIGURES[name].needs_model for name in chosen)
  loaded = predict.model_from_flags() if needs_model else None
  drawable = []
  for name in chosen:
    reason = missing(FIGURES[name], bool(image_paths), loaded and loaded.model, FLAGS.workdir)
    if reason and 'all' not in FLAGS.figures:
      raise app.UsageError(f'Figure {name!r} {reason}.')
    if reason:
      logging.info('Skipping %s: it %s.', name, reason)
    else:
      drawable.append(name)
  images = predict.load_images(image_paths, loaded.config) if loaded and image_paths else None
  inputs = Inputs(loaded, image_paths, images, FLAGS.workdir, output_dir,
                  FLAGS.class_index, FLAGS.tags)
  for name in drawable:
    for path in FIGURES[name].draw(inputs):
      print(path)


if __name__ == '__main__':
  define_flags()
  app.run(main)
