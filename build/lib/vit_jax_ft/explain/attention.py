"""Attention of a ViT: per layer and head, rollout, and mean attention distance.

Weights come from the model's `sow_attention` option (each block stores its
softmax attention in the 'intermediates' collection), so the numbers are those
of the forward pass itself.
"""
import functools
from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax
import numpy as np

from vit_jax_ft.models.vit import VisionTransformer


def has_class_token(params: Mapping[str, Any]) -> bool:
  """Whether the model prepends a class token (classifier='token')."""
  return 'cls' in params


def attention_weights(model: nn.Module, params: Mapping[str, Any],
                      images: np.ndarray) -> np.ndarray:
  """Attention probabilities of every block: (layers, batch, heads, tokens, tokens)."""
  if not isinstance(model, VisionTransformer):
    raise ValueError(f'Attention maps need a ViT or hybrid ViT; {model.model_name!r} is '
                     f'a {type(model).__name__}. Use Grad-CAM for ResNets.')
  # Dense attention computes the same numbers as the fused kernel and can store them.
  sowing = model.clone(sow_attention=True, attention='dense')
  apply = jax.jit(functools.partial(sowing.apply, train=False, mutable=['intermediates']))
  _, state = apply({'params': params}, images)
  blocks = state['intermediates']['Transformer']
  layers = sorted(blocks, key=lambda name: int(name.rsplit('_', 1)[1]))
  return np.stack([np.asarray(
      blocks[name]['MultiHeadDotProductAttention_0']['attention_weights'][0], np.float32)
                   for name in layers])


def token_grid(num_tokens: int, class_token: bool) -> Tuple[int, int]:
  """The (height, width) patch grid behind `num_tokens` tokens (square images)."""
  patches = num_tokens - int(class_token)
  side = int(round(np.sqrt(patches)))
  if side * side != patches:
    raise ValueError(f'{patches} patch tokens do not form a square grid; attention maps '
                     'need square images.')
  return side, side


def class_token_maps(weights: np.ndarray) -> np.ndarray:
  """The class token's attention to the patches: (layers, batch, heads, gh, gw)."""
  grid = token_grid(weights.shape[-1], class_token=True)
  return weights[..., 0, 1:].reshape(weights.shape[:3] + grid)


def attention_rollout(weights: np.ndarray) -> np.ndarray:
  """Abnar & Zuidema's rollout: heads averaged, identity added, rows renormalised,
  multiplied from the first layer to the last. Returns (batch, tokens, tokens)."""
  tokens = weights.shape[-1]
  joint = np.broadcast_to(np.eye(tokens), weights.shape[1:2] + (tokens, tokens))
  for layer in weights.mean(axis=2):  # (batch, T, T) per layer, heads averaged.
    layer = layer + np.eye(tokens)
    layer = layer / layer.sum(axis=-1, keepdims=True)
    joint = layer @ joint
  return joint


def rollout_maps(weights: np.ndarray, class_token: bool) -> np.ndarray:
  """Rollout of the output token(s) onto the patches: (batch, gh, gw) in [0, 1].

  With a class token this is its row; without one (global average pooling)
  the mean row over all tokens, which is what the pooled output mixes.
  """
  rollout = attention_rollout(weights)
  grid = token_grid(weights.shape[-1], class_token)
  rows = rollout[:, 0, 1:] if class_token else rollout.mean(axis=1)
  rows = rows / rows.max(axis=-1, keepdims=True)
  return rows.reshape((-1,) + grid)


def mean_attention_distance(weights: np.ndarray, image_size: int,
                            class_token: bool) -> np.ndarray:
  """Mean distance in pixels that each head integrates over: (layers, heads).

  As in the ViT paper's figure 7: for every query patch, the attention-weighted
  distance between its centre and the key patches' centres (patch-to-patch
  attention renormalised, class token left out), averaged over queries and images.
  """
  offset = int(class_token)
  grid = token_grid(weights.shape[-1], class_token)
  pixels_per_token = image_size / grid[0]
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  centres = np.stack([rows.ravel(), cols.ravel()], axis=-1) * pixels_per_token
  distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
  patches = weights[..., offset:, offset:]
  patches = patches / patches.sum(axis=-1, keepdims=True)
  per_query = np.einsum('lbhqk,qk->lbhq', patches, distances)
  return per_query.mean(axis=(1, 3))
