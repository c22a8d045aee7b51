"""What the ViT's embeddings learn (ViT paper, figure 7, left and centre)."""
from typing import Any, Mapping

import numpy as np

from vit_jax_ft.explain.attention import has_class_token, token_grid


def position_similarity(params: Mapping[str, Any]) -> np.ndarray:
  """Cosine similarity of each patch's position embedding with every other one.

  Returns (gh, gw, gh, gw): entry [i, j] is the similarity map of patch (i, j),
  the "grid of grids" of the paper. The class token's embedding is left out.
  """
  embedding = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])[0]
  embedding = embedding[int(has_class_token(params)):]
  grid = token_grid(len(embedding), class_token=False)
  unit = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
  return (unit @ unit.T).reshape(grid + grid)


def filter_components(params: Mapping[str, Any], count: int = 28) -> np.ndarray:
  """The first `count` principal components of the RGB patch-embedding filters.

  Each of the hidden_size filters (ph, pw, 3) is a sample; the components are
  returned as (count, ph, pw, 3) images, largest variance first.
  """
  kernel = np.asarray(params['embedding']['kernel'])
  if kernel.shape[2] != 3 or kernel.shape[0] == 1:
    raise ValueError(f'The patch embedding kernel has shape {kernel.shape}: filter PCA '
                     'needs a plain ViT that embeds RGB pixel patches, not a hybrid.')
  filters = kernel.reshape(-1, kernel.shape[-1]).T  # (hidden, ph*pw*3)
  centred = filters - filters.mean(axis=0)
  _, _, components = np.linalg.svd(centred, full_matrices=False)
  count = min(count, len(components))
  return components[:count].reshape((count,) + kernel.shape[:3])
