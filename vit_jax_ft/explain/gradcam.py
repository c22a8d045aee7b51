"""Grad-CAM (Selvaraju et al. 2017) for every model family of `vit_jax_ft.models`.

The target activation is where spatial evidence last lives before pooling:
- ViT: the tokens entering the last encoder block (its output only reaches
  the class token's logits through attention in that block, so the block's
  input is the last place gradients reach every patch);
- BiT and ResNet v1: the feature map leaving the last stage (its last block);
- Swin: the (batch, h, w, channels) grid leaving the last stage, before the final norm;
- Mixer: the patch tokens leaving the last block, as their grid;
- MaxViT, DaViT, NAT/DiNAT: the (batch, h, w, channels) map leaving the last stage.
It is caught with `flax.linen.intercept_methods`, so the models need no hooks.
"""
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax_ft.explain.attention import has_class_token, token_grid
from vit_jax_ft.models.davit import DaVit
from vit_jax_ft.models.maxvit import MaxVit
from vit_jax_ft.models.mixer import MlpMixer
from vit_jax_ft.models.nat import NAT
from vit_jax_ft.models.resnet import BIT_BLOCK_SIZES, BitResNet
from vit_jax_ft.models.resnet_v1 import ResNetV1
from vit_jax_ft.models.swin import SwinTransformer
from vit_jax_ft.models.vit import VisionTransformer


class Target(NamedTuple):
  """Which submodule's activation Grad-CAM uses, and how to make it a grid."""

  module_name: str
  use_input: bool  # The activation entering the module, else the one leaving it.
  to_grid: Callable[[jnp.ndarray], jnp.ndarray]  # -> (batch, h, w, channels)


def _vit_target(model: VisionTransformer, params: Mapping[str, Any]) -> Target:
  offset = int(has_class_token(params))

  def to_grid(tokens):
    patches = tokens[:, offset:]
    return patches.reshape((len(patches),) + token_grid(tokens.shape[1], bool(offset))
                           + patches.shape[-1:])

  return Target(f'encoderblock_{model.num_layers - 1}', True, to_grid)


def _bit_target(model: BitResNet, params: Mapping[str, Any]) -> Target:
  del params
  stages = len(model.block_sizes or BIT_BLOCK_SIZES[model.depth])
  return Target(f'block{stages}', False, lambda x: x)


def _resnet_v1_target(model: ResNetV1, params: Mapping[str, Any]) -> Target:
  del params
  return Target(f'layer{len(model.layers)}_{model.layers[-1] - 1}', False, lambda x: x)


def _swin_target(model: SwinTransformer, params: Mapping[str, Any]) -> Target:
  del params
  return Target(f'layers_{len(model.depths) - 1}', False, lambda x: x)


def _mixer_target(model: MlpMixer, params: Mapping[str, Any]) -> Target:
  del params

  def to_grid(tokens):
    return tokens.reshape((len(tokens),) + token_grid(tokens.shape[1], False)
                          + tokens.shape[-1:])

  return Target(f'MixerBlock_{model.num_blocks - 1}', False, to_grid)


def _last_stage_target(prefix: str) -> Callable[[nn.Module, Mapping[str, Any]], Target]:
  """The map leaving the last of the stages named `{prefix}{i}`."""
  return lambda model, params: Target(f'{prefix}{len(model.depths) - 1}', False, lambda x: x)


# Model class -> where its Grad-CAM activation is.
TARGETS = {VisionTransformer: _vit_target, BitResNet: _bit_target, ResNetV1: _resnet_v1_target,
           SwinTransformer: _swin_target, MlpMixer: _mixer_target,
           MaxVit: _last_stage_target('stages_'), DaVit: _last_stage_target('stages_'),
           NAT: _last_stage_target('levels_')}


def activation_and_gradient(model: nn.Module, variables: Mapping[str, Any],
                            images: np.ndarray, class_index: Optional[np.ndarray] = None
                            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The target activation as a grid, the gradient of the class logit w.r.t. it,
  and the logits: (batch, h, w, c), (batch, h, w, c), (batch, classes).

  `variables` as `run_dir.Loaded.variables`; `class_index` (batch,) defaults to each
  image's predicted class.
  """
  if type(model) not in TARGETS:
    raise ValueError(f'Grad-CAM supports {sorted(c.__name__ for c in TARGETS)}, '
                     f'not {type(model).__name__}.')
  if not model.num_classes:
    raise ValueError('Grad-CAM needs class logits: build the model with a head '
                     '(num_classes > 0).')
  target = TARGETS[type(model)](model, variables['params'])

  def forward(delta):
    """Logits with `delta` added to the target activation, and that activation."""
    caught = {}

    def interceptor(next_fun, args, kwargs, context):
      if context.module.name != target.module_name or context.method_name != '__call__':
        return next_fun(*args, **kwargs)
      if target.use_input:
        caught['x'] = args[0] + (0 if delta is None else delta)
        return next_fun(caught['x'], *args[1:], **kwargs)
      caught['x'] = next_fun(*args, **kwargs) + (0 if delta is None else delta)
      return caught['x']

    with nn.intercept_methods(interceptor):
      logits = model.apply(variables, images, train=False)
    return logits, caught['x']

  logits, activation = jax.jit(forward, static_argnums=0)(None)
  if class_index is None:
    class_index = np.asarray(logits).argmax(-1)
  class_index = jnp.asarray(class_index)

  def class_score(delta):
    logits, activation = forward(delta)
    score = jnp.take_along_axis(logits, class_index[:, None], axis=1).sum()
    return score, (activation, logits)

  gradient, (activation, logits) = jax.jit(jax.grad(class_score, has_aux=True))(
      jnp.zeros(activation.shape, activation.dtype))
  return (np.asarray(target.to_grid(activation)), np.asarray(target.to_grid(gradient)),
          np.asarray(logits))


def cam_from(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
  """ReLU of the channels weighted by their spatially averaged gradients, max 1."""
  weights = gradient.mean(axis=(1, 2), keepdims=True)
  cam = np.maximum((weights * activation).sum(axis=-1), 0)
  peak = cam.max(axis=(1, 2), keepdims=True)
  return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0)


def gradcam(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
            class_index: Optional[np.ndarray] = None) -> np.ndarray:
  """Grad-CAM maps (batch, h, w) in [0, 1] on the model's feature grid."""
  activation, gradient, _ = activation_and_gradient(model, variables, images, class_index)
  return cam_from(activation, gradient)
