"""Model registry: `get_model(name, num_classes, **overrides)` -> a Flax linen Module."""
import difflib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax_ft.models.davit import DaVit
from vit_jax_ft.models.maxvit import MaxVit
from vit_jax_ft.models.mixer import MlpMixer
from vit_jax_ft.models.nat import NAT
from vit_jax_ft.models.registry import (AUGREG_NAMES, INPUT_CONVENTIONS, MODEL_SPECS,
                                        InputConvention)
from vit_jax_ft.models.resnet import BitResNet
from vit_jax_ft.models.resnet_v1 import ResNetV1
from vit_jax_ft.models.swin import SwinTransformer
from vit_jax_ft.models.vit import ATTENTION_KINDS, CLASSIFIERS, POSEMB_KINDS, VisionTransformer

MODEL_CLASSES = {'vit': VisionTransformer, 'bit': BitResNet, 'mixer': MlpMixer,
                 'swin': SwinTransformer, 'resnet_v1': ResNetV1, 'maxvit': MaxVit,
                 'davit': DaVit, 'nat': NAT}
# Options that take one of a few values.
CHOICES = {'attention': ATTENTION_KINDS, 'classifier': CLASSIFIERS, 'posemb': POSEMB_KINDS}


def unknown_model_error(name: str) -> ValueError:
  """A ValueError that lists the closest official names."""
  close = difflib.get_close_matches(name, MODEL_SPECS, n=5, cutoff=0.4)
  hint = f' Did you mean: {", ".join(close)}?' if close else ''
  return ValueError(f'Unknown model name {name!r}.{hint} '
                    f'Run `python -m vit_jax_ft.models` to list all names.')


def get_model(name: str, num_classes: int, **overrides: Any) -> nn.Module:
  """Builds the official model `name` with a `num_classes` head (0: no head)."""
  if name not in MODEL_SPECS:
    raise unknown_model_error(name)
  spec = dict(MODEL_SPECS[name])
  module_class = MODEL_CLASSES[spec.pop('kind')]
  fields = set(module_class.__dataclass_fields__) - {'parent', 'name'}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f'Unknown option(s) {sorted(unknown)} for model {name!r}; '
                     f'allowed: {sorted(fields - {"num_classes", "model_name"})}.')
  spec.update(overrides)
  for option, allowed in CHOICES.items():
    if option in spec and spec[option] not in allowed:
      raise ValueError(f'{option}={spec[option]!r}; allowed: {allowed}.')
  if spec.get('sow_attention') and spec.get('attention') == 'dot_product':
    raise ValueError('sow_attention needs attention="dense": the fused kernel never '
                     'materialises the attention weights.')
  return module_class(num_classes=num_classes, model_name=name, **spec)


def input_convention(name: str) -> InputConvention:
  """How the released weights of `name` expect their images (the default preprocessing)."""
  if name not in MODEL_SPECS:
    raise unknown_model_error(name)
  if name not in INPUT_CONVENTIONS:
    raise ValueError(f'Model {name!r} has no input convention: add it to INPUT_CONVENTIONS in '
                     'vit_jax_ft/models/registry.py (timm names: `timm_input(...)` from '
                     "timm's pretrained_cfg).")
  return INPUT_CONVENTIONS[name]


def abstract_variables(model: nn.Module, image_size: int) -> Any:
  """Shapes and dtypes of `model`'s variables for square `image_size` inputs; nothing runs."""
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), train=False))


__all__ = ['AUGREG_NAMES', 'INPUT_CONVENTIONS', 'InputConvention', 'MODEL_SPECS',
           'abstract_variables', 'get_model', 'input_convention', 'unknown_model_error']
