"""The two training steps the benchmarks time: the official `vit_jax` one and ours."""
import ast
import pathlib
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax_ft import defaults, optim, parallel, train

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
  code = compile(ast.Module([node], []), str(root / 'vit_jax' / 'train.py'), 'exec')
  exec(code, namespace)  # pylint: disable=exec-used
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


def official_step(root: pathlib.Path, name: str, classes: int, accum: int,
                  batch: Dict[str, np.ndarray]) -> Tuple[Step, Any]:
  """The official update (float32, its only dtype) on one device: (run one step, compiled)."""
  sys.path.insert(0, str(root))  # Its `vit_jax` package.
  from vit_jax import models_vit  # pylint: disable=import-outside-toplevel
  from vit_jax.configs import models as model_configs  # pylint: disable=import-outside-toplevel
  model_config = getattr(model_configs, OFFICIAL_CONFIGS[name])()
  model = models_vit.VisionTransformer(num_classes=classes, **model_config)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + batch['image']
                                                                         .shape[1:]),
                                      train=False)['params'])()
  _, tx = recipe()
  update_fn = official_update_fn(root)(apply_fn=model.apply, accum_steps=accum, tx=tx)
  devices = jax.local_devices()[:1]
  state = {'params': flax.jax_utils.replicate(params, devices)}
  state['opt'] = jax.pmap(tx.init, devices=devices)(state['params'])
  # Its input: one-hot labels and a leading axis of one device.
  shard = flax.jax_utils.replicate(
      {'image': batch['image'], 'label': np.eye(classes, dtype=np.float32)[batch['label']]},
      devices)
  state['rng'] = flax.jax_utils.replicate(jax.random.PRNGKey(0), devices)
  compiled = update_fn.lower(state['params'], state['opt'], shard, state['rng']).compile()

  def run():
    state['params'], state['opt'], loss, state['rng'] = compiled(
        state['params'], state['opt'], shard, state['rng'])
    jax.block_until_ready(loss)
  return run, compiled


def our_step(name: str, classes: int, accum: int, batch: Dict[str, np.ndarray],
             dtype: str = 'float32', attention: Optional[str] = None,
             remat: Optional[bool] = None) -> Tuple[Step, Any]:
  """Our update as `train_and_evaluate` jits it, on all devices: (run one step, compiled)."""
  config, tx = recipe()
  config.model_name, config.accum_steps, config.dtype = name, accum, dtype
  config.pp.crop = batch['image'].shape[1]
  config.model.attention, config.model.remat = attention, remat
  model = train.build_model(config, classes)
  mesh = parallel.create_mesh()
  state = train.create_train_state(config, model, tx, mesh)
  step_fn = train.jit_train_step(model, tx, accum_steps=accum, seed=config.seed)
  batch = parallel.to_global(mesh, batch)
  compiled = step_fn.lower(state, batch).compile()
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)
  return run, compiled


def compile_seconds(make: Callable[[], Tuple[Step, Any]]) -> Tuple[Step, Any, float]:
  """`make()` and the seconds it took (set-up plus the compile, which dominates)."""
  t0 = time.perf_counter()
  run, compiled = make()
  return run, compiled, time.perf_counter() - t0
