r"""The whole `main` command, ours against the official one, alternated (A B A B).

  git clone https://github.com/google-research/vision_transformer /tmp/official
  pip install --target /tmp/official-extra pandas   # the official checkpoint.py imports it
  python -m bench.compare_official_main --official=/tmp/official \
      --official_path=/tmp/official-extra --steps=30 --batch=32 --size=224

Both commands fine-tune the same ViT (a random start saved in the released `.npz` layout, so
both load the same file) on the same JPEG folder of real CIFAR-10 images from
`../shared/data`, with the same recipe (SGD momentum, warm-up + cosine, clipping at 1), the
same steps, batch and accumulation, and evaluate the whole test folder at the end. The
official `models_lit` (it needs flaxformer and tensorflow_text) is replaced by an empty module;
nothing else of the official code changes. Each round prints wall and CPU seconds (the
children's user + system time, which moves less than wall time when other jobs share the
cores) of each command and the ratios ours/official.
"""
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from absl import app, flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

_OFFICIAL = flags.DEFINE_string('official', None, 'A checkout of '
                                'google-research/vision_transformer (the folder holding vit_jax/).')
_OFFICIAL_PATH = flags.DEFINE_string('official_path', '', 'Extra PYTHONPATH for the official '
                                     'run (a folder holding pandas).')
_MODEL = flags.DEFINE_string('model', 'ti16', 'Short model name of both configs/vit.py.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Training steps.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch.')
_ACCUM = flags.DEFINE_integer('accum_steps', 1, 'Micro-batches per step.')
_SIZE = flags.DEFINE_integer('size', 224, 'Image size.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'A B rounds.')
_TEST_IMAGES = flags.DEFINE_integer('test_images', 0, 'Test images in the folder (0: all of '
                                    '../shared/data; a multiple of --batch makes both evaluate '
                                    'the same images, the official one dropping a remainder).')
_ROOT = flags.DEFINE_string('root', '', 'Scratch folder (default: a new temporary one).')
flags.mark_flag_as_required('official')

# The official `vit_jax.models` imports `models_lit` for LiT only; an empty stand-in keeps the
# rest of the official code as it is.
_OFFICIAL_MAIN = ('import runpy, sys, types; lit = types.ModuleType("vit_jax.models_lit"); '
                  'lit.LitModel = None; sys.modules["vit_jax.models_lit"] = lit; '
                  'runpy.run_module("vit_jax.main", run_name="__main__", alter_sys=True)')


def write_folder(root: pathlib.Path) -> pathlib.Path:
  """root/{train,test}/CLASS/*.jpg from the real CIFAR-10 images (the official reads JPEGs)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if (root / 'done').exists():
    return root  # Written by an earlier run with the same --root (and --test_images).
  cifar = np.load(SHARED_DATA / 'cifar10_partial.npz')
  test = slice(_TEST_IMAGES.value or None)
  for split, images, labels in (('train', cifar['x_train'], cifar['y_train']),
                                ('test', cifar['x_test'][test], cifar['y_test'][test])):
    for i, (image, label) in enumerate(zip(images, labels)):
      folder = root / split / f'class_{label}'
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f'{i:05d}.jpg', quality=95)
  (root / 'done').touch()
  return root


def write_start(directory: pathlib.Path, model_name: str) -> None:
  """A random start of `model_name` in the released layout, which both loaders read."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vit_jax_ft import checkpoint, models  # pylint: disable=import-outside-toplevel
  path = directory / f'{model_name}.npz'
  model = models.get_model(model_name, 21843)
  size = _SIZE.value  # Its position embeddings need no resize.
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                      train=False))()['params']
  checkpoint.save(jax.device_get(params), str(path))


def common_flags(folder: pathlib.Path, start: pathlib.Path) -> List[str]:
  """The recipe keys both configs name the same way."""
  values = {'dataset': folder, 'pretrained_dir': start, 'total_steps': _STEPS.value,
            'warmup_steps': max(1, _STEPS.value // 10), 'batch': _BATCH.value,
            'batch_eval': _BATCH.value, 'accum_steps': _ACCUM.value, 'pp.crop': _SIZE.value,
            'eval_every': 0, 'progress_every': 10, 'checkpoint_every': 0, 'shuffle_buffer': 1000}
  return [f'--config.{key}={value}' for key, value in values.items()]


def commands(root: pathlib.Path, folder: pathlib.Path, start: pathlib.Path
             ) -> Dict[str, Tuple[List[str], Dict[str, str]]]:
  """(argv, environment) of each side; each writes a fresh workdir per round."""
  official = pathlib.Path(_OFFICIAL.value).resolve()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  official_env = dict(env, PYTHONPATH=os.pathsep.join(
      p for p in (str(official), _OFFICIAL_PATH.value) if p))
  return {
      'official': ([sys.executable, '-c', _OFFICIAL_MAIN,
                    f'--config={official}/vit_jax/configs/vit.py:{_MODEL.value},cifar10',
                    *common_flags(folder, start)], official_env),
      'ours': ([sys.executable, '-m', 'vit_jax_ft.main',
                f'--config={REPO}/configs/vit.py:{_MODEL.value},cifar10', '--config.pp.train=train',
                *common_flags(folder, start)], env),
  }


def run(argv: List[str], env: Dict[str, str], workdir: pathlib.Path) -> Tuple[float, float]:
  """Wall and children's CPU seconds of one command; its output goes to `workdir`.log."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  result = subprocess.run(argv + [f'--workdir={workdir}'], env=env, cwd=workdir.parent,
                          capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  workdir.with_suffix('.log').write_text(result.stdout + result.stderr)
  if result.returncode:
    raise RuntimeError(f'{argv[:3]} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv):
  del argv
  if not (pathlib.Path(_OFFICIAL.value) / 'vit_jax' / 'main.py').exists():
    raise app.UsageError(f'--official={_OFFICIAL.value} has no vit_jax/main.py; pass the folder '
                         'of a google-research/vision_transformer checkout.')
  if not (SHARED_DATA / 'cifar10_partial.npz').exists():
    raise app.UsageError(f'{SHARED_DATA}/cifar10_partial.npz is missing (the real images).')
  from configs.vit import SHORT_NAMES  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(_ROOT.value or tempfile.mkdtemp(prefix='compare_main_'))
  folder = write_folder(root / 'cifar10_jpeg')
  start = root / 'start'
  start.mkdir(parents=True, exist_ok=True)
  write_start(start, SHORT_NAMES.get(_MODEL.value, _MODEL.value))
  sides = commands(root, folder, start)
  times = {name: [] for name in sides}
  for round_index in range(_ROUNDS.value):
    for name, (command, env) in sides.items():
      workdir = root / f'{name}_{round_index}'
      wall, cpu = run(command, env, workdir)
      times[name].append((wall, cpu))
      print(f'round {round_index} {name:8s} wall {wall:7.1f} s  cpu {cpu:7.1f} s', flush=True)
  medians = {name: [statistics.median(t[i] for t in values) for i in range(2)]
             for name, values in times.items()}
  print(f'{_MODEL.value} {_STEPS.value} steps batch {_BATCH.value} accum {_ACCUM.value} at '
        f'{_SIZE.value} px, median of {_ROUNDS.value}: ours/official wall '
        f'{medians["ours"][0] / medians["official"][0]:.2f}, cpu '
        f'{medians["ours"][1] / medians["official"][1]:.2f}')


if __name__ == '__main__':
  app.run(main)
