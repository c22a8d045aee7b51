r"""Our training step against the official `vit_jax` one, alternated in one process.

  git clone https://github.com/google-research/vision_transformer /tmp/official
  python -m bench.compare_official --official=/tmp/official --model=ViT-Ti_16 --batch=32 \
      --accum_steps=1,8

Both steps train the same architecture (the official `models_vit.VisionTransformer` and
ours) at the same resolution, batch, classes and accumulation, with the same optax chain
(clip at norm 1, SGD momentum 0.9 with a bfloat16 accumulator, warm-up + cosine). The
official step is its `train.make_update_fn` (pmap + `utils.accumulate_gradient`), taken
from the checkout's source; ours is `train.train_step` under `jax.jit` as
`train_and_evaluate` sets it up. Rounds alternate A B A B so that drift hits both; each
prints the median step time (wall and process CPU), the ratio ours/official and both
compile times.
"""
import pathlib
import statistics
import time
from typing import Tuple

from absl import app, flags
import jax

from bench import steps
from vit_jax_ft import memory

_OFFICIAL = flags.DEFINE_string('official', None, 'A checkout of '
                                'google-research/vision_transformer (the folder holding vit_jax/).')
_MODEL = flags.DEFINE_string('model', 'ViT-Ti_16', 'Official model name (ViT-Ti_16, ViT-B_16).')
_SIZE = flags.DEFINE_integer('size', 224, 'Image size.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch per step.')
_ACCUM = flags.DEFINE_list('accum_steps', ['1', '8'], 'Micro-batches per step, one case each.')
_CLASSES = flags.DEFINE_integer('classes', 10, 'Number of classes.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'A B rounds per case.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed steps per round.')
flags.mark_flag_as_required('official')


def timed(run: steps.Step) -> Tuple[float, float]:
  """Median wall and process CPU seconds of `--steps` steps (CPU time barely moves when other
  processes share the cores; wall time does)."""
  wall, cpu = [], []
  for _ in range(_STEPS.value):
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def main(argv):
  memory.hide_gpus_from_tensorflow()
  del argv
  root = pathlib.Path(_OFFICIAL.value).expanduser().resolve()
  if not (root / 'vit_jax' / 'train.py').exists():
    raise app.UsageError(f'--official={root} has no vit_jax/train.py; pass the folder of a '
                         'google-research/vision_transformer checkout.')
  if _MODEL.value not in steps.OFFICIAL_CONFIGS:
    raise app.UsageError(f'--model={_MODEL.value}; known: '
                         f'{sorted(steps.OFFICIAL_CONFIGS)}.')
  print(f'devices: {jax.devices()[0].device_kind}; jax {jax.__version__}; '
        f'{_MODEL.value} {_SIZE.value}px batch {_BATCH.value} classes {_CLASSES.value}')
  batch = steps.data(_BATCH.value, _SIZE.value, _CLASSES.value)
  for accum in map(int, _ACCUM.value):
    ours, _, ours_compile = steps.compile_seconds(
        lambda: steps.our_step(_MODEL.value, _CLASSES.value, accum, batch))
    official, _, official_compile = steps.compile_seconds(
        lambda: steps.official_step(root, _MODEL.value, _CLASSES.value, accum, batch))
    ours(), official()  # Warm-up.
    a, b = [], []
    for _ in range(_ROUNDS.value):
      a.append(timed(ours))
      b.append(timed(official))
    (wa, ca), (wb, cb) = [tuple(map(statistics.median, zip(*t))) for t in (a, b)]
    print(f'accum_steps {accum}: wall ours {wa:.3f}s official {wb:.3f}s ratio {wa / wb:.2f}; '
          f'CPU ours {ca:.3f}s official {cb:.3f}s ratio {ca / cb:.2f}; compile ours '
          f'{ours_compile:.1f}s official {official_compile:.1f}s', flush=True)


if __name__ == '__main__':
  app.run(main)
