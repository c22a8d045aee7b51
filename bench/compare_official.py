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
prints the median step time, the ratio ours/official and both compile times.
"""
import ast
import functools
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, Tuple

from absl import app, flags
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax_ft import defaults, memory, models, optim, train

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

# Our names -> the official `configs/models.py` getters.
OFFICIAL_CONFIGS = {'ViT-Ti_16': 'get_ti16_config', 'ViT-S_16': 'get_s16_config',
                    'ViT-B_16': 'get_b16_config', 'ViT-L_16': 'get_l16_config',
                    'testing': 'get_testing_config'}

Step = Callable[[], None]


def official_update_fn(root: pathlib.Path):
  """`make_update_fn` from the checkout's `vit_jax/train.py`, without its heavy imports."""
  from vit_jax import utils  # pylint: disable=import-outside-toplevel
  source = (root / 'vit_jax' / 'train.py').read_text()
  tree = ast.parse(source)
  node = next(n for n in tree.body
              if isinstance(n, ast.FunctionDef) and n.name == 'make_update_fn')
  namespace = dict(jax=jax, jnp=jnp, optax=optax, utils=utils)
  exec(compile(ast.Module([node], []), str(root / 'vit_jax' / 'train.py'), 'exec'),  # pylint: disable=exec-used
       namespace)
  return namespace['make_update_fn']


def recipe() -> Tuple[object, optax.GradientTransformation]:
  """Our config and optax chain; the official chain is the same (clip 1, SGD 0.9, bf16)."""
  config = defaults.get_config()
  config.total_steps, config.warmup_steps = 100, 10
  return config, optim.make_optimizer(config)


def data(batch: int, size: int, classes: int) -> Dict[str, np.ndarray]:
  """A random batch of images in [-1, 1] and integer labels."""
  rng = np.random.default_rng(0)
  return {'image': rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
          'label': rng.integers(0, classes, batch).astype(np.int32)}


def official_step(root: pathlib.Path, accum: int, batch: Dict[str, np.ndarray]
                  ) -> Tuple[Step, float]:
  """The official update on one device; returns (run one step, compile seconds)."""
  from vit_jax import models_vit  # pylint: disable=import-outside-toplevel
  from vit_jax.configs import models as model_configs  # pylint: disable=import-outside-toplevel
  model_config = getattr(model_configs, OFFICIAL_CONFIGS[_MODEL.value])()
  model = models_vit.VisionTransformer(num_classes=_CLASSES.value, **model_config)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + batch['image']
                                                                         .shape[1:]),
                                      train=False)['params'])()
  _, tx = recipe()
  update_fn = official_update_fn(root)(apply_fn=model.apply, accum_steps=accum, tx=tx)
  state = {'params': flax.jax_utils.replicate(params, jax.local_devices()[:1])}
  state['opt'] = jax.pmap(tx.init)(state['params'])
  # Its input: one-hot labels and a leading axis of one device.
  shard = flax.jax_utils.replicate(
      {'image': batch['image'], 'label': np.eye(_CLASSES.value, dtype=np.float32)[batch['label']]},
      jax.local_devices()[:1])
  state['rng'] = flax.jax_utils.replicate(jax.random.PRNGKey(0), jax.local_devices()[:1])
  t0 = time.perf_counter()
  compiled = update_fn.lower(state['params'], state['opt'], shard, state['rng']).compile()
  compile_s = time.perf_counter() - t0

  def run():
    state['params'], state['opt'], loss, state['rng'] = compiled(
        state['params'], state['opt'], shard, state['rng'])
    jax.block_until_ready(loss)
  return run, compile_s


def our_step(accum: int, batch: Dict[str, np.ndarray]) -> Tuple[Step, float]:
  """Our update as `train_and_evaluate` jits it; returns (run one step, compile seconds)."""
  config, tx = recipe()
  config.model_name, config.accum_steps, config.pp.crop = _MODEL.value, accum, _SIZE.value
  model = train.build_model(config, _CLASSES.value)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  state = train.create_train_state(config, model, tx, mesh)
  step_fn = train.jit_train_step(model, tx, accum_steps=accum, seed=config.seed)
  batch = jax.device_put(batch)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)
  return run, compile_s


def timed(run: Step) -> float:
  """Median seconds of `--steps` steps."""
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  memory.hide_gpus_from_tensorflow()
  del argv
  root = pathlib.Path(_OFFICIAL.value).expanduser().resolve()
  if not (root / 'vit_jax' / 'train.py').exists():
    raise app.UsageError(f'--official={root} has no vit_jax/train.py; pass the folder of a '
                         'google-research/vision_transformer checkout.')
  sys.path.insert(0, str(root))  # Its `vit_jax` package.
  if _MODEL.value not in OFFICIAL_CONFIGS:
    raise app.UsageError(f'--model={_MODEL.value}; known: {sorted(OFFICIAL_CONFIGS)}.')
  print(f'devices: {jax.devices()[0].device_kind}; jax {jax.__version__}; '
        f'{_MODEL.value} {_SIZE.value}px batch {_BATCH.value} classes {_CLASSES.value}')
  batch = data(_BATCH.value, _SIZE.value, _CLASSES.value)
  for accum in map(int, _ACCUM.value):
    ours, ours_compile = our_step(accum, batch)
    official, official_compile = official_step(root, accum, batch)
    ours(), official()  # Warm-up.
    a, b = [], []
    for _ in range(_ROUNDS.value):
      a.append(timed(ours))
      b.append(timed(official))
    ta, tb = statistics.median(a), statistics.median(b)
    print(f'accum_steps {accum}: ours {ta:.3f}s official {tb:.3f}s ratio {ta / tb:.2f}  '
          f'(compile ours {ours_compile:.1f}s official {official_compile:.1f}s; '
          f'rounds ours {["%.2f" % t for t in a]} official {["%.2f" % t for t in b]})',
          flush=True)


if __name__ == '__main__':
  app.run(main)
