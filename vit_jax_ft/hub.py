r"""The public checkpoints by name, and the command that downloads them.

  python -m vit_jax_ft.hub list [--filter=B_16]
  python -m vit_jax_ft.hub fetch imagenet21k/ViT-B_16 [--dest=checkpoints]

Names: `imagenet21k/ViT-B_16`, `imagenet21k+imagenet2012/ViT-B_16` (384 px; the
`-224` names are fine-tuned at 224 px), `augreg/<filename>` (any file of
`gs://vit_models/augreg`; `augreg/B_16` is the one the README recommends),
`BiT-M-R50x1`, `BiT-M-R50x1-ILSVRC2012`, `BiT-S-R50x1`, ..., the Mixers of
`gs://mixer_models` (`imagenet21k/Mixer-B_16`, `imagenet1k/Mixer-L_16`, `sam/Mixer-B_32`),
and timm's weights on the Hugging Face Hub: `timm/<model name>` (timm's default tag of
`swin_*`, `resnet*`, `mixer_*`) and `timm/<model name>.<tag>` (`.ms_in22k`, `.tv_in1k`, ...).

A file lands in `<dest>/<path in the bucket>` (`checkpoints/imagenet21k/ViT-B_16.npz`,
`checkpoints/augreg/...`, `checkpoints/bit_models/BiT-M-R50x1.npz`,
`checkpoints/imagenet21k/Mixer-B_16.npz`), timm's in `<dest>/timm/<model name>[.<tag>]
.safetensors`: where `pretrained_dir=<dest>/imagenet21k` (or `<dest>/timm`) finds the model
name's file. It is downloaded into `<file>.partial`, which a later run resumes (HTTP Range),
checked against the size the server announced, and renamed into place. The server is
`--hub_url`, else `$VIT_JAX_FT_HUB_URL` (a mirror of both), else Google Cloud Storage and
the Hugging Face Hub (`$HF_ENDPOINT` if set).
"""
import csv
import dataclasses
import difflib
import io
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from typing import Callable, Dict, List, Optional, Tuple

from absl import app, flags, logging
import tqdm

from vit_jax_ft.models import AUGREG_NAMES

DEFAULT_HUB_URL = 'https://storage.googleapis.com'
HUB_URL_ENV = 'VIT_JAX_FT_HUB_URL'
# Each file's own server unless `--hub_url` or $VIT_JAX_FT_HUB_URL says otherwise:
# (the environment variable that moves it, its address).
SERVERS = {'gcs': (None, DEFAULT_HUB_URL), 'hf': ('HF_ENDPOINT', 'https://huggingface.co'),
           'shi': (None, 'https://shi-labs.com')}
# Seconds to connect and to wait for each read: offline, a fetch fails fast.
TIMEOUT_S = 10.0
_CHUNK_BYTES = 1 << 20

# The files of gs://vit_models/imagenet21k and .../imagenet21k+imagenet2012
# (listed in the official vit_jax.ipynb).
_IMAGENET21K = ('ViT-B_16', 'ViT-B_32', 'ViT-B_8', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14',
                'R26+ViT-B_32', 'R50+ViT-B_16', 'R50+ViT-L_32')
_IMAGENET21K_2012 = ('ViT-B_16', 'ViT-B_16-224', 'ViT-B_32', 'ViT-B_8', 'ViT-L_16',
                     'ViT-L_16-224', 'ViT-L_32', 'R50+ViT-B_16')
# The AugReg checkpoints recommended in the official README: per model, the
# ImageNet-21k checkpoint with the best upstream metrics and its ImageNet
# fine-tune at 384 px (`<upstream>--<fine-tune>`). Used offline; online, a
# model's short name picks from index.csv as the official code does.
AUGREG_RECOMMENDED: Dict[str, Tuple[str, Optional[str]]] = {
    'L_16': ('L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0',
             'imagenet2012-steps_20k-lr_0.01-res_384'),
    'B_16': ('B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0',
             'imagenet2012-steps_20k-lr_0.03-res_384'),
    'S_16': ('S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0',
             'imagenet2012-steps_20k-lr_0.03-res_384'),
    'R50_L_32': ('R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1',
                 'imagenet2012-steps_20k-lr_0.01-res_384'),
    'R26_S_32': ('R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0',
                 'imagenet2012-steps_20k-lr_0.01-res_384'),
    'Ti_16': ('Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0',
              'imagenet2012-steps_20k-lr_0.03-res_384'),
    'B_32': ('B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0',
             'imagenet2012-steps_20k-lr_0.01-res_384'),
    'S_32': ('S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0',
             'imagenet2012-steps_20k-lr_0.01-res_384'),
    'R_Ti_16': ('R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0',
                'imagenet2012-steps_20k-lr_0.03-res_384'),
    # Added 2021-07-29, fine-tuned at 224 px only (index.csv names those fine-tunes).
    'B_8': ('B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0', None),
}
# BiT (google-research/big_transfer): BiT-S (ILSVRC-2012) and BiT-M
# (ImageNet-21k); only BiT-M also comes fine-tuned on ILSVRC-2012.
_BIT_ARCHITECTURES = ('R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x2', 'R152x4')
# gs://mixer_models (the official vit_jax.ipynb's listing): folder -> Mixers.
_MIXERS = {'imagenet21k': ('Mixer-B_16', 'Mixer-L_16'), 'imagenet1k': ('Mixer-B_16', 'Mixer-L_16'),
           'sam': ('Mixer-B_16', 'Mixer-B_32'), 'gsam': ('Mixer-B_16', 'Mixer-B_32')}
# timm's tags (pretrained_cfg hf_hub_id `timm/<name>.<tag>`) per name, timm's default first;
# the others share its input convention (resnet's torchvision `tv_in1k`: bilinear, 0.875).
TIMM_TAGS: Dict[str, Tuple[str, ...]] = {
    'swin_tiny_patch4_window7_224': ('ms_in1k', 'ms_in22k', 'ms_in22k_ft_in1k'),
    'swin_small_patch4_window7_224': ('ms_in22k_ft_in1k', 'ms_in22k', 'ms_in1k'),
    'swin_base_patch4_window7_224': ('ms_in22k_ft_in1k', 'ms_in22k', 'ms_in1k'),
    'swin_base_patch4_window12_384': ('ms_in22k_ft_in1k', 'ms_in22k', 'ms_in1k'),
    'swin_large_patch4_window7_224': ('ms_in22k_ft_in1k', 'ms_in22k'),
    'swin_large_patch4_window12_384': ('ms_in22k_ft_in1k', 'ms_in22k'),
    'resnet50': ('a1_in1k', 'tv_in1k'),
    'resnet101': ('a1h_in1k', 'tv_in1k'),
    'resnet152': ('a1h_in1k', 'tv_in1k'),
    'mixer_b16_224': ('goog_in21k_ft_in1k', 'goog_in21k'),
    'mixer_l16_224': ('goog_in21k_ft_in1k', 'goog_in21k'),
    'maxvit_tiny_tf_224': ('in1k',),
    'maxvit_small_tf_224': ('in1k',),
    'maxvit_base_tf_224': ('in1k',),  # Its in21k tag is normalised to [-1, 1]: left out.
    'maxvit_base_tf_384': ('in1k', 'in21k_ft_in1k'),
    'davit_tiny': ('msft_in1k',),
    'davit_small': ('msft_in1k',),
    'davit_base': ('msft_in1k',),
}
# The authors' NAT and DiNAT ImageNet-1k files (SHI-Labs/Neighborhood-Attention-Transformer's
# README), PyTorch state dicts: name -> path on shi-labs.com.
_NATS = {**{f'nat_{size}': f'projects/nat/checkpoints/CLS/nat_{size}.pth'
            for size in ('mini', 'tiny', 'small', 'base')},
         **{f'dinat_{size}': f'projects/dinat/checkpoints/imagenet1k/dinat_{size}_in1k_224.pth'
            for size in ('mini', 'tiny', 'small', 'base')}}
# Bucket folders left out of the local path (`vit_models/imagenet21k/...` -> `imagenet21k/...`).
_BUCKETS = ('vit_models/', 'mixer_models/')


class UnknownCheckpointError(ValueError):
  """A name that is neither a file nor a public checkpoint."""


class FetchError(OSError):
  """A download that failed; the message says how to finish it."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A public checkpoint: its name, its path under the hub URL, its model."""

  name: str
  path: str  # Under the hub URL: `vit_models/imagenet21k/ViT-B_16.npz`.
  model_name: Optional[str]  # As in `models.get_model`; None if not registered.
  server: str = 'gcs'  # A key of SERVERS.
  local: str = ''  # Its path under `dest`; '' for the bucket path less `vit_models/`.

  @property
  def local_path(self) -> str:
    """Where it lives under `dest`: `local`, else its bucket path less the bucket folder."""
    return self.local or next((self.path.removeprefix(b) for b in _BUCKETS
                               if self.path.startswith(b)), self.path)


def augreg_checkpoint(filename: str) -> Checkpoint:
  """The AugReg file `filename` (its prefix, `B_16` in `B_16-i21k-...`, names the model)."""
  return Checkpoint(f'augreg/{filename}', f'vit_models/augreg/{filename}.npz',
                    AUGREG_NAMES.get(filename.split('-')[0]))


def _build_index() -> Dict[str, Checkpoint]:
  """Every public checkpoint that needs no network to name."""
  entries = [Checkpoint(f'imagenet21k/{m}', f'vit_models/imagenet21k/{m}.npz', m)
             for m in _IMAGENET21K]
  entries += [Checkpoint(f'imagenet21k+imagenet2012/{m}',
                         f'vit_models/imagenet21k+imagenet2012/{m}.npz',
                         m.removesuffix('-224')) for m in _IMAGENET21K_2012]
  for upstream, finetune in AUGREG_RECOMMENDED.values():
    entries.append(augreg_checkpoint(upstream))
    if finetune:
      entries.append(augreg_checkpoint(f'{upstream}--{finetune}'))
  for kind in ('BiT-S', 'BiT-M'):
    for arch in _BIT_ARCHITECTURES:
      suffixes = ('', '-ILSVRC2012') if kind == 'BiT-M' else ('',)
      entries += [Checkpoint(f'{kind}-{arch}{s}', f'bit_models/{kind}-{arch}{s}.npz',
                             f'{kind}-{arch}') for s in suffixes]
  entries += [Checkpoint(f'{folder}/{m}', f'mixer_models/{folder}/{m}.npz', m)
              for folder, names in _MIXERS.items() for m in names]
  for model, tags in TIMM_TAGS.items():
    for i, tag in enumerate(tags):
      name = f'timm/{model}' if i == 0 else f'timm/{model}.{tag}'  # The default: its name.
      entries.append(Checkpoint(name, f'timm/{model}.{tag}/resolve/main/model.safetensors',
                                model, 'hf', f'{name}.safetensors'))
  entries += [Checkpoint(f'nat/{m}', path, m, 'shi', f'nat/{m}.pth') for m, path in _NATS.items()]
  return {c.name: c for c in entries}


INDEX: Dict[str, Checkpoint] = _build_index()
# timm's full hf_hub_id of each default tag names the same file as the model name.
ALIASES = {f'timm/{model}.{tags[0]}': f'timm/{model}' for model, tags in TIMM_TAGS.items()}


def hub_url(url: Optional[str] = None, server: str = 'gcs') -> str:
  """The server: `url`, else `$VIT_JAX_FT_HUB_URL`, else the file's own (GCS, Hugging Face)."""
  variable, default = SERVERS[server]
  own = os.environ.get(variable) if variable else None
  return (url or os.environ.get(HUB_URL_ENV) or own or default).rstrip('/')


def lookup(name: str) -> Checkpoint:
  """The checkpoint called `name` (extension optional; AugReg also by bare filename)."""
  stem = name.removesuffix('.npz').removesuffix('.safetensors')
  stem = ALIASES.get(stem, stem)
  if stem in INDEX:
    return INDEX[stem]
  filename = stem.removeprefix('augreg/')
  if filename in AUGREG_RECOMMENDED:
    return augreg_checkpoint(AUGREG_RECOMMENDED[filename][0])
  prefix = filename.split('-')[0]
  if '-' in filename and (prefix in AUGREG_NAMES or prefix in AUGREG_RECOMMENDED):
    return augreg_checkpoint(filename)
  close = difflib.get_close_matches(stem, INDEX, n=5, cutoff=0.6)
  hint = f' Did you mean: {", ".join(close)}?' if close else ''
  raise UnknownCheckpointError(
      f'{name!r} is neither a file nor a public checkpoint name.{hint} List the '
      'names with `python -m vit_jax_ft.hub list`.')


def pretrained_file(model_name: str) -> Optional[Checkpoint]:
  """The public file that `pretrained_dir` finds for `model_name`: the first whose local name is
  `{model_name}.npz` (official), `.safetensors` (timm's default tag) or `.pth` (NAT's)."""
  files = {f'{model_name}{extension}' for extension in FORMATS}
  return next((c for c in INDEX.values()
               if c.model_name == model_name and os.path.basename(c.local_path) in files), None)


def checkpoint_url(name: str, url: Optional[str] = None) -> str:
  """The download URL of the public checkpoint `name`."""
  checkpoint = lookup(name)
  return f'{hub_url(url, checkpoint.server)}/{checkpoint.path}'


def _place_by_hand(url: str, target: str) -> str:
  """The hint for offline machines: where the file goes."""
  return (f'Without network access, download {url} elsewhere and place it at '
          f'{os.path.abspath(target)}.')


def _open(url: str, offset: int, timeout: float):
  """Opens `url` from byte `offset` on (a Range request when offset > 0)."""
  headers = {'Range': f'bytes={offset}-'} if offset else {}
  return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout)


def _expected_size(response, offset: int) -> Tuple[int, Optional[int]]:
  """(byte the body starts at, total size of the file or None if unannounced)."""
  if response.status == 206:
    m = re.fullmatch(r'bytes (\d+)-\d+/(\d+)', response.headers.get('Content-Range', ''))
    if not m or int(m.group(1)) != offset:
      raise FetchError(f'{response.url} answered bytes '
                       f'{response.headers.get("Content-Range")!r} to a request for '
                       f'bytes {offset}-; delete the .partial file and fetch again.')
    return offset, int(m.group(2))
  length = response.headers.get('Content-Length')
  return 0, int(length) if length is not None else None


def is_safetensors(path: str) -> bool:
  """Whether `path` starts as a .safetensors file: an 8-byte header size, then its JSON."""
  with open(path, 'rb') as f:
    head = f.read(9)
  return (len(head) == 9 and head[8:] == b'{'
          and 8 + int.from_bytes(head[:8], 'little') <= os.path.getsize(path))


def is_torch_file(path: str) -> bool:
  """Whether `path` is a `torch.save` file: a zip archive, or a pickle of older torch."""
  with open(path, 'rb') as f:
    return zipfile.is_zipfile(path) or f.read(1) == b'\x80'


# What a downloaded file must look like, by extension.
FORMATS: Dict[str, Callable[[str], bool]] = {'.npz': zipfile.is_zipfile,
                                             '.safetensors': is_safetensors,
                                             '.pth': is_torch_file}


def download(url: str, target: str, timeout: float = TIMEOUT_S) -> None:
  """Downloads `url` to `target` via `target.partial`: resumed, size-checked, renamed atomically."""
  partial = target + '.partial'
  os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
  offset = os.path.getsize(partial) if os.path.exists(partial) else 0
  try:
    response = _open(url, offset, timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and offset:  # The partial file is not a prefix of this file.
      logging.warning('%s does not fit %s; downloading from the start.', partial, url)
      os.remove(partial)
      return download(url, target, timeout)
    raise FetchError(f'{url}: HTTP {e.code} {e.reason}. Check the name with '
                     '`python -m vit_jax_ft.hub list`.') from e
  except OSError as e:  # No connection: refused, DNS failure, timeout.
    reason = getattr(e, 'reason', e)
    raise FetchError(f'Could not reach {url} ({reason}). '
                     + _place_by_hand(url, target)) from e
  with response:
    start, total = _expected_size(response, offset)
    if offset and not start:
      logging.warning('%s ignored the Range request; downloading from the start.', url)
    with open(partial, 'ab' if start else 'wb') as f, tqdm.tqdm(
        total=total, initial=start, unit='B', unit_scale=True, unit_divisor=1024,
        desc=os.path.basename(target)) as bar:
      try:
        while chunk := response.read(_CHUNK_BYTES):
          f.write(chunk)
          bar.update(len(chunk))
      except OSError as e:
        raise FetchError(f'Download of {url} interrupted ({e}); run the same fetch '
                         f'again to resume from {partial}.') from e
  size = os.path.getsize(partial)
  if total is not None and size != total:
    if size > total:
      os.remove(partial)
    raise FetchError(
        f'{url}: received {size:,} bytes but the server announced {total:,}. '
        + ('Run the same fetch again to resume.' if size < total else
           'The partial file was removed; run the fetch again.'))
  kind = os.path.splitext(target)[1]
  if not FORMATS[kind](partial):
    os.remove(partial)
    raise FetchError(f'{url} did not return an {kind} file. ' + _place_by_hand(url, target))
  os.replace(partial, target)



def _augreg_model(name: str) -> Optional[str]:
  """The model prefix of an AugReg short name (`augreg/B_16`, `B_16`), else None."""
  stem = name.removesuffix('.npz').removeprefix('augreg/')
  return stem if stem in AUGREG_RECOMMENDED else None


def best_augreg(model: str, rows: List[Dict[str, str]]) -> Optional[str]:
  """The official choice for `model` (`B_16`): its i21k checkpoint with the best final_val."""
  candidates = [r for r in rows
                if r.get('filename', '').split('-')[0] == model and r.get('ds') == 'i21k']
  if not candidates:
    return None
  return max(candidates, key=lambda r: float(r['final_val']))['filename']


def pick(name: str, url: Optional[str] = None, timeout: float = TIMEOUT_S) -> Checkpoint:
  """`lookup`, except that an AugReg short name picks from index.csv when it is reachable."""
  model = _augreg_model(name)
  if model is None:
    return lookup(name)
  rows = read_augreg_rows(url, timeout)
  filename = best_augreg(model, rows) if rows else None
  if filename is None:
    logging.info('AugReg %s: index.csv unavailable or silent; using the README\'s choice.',
                 model)
    return lookup(name)
  logging.info('AugReg %s: selected %s (the best final_val of index.csv\'s i21k rows).',
               model, filename)
  return augreg_checkpoint(filename)


def fetch(name: str, dest: str = 'checkpoints', url: Optional[str] = None,
          timeout: float = TIMEOUT_S) -> str:
  """Downloads the public checkpoint `name` into `dest` unless present; returns its path."""
  checkpoint = pick(name, url, timeout)
  target = os.path.join(dest, checkpoint.local_path)
  if not os.path.exists(target):
    download(f'{hub_url(url, checkpoint.server)}/{checkpoint.path}', target, timeout)
  return target


def resolve(name_or_path: str, dest: str = 'checkpoints', fetch_missing: bool = True) -> str:
  """A readable checkpoint path: `name_or_path` itself if a file or URL, else the named one.

  Named checkpoints are looked for in `dest` and fetched there when absent
  (with `fetch_missing=True`).
  """
  if os.path.exists(name_or_path) or re.match(r'^(gs|https?)://', name_or_path):
    return name_or_path
  checkpoint = pick(name_or_path)
  target = os.path.join(dest, checkpoint.local_path)
  if os.path.exists(target):
    return target
  if not fetch_missing:
    raise FileNotFoundError(
        f'{name_or_path} is not at {target}. Fetch it with `python -m vit_jax_ft.hub '
        f'fetch {checkpoint.name} --dest={dest}`. '
        + _place_by_hand(f'{hub_url(server=checkpoint.server)}/{checkpoint.path}', target))
  return fetch(checkpoint.name, dest)


def read_augreg_rows(url: Optional[str] = None,
                     timeout: float = TIMEOUT_S) -> Optional[List[Dict[str, str]]]:
  """The rows of `vit_models/augreg/index.csv` (a row per fine-tune), or None if unreachable."""
  try:
    with urllib.request.urlopen(f'{hub_url(url)}/vit_models/augreg/index.csv',
                                timeout=timeout) as response:
      text = response.read().decode('utf-8')
  except OSError as e:
    logging.info('AugReg index.csv unreachable: %s', e)
    return None
  return list(csv.DictReader(io.StringIO(text)))


def read_augreg_index(url: Optional[str] = None,
                      timeout: float = TIMEOUT_S) -> Optional[List[str]]:
  """The upstream filenames in `vit_models/augreg/index.csv`, or None if unreachable."""
  rows = read_augreg_rows(url, timeout)
  if rows is None:
    return None
  return sorted({row['filename'] for row in rows if row.get('filename')})


def list_checkpoints(url: Optional[str] = None,
                     timeout: float = TIMEOUT_S) -> Tuple[List[Checkpoint], bool]:
  """The index plus every upstream AugReg file of index.csv, and whether it was read."""
  augreg = read_augreg_index(url, timeout)
  extra = [augreg_checkpoint(f) for f in augreg or () if f'augreg/{f}' not in INDEX]
  return list(INDEX.values()) + extra, augreg is not None


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run, to keep importers' flags clean)."""
  flags.DEFINE_string('filter', '', 'list: only names containing this text.')
  flags.DEFINE_string('dest', 'checkpoints', 'Folder that holds the checkpoints.')
  flags.DEFINE_string('hub_url', None, f'Server of the buckets (default: ${HUB_URL_ENV}, '
                      f'else {DEFAULT_HUB_URL}).')
  flags.DEFINE_float('timeout', TIMEOUT_S, 'Seconds to connect and to wait per read.')


def _list_command(args: List[str]) -> None:
  """Prints the names (`*`: already in --dest) with their model names."""
  if args:
    raise app.UsageError(f'list takes no arguments, got {args}; use --filter=TEXT.')
  checkpoints, from_index = list_checkpoints(FLAGS.hub_url, FLAGS.timeout)
  print(f'  {"model":30s} name   (* = already in {FLAGS.dest}/)')
  for c in checkpoints:
    if FLAGS.filter in c.name:
      present = os.path.exists(os.path.join(FLAGS.dest, c.local_path))
      print(f'{"*" if present else " "} {c.model_name or "-":30s} {c.name}')
  if not from_index:
    print('(augreg/index.csv was unreachable: AugReg shows only the README\'s '
          'recommended files; any augreg/<filename> can still be fetched.)')


def _fetch_command(args: List[str]) -> None:
  """Downloads each named checkpoint into --dest."""
  if not args:
    raise app.UsageError('fetch needs a checkpoint name; see `python -m vit_jax_ft.hub list`.')
  for name in args:
    print(fetch(name, FLAGS.dest, FLAGS.hub_url, FLAGS.timeout))


COMMANDS: Dict[str, Callable[[List[str]], None]] = {
    'list': _list_command, 'fetch': _fetch_command}


def main(argv: List[str]) -> None:
  """Runs `list` or `fetch`; a failed fetch exits with its message, not a traceback."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'Give a command: {" or ".join(COMMANDS)}.')
  try:
    COMMANDS[argv[1]](argv[2:])
  except (UnknownCheckpointError, FetchError) as e:
    sys.exit(f'Error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
