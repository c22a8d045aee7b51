"""A training workdir, read without the trainer: config, classes, checkpoints and the model.

`WORKDIR/config.json` holds the resolved config and, under `model_spec`, the architecture
the run actually built (family and every constructor argument), so inference rebuilds that
network even if the model registry changes later; workdirs written before it existed fall
back to `config.model_name`. Checkpoints (`WORKDIR/checkpoints/STEP`, written by orbax) are
restored onto the devices of the reading machine, whatever machine trained them.
"""
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from tensorflow.io import gfile

from vit_jax_ft import models, parallel, paths

CONFIG_FILE = 'config.json'
DATASET_INFO_FILE = 'dataset_info.json'
MODEL_SPEC_KEY = 'model_spec'  # Key of the resolved architecture in config.json.
_ORBAX_ITEM = 'default'  # Folder orbax's CheckpointManager gives its single saved tree.


@dataclasses.dataclass
class Loaded:
  """A model ready for inference and what is needed to feed and read it."""

  config: ml_collections.ConfigDict  # pp.* gives the evaluation preprocessing.
  model: nn.Module
  params: Any
  class_names: List[str]
  step: Optional[int] = None  # Training step of a workdir checkpoint.
  batch_stats: Any = None  # BatchNorm statistics; None for models without BatchNorm.

  @property
  def variables(self) -> Dict[str, Any]:
    """What the model is applied with: the params, and the BatchNorm statistics if any."""
    return {'params': self.params, **({'batch_stats': self.batch_stats}
                                      if self.batch_stats else {})}


def checkpoint_dir(workdir: str) -> str:
  """`workdir/checkpoints`, made absolute for local paths as orbax requires."""
  path = os.path.join(workdir, 'checkpoints')
  return path if paths.is_remote(path) else os.path.abspath(path)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The model of `config.model_name` with `config.model` options and `config.dtype`."""
  options = {k: tuple(v) if isinstance(v, list) else v
             for k, v in (config.get('model') or {}).items() if v is not None}
  return models.get_model(config.model_name, num_classes, dtype=jnp.dtype(config.dtype),
                          **options)


def model_spec(model: nn.Module) -> Dict[str, Any]:
  """The JSON form of a built model: its family and every constructor argument."""
  families = {cls: family for family, cls in models.MODEL_CLASSES.items()}
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ('parent', 'name')}
  fields['dtype'] = jnp.dtype(fields['dtype']).name
  return {'family': families[type(model)], **fields}


def config_record(config: ml_collections.ConfigDict, model: nn.Module) -> Dict[str, Any]:
  """What config.json holds: the resolved config and the spec of the model built from it."""
  return dict(json.loads(config.to_json_best_effort()), **{MODEL_SPEC_KEY: model_spec(model)})


def model_from_spec(spec: Dict[str, Any]) -> nn.Module:
  """Rebuilds the model `model_spec` described (JSON lists become tuples)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
            if k != 'family'}
  kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  family = models.MODEL_CLASSES.get(spec['family'])
  if family is None:
    raise ValueError(f'config.json describes a model of family {spec["family"]!r}; this '
                     f'version knows {sorted(models.MODEL_CLASSES)}.')
  return family(**kwargs)


def _read_json(workdir: str, name: str) -> Dict[str, Any]:
  path = os.path.join(workdir, name)
  if not gfile.exists(path):
    raise FileNotFoundError(f'{workdir} is not a training workdir (no {name}); pass the '
                            '--workdir of a `python -m vit_jax_ft.main` run.')
  with gfile.GFile(path) as f:
    return json.load(f)


def checkpoint_steps(workdir: str) -> List[int]:
  """Steps of the complete checkpoints in the workdir, ascending."""
  directory = checkpoint_dir(workdir)
  if not gfile.isdir(directory):
    return []
  names = [name.rstrip('/') for name in gfile.listdir(directory)]
  return sorted(int(name) for name in names if name.isdigit() and
                ocp.utils.is_checkpoint_finalized(os.path.join(directory, name)))


# The Flax collections inference applies a model with; the others (intermediates) are outputs.
INFERENCE_COLLECTIONS = ('params', 'batch_stats')


def inference_shapes(model: nn.Module, image_size: int) -> Dict[str, Any]:
  """Shapes and dtypes of the model's `INFERENCE_COLLECTIONS` at `image_size`."""
  shapes = models.abstract_variables(model, image_size)
  return {k: shapes[k] for k in INFERENCE_COLLECTIONS if k in shapes}


def _shapes_by_name(variables: Dict[str, Any]) -> Dict[str, tuple]:
  """'{name}': shape for params, '{collection}:{name}' for the other collections."""
  return {('' if collection == 'params' else f'{collection}:') + k: tuple(v.shape)
          for collection, tree in variables.items()
          for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def restore_variables(workdir: str, step: int, model: nn.Module, image_size: int,
                      ema: bool = False) -> Dict[str, Any]:
  """The params (their moving average with `ema`) and BatchNorm statistics of checkpoint
  `step`, replicated over this machine's devices; every name and shape must be the model's."""
  path = os.path.join(checkpoint_dir(workdir), str(step), _ORBAX_ITEM)
  shapes = inference_shapes(model, image_size)
  # The TrainState field each collection is stored as.
  items = {k: 'ema_params' if ema and k == 'params' else k for k in shapes}
  try:
    stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
  except (ValueError, KeyError, OSError) as e:
    raise _unreadable(workdir, step, e) from e
  if ema and stored.get('ema_params') is None:
    raise ValueError(f'Checkpoint {step} of {workdir} has no moving average of the '
                     'parameters: the run had config.ema_decay=0. Drop --ema.')
  try:
    stored = {k: stored[item] for k, item in items.items()}
  except KeyError as e:
    raise _unreadable(workdir, step, e) from e
  have, want = _shapes_by_name(stored), _shapes_by_name(shapes)
  if have != want:
    differ = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    raise ValueError(
        f'Checkpoint {step} of {workdir} does not fit {model.model_name or "the model"} at '
        f'{image_size} px: {[(k, have.get(k), want.get(k)) for k in differ[:4]]} '
        '(name, checkpoint shape, model shape). Was config.json edited or the model '
        'registry changed since training?')
  sharding = parallel.replicated(parallel.create_mesh())
  target = {items[k]: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
            for k, tree in shapes.items()}
  try:
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except; orbax raises bare Exception for bad data.
    raise _unreadable(workdir, step, e) from e
  return {k: restored[item] for k, item in items.items()}


def _unreadable(workdir: str, step: int, error: Exception) -> ValueError:
  return ValueError(f'Checkpoint {step} of {workdir} cannot be read ({type(error).__name__}: '
                    f'{error}); choose another --step (complete: {checkpoint_steps(workdir)}).')


def load(workdir: str, step: Optional[int] = None, ema: bool = False) -> Loaded:
  """Config, model, parameters (their moving average with `ema`; on this machine's devices),
  classes and step of a workdir checkpoint (the latest by default)."""
  raw = _read_json(workdir, CONFIG_FILE)
  spec = raw.pop(MODEL_SPEC_KEY, None)
  config = ml_collections.ConfigDict(raw)
  class_names = _read_json(workdir, DATASET_INFO_FILE)['class_names']
  steps = checkpoint_steps(workdir)
  step = steps[-1] if step is None and steps else step
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint {"" if step is None else step} in {workdir}; '
                            f'complete checkpoints: {steps}.')
  if spec is None:
    logging.info('%s predates recorded model specifications: building %s from the registry.',
                 workdir, config.model_name)
    model = build_model(config, len(class_names))
  else:
    model = model_from_spec(spec)
  variables = restore_variables(workdir, step, model, config.pp.crop, ema)
  return Loaded(config, model, variables['params'], class_names, step,
                variables.get('batch_stats'))
