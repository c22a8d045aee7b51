"""Released `.npz` checkpoints: read, write, and adapt to a new task.

`load` accepts the three layouts in circulation and returns the model's tree:
- pre-Linen ViT names (`MultiHeadDotProductAttention_1`, `LayerNorm_2`,
  `MlpBlock_3`), as in the released ViT and AugReg files;
- Linen names (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`),
  as written by the official code today;
- the BiT release names (`resnet/block1/unit01/a/group_norm/gamma`, ...),
  and bit_jax's Flax trees (`conv_head`, GroupNorm params of shape (1,1,1,C)).
Files saved with their optimizer keep their parameters (`opt/target/...`).
`load_variables` also reads timm/torchvision state dicts (Swin, ResNet v1.5, Mixer).
`save_variables` writes each family back in its own layout: `.npz` in the released names
(pre-Linen ViT names, BiT release names, the official Mixer tree), which the official code
and timm's npz loader read; `.safetensors` as timm's state dict, which timm loads as it is.
"""
import io
import os
import pathlib
import re
import tempfile
import urllib.request
import zipfile
import zlib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import safetensors.numpy
import scipy.ndimage
from absl import logging
import flax
from flax import traverse_util
from flax.training import checkpoints as flax_checkpoints

from vit_jax_ft import paths
from vit_jax_ft.models import davit, maxvit, mixer, nat, resnet_v1, swin

Params = Dict[str, Any]

# The task-specific layers a fine-tuning run starts afresh: the classifier and its hidden layers
# (ResNet v1's classifier is timm's `fc`); not the norm and pre-logits inside timm's head
# (MaxViT's), which timm keeps on a new head.
_HEAD = re.compile(r'^(head(_hidden_\d+)?|fc)/(?!norm/|pre_logits/)')

# Linen name -> pre-Linen name inside each `encoderblock_N`.
_LINEN_TO_PRE_LINEN = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
_BIT_UNIT = re.compile(r'^resnet/(block\d+)/(unit\d+)/([abc])/(proj/)?'
                       r'(standardized_conv2d|group_norm)/(kernel|gamma|beta)$')
_BIT_FIXED = {
    'resnet/root_block/standardized_conv2d/kernel': 'root_block/conv_root/kernel',
    'resnet/group_norm/gamma': 'norm-pre-head/scale',
    'resnet/group_norm/beta': 'norm-pre-head/bias',
    'resnet/head/conv2d/kernel': 'head/kernel',
    'resnet/head/conv2d/bias': 'head/bias',
}
_GN_NAME = re.compile(r'^(gn(\d+|_root|_proj)|norm-pre-head)$')


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model."""


def _source(path: str) -> Union[str, io.BytesIO]:
  """What `np.load` reads: a local path itself, or the bytes of a URL or gfile object."""
  if paths.is_url(path):
    try:
      with urllib.request.urlopen(path, timeout=30) as response:
        return io.BytesIO(response.read())
    except OSError as e:
      raise FileNotFoundError(
          f'Could not download {path}: {e}. Fetch a public checkpoint with '
          '`python -m vit_jax_ft.hub fetch NAME`, or place the file by hand.') from e
  if paths.is_remote(path):  # gs:// and the rest of gfile's filesystems.
    from tensorflow.io import gfile  # pylint: disable=import-outside-toplevel
    gfile.makedirs(os.path.dirname(path))
    if not gfile.exists(path):
      raise FileNotFoundError(f'No checkpoint at {path}.')
    with gfile.GFile(path, 'rb') as f:
      return io.BytesIO(f.read())
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'No checkpoint at {path!r}. List public checkpoints with '
        '`python -m vit_jax_ft.hub list` and download one with '
        '`python -m vit_jax_ft.hub fetch NAME`.')
  if os.path.isdir(path):
    raise CheckpointError(f'{path} is a folder; give the path of an .npz checkpoint file.')
  return path


def read_npz(path: str) -> Dict[str, np.ndarray]:
  """The flat `{'a/b/c': array}` contents of an `.npz` file."""
  try:
    npz = np.load(_source(path), allow_pickle=False)
    if isinstance(npz, np.lib.npyio.NpzFile):
      with npz:
        return {key: npz[key] for key in npz.files}
  except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as e:
    if isinstance(e, (CheckpointError, FileNotFoundError)):
      raise
    raise CheckpointError(
        f'{path} is not a readable .npz checkpoint ({type(e).__name__}: {e}); '
        'it may be truncated or not a checkpoint. Download it again.') from e
  raise CheckpointError(f'{path} holds a single array, not an .npz of named parameters.')


def _strip_optimizer(flat: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Keeps the parameters of files saved with their optimizer (`opt/target/...`)."""
  prefix = 'opt/target/'
  if not any(key.startswith(prefix) for key in flat):
    return flat
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _from_bit_release(flat: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames BiT release keys (`resnet/...`) to the model's tree."""
  out = {}
  for key, value in flat.items():
    if key in _BIT_FIXED:
      new_key = _BIT_FIXED[key]
      if key == 'resnet/head/conv2d/kernel':
        value = value.reshape(value.shape[-2:])
    elif m := _BIT_UNIT.match(key):
      block, unit, group, proj, layer, leaf = m.groups()
      index = 'abc'.index(group) + 1
      if proj:
        new_key = f'{block}/{unit}/conv_proj/kernel'
      elif layer == 'standardized_conv2d':
        new_key = f'{block}/{unit}/conv{index}/kernel'
      else:
        new_key = f'{block}/{unit}/gn{index}/' + ('scale' if leaf == 'gamma' else 'bias')
    else:
      raise CheckpointError(f'Unexpected key {key!r} in a BiT checkpoint.')
    out[new_key] = value
  return out


def _to_bit_release(flat: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames the model's BiT keys to the release names."""
  inverse = {v: k for k, v in _BIT_FIXED.items()}
  out = {}
  for key, value in flat.items():
    if key in inverse:
      new_key = inverse[key]
      if key == 'head/kernel':
        value = value.reshape((1, 1) + value.shape)
    else:
      block, unit, layer, leaf = key.split('/')
      if layer == 'conv_proj':
        new_key = f'resnet/{block}/{unit}/a/proj/standardized_conv2d/kernel'
      else:
        group = 'abc'[int(layer[-1]) - 1]
        if layer.startswith('conv'):
          new_key = f'resnet/{block}/{unit}/{group}/standardized_conv2d/kernel'
        else:
          new_key = (f'resnet/{block}/{unit}/{group}/group_norm/' +
                     ('gamma' if leaf == 'scale' else 'beta'))
    out[new_key] = value
  return out


def _squeeze_group_norm(flat: Dict[Tuple[str, ...], Any]) -> Dict[Tuple[str, ...], Any]:
  """Old GroupNorm params of shape (1, 1, 1, C) become (C,)."""
  return {path: (np.reshape(v, (-1,)) if len(path) > 1 and _GN_NAME.match(path[-2])
                 and path[-1] in ('scale', 'bias') else v)
          for path, v in flat.items()}


# Extensions of PyTorch state dicts (timm, torchvision), read with safetensors or torch.
SAFETENSORS_EXTENSIONS = ('.safetensors',)
TORCH_EXTENSIONS = ('.pth', '.pt', '.bin')
# State-dict layouts by family: (recognises the keys, converts to the Flax variables).
STATE_DICT_FAMILIES: Dict[str, Tuple[Callable[[Mapping[str, Any]], bool],
                                     Callable[[Mapping[str, Any]], Dict[str, Params]]]] = {
    'swin': (swin.is_timm_state_dict, lambda state: {'params': swin.from_timm(state)}),
    'mixer': (mixer.is_timm_state_dict, lambda state: {'params': mixer.from_timm(state)}),
    'resnet_v1': (resnet_v1.is_timm_state_dict, resnet_v1.from_timm),
    'maxvit': (maxvit.is_timm_state_dict, maxvit.from_timm),
    'davit': (davit.is_timm_state_dict, lambda state: {'params': davit.from_timm(state)}),
    'nat': (nat.is_authors_state_dict, lambda state: {'params': nat.from_authors(state)}),
}
# The same families written back: (recognises the params tree, variables -> the state dict).
STATE_DICT_WRITERS: Dict[str, Tuple[Callable[[Mapping[str, Any]], bool],
                                    Callable[[Mapping[str, Any]], Dict[str, np.ndarray]]]] = {
    'swin': (swin.is_params_tree, lambda variables: swin.to_timm(variables['params'])),
    'mixer': (mixer.is_params_tree, lambda variables: mixer.to_timm(variables['params'])),
    'resnet_v1': (resnet_v1.is_params_tree, resnet_v1.to_timm),
    'maxvit': (maxvit.is_params_tree, maxvit.to_timm),
    'davit': (davit.is_params_tree, davit.to_timm),
}
# State-dict families that also have an official `.npz` release (the same tree).
OFFICIAL_NPZ_FAMILIES = ('mixer',)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """The `{'layers.0.weight': array}` contents of a `.safetensors`, `.pth` or `.bin` file."""
  data = _source(path)
  if path.endswith(SAFETENSORS_EXTENSIONS):
    raw = data.getvalue() if isinstance(data, io.BytesIO) else pathlib.Path(data).read_bytes()
    try:
      return dict(safetensors.numpy.load(raw))
    except Exception as e:  # safetensors raises its own SafetensorError for any damage.
      raise CheckpointError(f'{path} is not a readable .safetensors file ({e}).') from e
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f'{path} is a PyTorch pickle, which needs torch to read. Install torch, or convert it '
        'once where torch is installed: python -c "import torch, safetensors.torch as s; '
        f"s.save_file(torch.load('{path}', map_location='cpu'), 'model.safetensors')\" and "
        'load model.safetensors.') from e
  state = torch.load(data, map_location='cpu', weights_only=True)
  state = state.get('model', state.get('state_dict', state))
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if hasattr(v, 'numpy')}


def load_variables(path: str) -> Dict[str, Params]:
  """The Flax variables (`{'params': ...}`) of a released `.npz` or a timm/torchvision file.

  The family of a state dict is recognised from its keys; an unknown layout is an error
  that names them.
  """
  if not path.endswith(SAFETENSORS_EXTENSIONS + TORCH_EXTENSIONS):
    return {'params': load_npz(path)}
  state = read_state_dict(path)
  for detect, convert in STATE_DICT_FAMILIES.values():
    if detect(state):
      return convert(state)
  raise CheckpointError(
      f'{path} has a state-dict layout of no supported family ({sorted(STATE_DICT_FAMILIES)}); '
      f'its keys look like {sorted(state)[:6]}.')


def load(path: str) -> Params:
  """The parameters of any supported checkpoint file (see `load_variables`)."""
  return load_variables(path)['params']


def load_npz(path: str) -> Params:
  """Reads a released or saved `.npz` (local, `gs://` or `https://`) into the model tree."""
  flat = _strip_optimizer(read_npz(path))
  if any(key.startswith('resnet/') for key in flat):
    flat = _from_bit_release(flat)
  # Trees saved by big_transfer's bit_jax call the head `conv_head`.
  flat = {re.sub(r'^conv_head/', 'head/', k): v for k, v in flat.items()}
  tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  # Pre-Linen files number submodules across classes; Linen numbers them per class.
  tree = flax.core.unfreeze(flax_checkpoints.convert_pre_linen(tree))
  flat_tuples = _squeeze_group_norm(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat_tuples)


def is_bit_tree(params: Mapping[str, Any]) -> bool:
  """Whether `params` is a BiT ResNet tree (as opposed to a ViT or hybrid)."""
  return 'root_block' in params


def _state_dict_family(params: Mapping[str, Any]) -> Optional[str]:
  """The state-dict family whose tree `params` is, else None (ViT, hybrid, BiT)."""
  return next((family for family, (detect, _) in STATE_DICT_WRITERS.items() if detect(params)),
              None)


def _released_npz(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The flat contents of the released `.npz` of a ViT, hybrid, BiT or Mixer tree."""
  flat = {'/'.join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(dict(params)).items()}
  if is_bit_tree(params):
    return _to_bit_release(flat)
  return {re.sub(r'(encoderblock_\d+/)(\w+_\d+)',
                 lambda m: m.group(1) + _LINEN_TO_PRE_LINEN.get(m.group(2), m.group(2)),
                 k): v for k, v in flat.items()}


def _write(data: bytes, path: str) -> None:
  """Writes `data` to `path`: atomically for local paths, through gfile for remote ones."""
  if paths.is_remote(path):  # gs:// and the rest of gfile's filesystems.
    from tensorflow.io import gfile  # pylint: disable=import-outside-toplevel
    gfile.makedirs(os.path.dirname(path))
    with gfile.GFile(path, 'wb') as f:
      f.write(data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, suffix='.tmp', delete=False) as f:
    f.write(data)
    tmp = f.name
  os.replace(tmp, path)


def save_variables(variables: Mapping[str, Any], path: str) -> None:
  """Writes `variables` in their family's layout: timm's state dict for a `.safetensors`
  path (Swin, ResNet v1 with its `batch_stats`, Mixer), else the released `.npz`."""
  params = variables['params']
  family = _state_dict_family(params)
  if path.endswith(SAFETENSORS_EXTENSIONS):
    if family is None:
      raise CheckpointError(
          f'{path}: ViTs, hybrids and BiT are released as .npz, not as a timm state dict; '
          f'give a path ending in .npz (.safetensors is for {sorted(STATE_DICT_WRITERS)}).')
    _write(safetensors.numpy.save(STATE_DICT_WRITERS[family][1](variables)), path)
    return
  if family is not None and family not in OFFICIAL_NPZ_FAMILIES:
    raise CheckpointError(
        f'{path}: a {family} model has no official .npz layout; its weights are timm\'s state '
        'dict: give a path ending in .safetensors.')
  buffer = io.BytesIO()
  np.savez(buffer, **_released_npz(params))
  _write(buffer.getvalue(), path)


def save(params: Mapping[str, Any], path: str) -> None:
  """Writes `params` (a model without batch statistics) as `save_variables` does."""
  save_variables({'params': params}, path)


def interpolate_posembed(posemb: np.ndarray, num_tokens: int,
                         has_class_token: bool) -> np.ndarray:
  """Resizes (1, N, C) position embeddings to `num_tokens` by bilinear zoom of the grid."""
  num_extra = 1 if has_class_token else 0
  tok, grid = posemb[:, :num_extra], posemb[0, num_extra:]
  old, new = int(round(np.sqrt(len(grid)))), int(round(np.sqrt(num_tokens - num_extra)))
  if old * old != len(grid) or new * new != num_tokens - num_extra:
    raise CheckpointError(
        f'Position embeddings of {posemb.shape[1]} tokens cannot be resized to '
        f'{num_tokens}: both grids must be square (image size a multiple of the patch size).')
  logging.info('Resizing position embeddings: grid %dx%d -> %dx%d', old, old, new, new)
  grid = grid.reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return np.concatenate([tok, grid.reshape(1, new * new, -1)], axis=1)


def _resize_bias_table(key: str, table: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """Swin's (positions, heads) or MaxViT's (heads, 2h - 1, 2w - 1) table resized to `shape`."""
  if len(shape) == 3:
    window = ((shape[1] + 1) // 2, (shape[2] + 1) // 2)
    resize = maxvit.resize_relative_position_bias
  else:
    window = ((int(round(np.sqrt(shape[0]))) + 1) // 2,) * 2
    resize = swin.resize_relative_position_bias
  logging.info('Resizing %s to a %dx%d window', key, *window)
  return resize(table, window)


def load_pretrained(path: str, init_params: Mapping[str, Any]) -> Params:
  """Loads `path` for fine-tuning a model whose fresh params are `init_params` (see `adapt`)."""
  return adapt(load(path), init_params, source=path)


def head_of(variables: Mapping[str, Params]) -> Dict[str, Dict[str, Any]]:
  """The flat (`a/b/c`) entries of each collection that `adapt` takes from a fresh init."""
  return {name: {k: v for k, v in traverse_util.flatten_dict(dict(tree), sep='/').items()
                 if _HEAD.match(k)} for name, tree in variables.items()}


def load_pretrained_variables(path: str, init_variables: Mapping[str, Params]
                              ) -> Dict[str, Params]:
  """`load_pretrained` for every collection of `init_variables` (`'params'`, and
  `'batch_stats'` for BatchNorm models): the head starts afresh, the statistics are the file's.
  Only the head of `init_variables` needs values (`head_of`); the rest may be shapes."""
  return adapt_variables(load_variables(path), init_variables, source=path)


def adapt_variables(loaded: Mapping[str, Params], init_variables: Mapping[str, Params], *,
                    source: str = 'the checkpoint', keep_head: bool = False
                    ) -> Dict[str, Params]:
  """`adapt` for each collection; the file and the model must have the same collections."""
  if sorted(loaded) != sorted(init_variables):
    raise CheckpointError(
        f'{source} holds the collections {sorted(loaded)} but the model has '
        f'{sorted(init_variables)}; is it a checkpoint for another model family?')
  return {name: adapt(loaded[name], init, source=source, keep_head=keep_head)
          for name, init in init_variables.items()}


def adapt(restored_tree: Mapping[str, Any], init_params: Mapping[str, Any], *,
          source: str = 'the checkpoint', keep_head: bool = False) -> Params:
  """Fits loaded params to a model whose fresh params (or their shapes) are `init_params`.

  The head comes from `init_params` unless `keep_head`; `pre_logits` is dropped when the
  new model has none; position embeddings are resized to the new grid. Any other
  difference is an error naming the key and both shapes.
  """
  if is_bit_tree(restored_tree) != is_bit_tree(init_params):
    kinds = {True: 'a BiT ResNet', False: 'a ViT'}
    raise CheckpointError(
        f'{source} holds {kinds[is_bit_tree(restored_tree)]} checkpoint but the model is '
        f'{kinds[is_bit_tree(init_params)]}; choose the model name of the checkpoint.')
  restored = traverse_util.flatten_dict(dict(restored_tree), sep='/')
  expected = traverse_util.flatten_dict(dict(init_params), sep='/')
  result = {}
  for key, init_value in expected.items():
    if _HEAD.match(key) and not keep_head:
      result[key] = init_value
      continue
    if key not in restored and key.startswith('pre_logits/'):
      raise CheckpointError(
          f'{source} has no representation layer (pre_logits) but the model has one; '
          'build the model with representation_size=None.')
    if key not in restored:
      raise CheckpointError(
          f'{source} has no {key!r} (shape {init_value.shape}) that the model '
          f'needs; is it a checkpoint for another model? It holds e.g. '
          f'{sorted(restored)[:5]}.')
    value = np.asarray(restored[key])
    if key.endswith('posembed_input/pos_embedding') and value.shape != init_value.shape:
      value = interpolate_posembed(value, init_value.shape[1], 'cls' in init_params)
    if key.endswith('relative_position_bias_table') and value.shape != init_value.shape:
      value = _resize_bias_table(key, value, init_value.shape)
    if '/token_mixing/' in key and value.shape != init_value.shape:
      # Dense_0's kernel maps the patches: its first axis is their number.
      tokens = key.split('/token_mixing/')[0] + '/token_mixing/Dense_0/kernel'
      raise CheckpointError(
          f'{source} is a Mixer trained on {np.shape(restored[tokens])[0]} patches, but the '
          f'model has {expected[tokens].shape[0]} at this resolution: its token-mixing MLP is '
          'as wide as the patch count, so fine-tune at the pretraining resolution (set '
          'pp.crop to it, e.g. 224 for 16 px patches).')
    if value.shape != init_value.shape:
      raise CheckpointError(
          f'Shape mismatch for {key!r}: {source} has {value.shape}, the '
          f'model expects {init_value.shape}. Check the model name and its options.')
    result[key] = value.astype(init_value.dtype)
  extra = [k for k in restored if k not in expected and not _HEAD.match(k)
           and not k.startswith('pre_logits/')]
  if extra:
    raise CheckpointError(
        f'{source} has parameters the model lacks: {extra[:5]}; is it a checkpoint '
        'for another model?')
  if 'pre_logits/kernel' in restored and 'pre_logits/kernel' not in expected:
    logging.info('Dropping the pre_logits layer of %s', source)
  return traverse_util.unflatten_dict(result, sep='/')
