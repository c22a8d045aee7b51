"""Which released checkpoint a fine-tuning run starts from, fetched once for all hosts."""
import os
from typing import Optional

import jax
import ml_collections
from jax.experimental import multihost_utils

from vit_jax_ft import hub, paths


def pretrained_path(config: ml_collections.ConfigDict) -> Optional[str]:
  """Checkpoint to start from: `pretrained_path` (a file, URL or public name), else
  `pretrained_dir/{model_name}.npz` as in the official code (`.safetensors` for timm's
  names, `.pth` for NAT's, as `hub fetch` writes them), else None (from scratch)."""
  if config.pretrained_path:
    if jax.process_index() == 0:  # The first host fetches; on a shared disk the rest find it.
      hub.resolve(config.pretrained_path)
    multihost_utils.sync_global_devices('pretrained checkpoint fetched')
    return hub.resolve(config.pretrained_path)
  if not config.pretrained_dir:
    return None
  name = config.model_name
  # The public file of that name; unknown ones are looked for as the official layout's.
  public = hub.pretrained_file(name) or hub.Checkpoint(
      f'imagenet21k/{name}', f'vit_models/imagenet21k/{name}.npz', name)
  path = os.path.join(config.pretrained_dir, os.path.basename(public.local_path))
  if not paths.is_remote(path) and not os.path.exists(path):
    bucket = (f', or read it from the bucket with --config.pretrained_dir=gs://'
              f'{os.path.dirname(public.path)}' if public.server == 'gcs' else '')
    raise FileNotFoundError(
        f'No pretrained checkpoint at {path}. Fetch it with `python -m vit_jax_ft.hub fetch '
        f'{public.name} --dest=checkpoints` and set --config.pretrained_dir=checkpoints/'
        f"{os.path.dirname(public.local_path)}{bucket}, or set --config.pretrained_dir='' to "
        'train from scratch.')
  return path
