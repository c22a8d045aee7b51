"""Label smoothing, mixup, CutMix, the EMA of the parameters and reduce-on-plateau against
numpy, formulas and an uninterrupted run."""
import functools
import pathlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from jax.experimental.compilation_cache import compilation_cache
from scipy import stats
from sklearn.datasets import load_digits

import tiny_config
from conftest import random_params
from vit_jax_ft import (checkpointing, defaults, evaluate, models, optim, predict, recipe,
                        run_dir, train)


def numpy_targets(labels, num_classes, smoothing, weights=None):
  """timm's smoothed one-hot: 1 - s + s/K on the label, s/K elsewhere; times the weight."""
  targets = np.full((len(labels), num_classes), smoothing / num_classes)
  targets[np.arange(len(labels)), labels] += 1 - smoothing
  return targets if weights is None else targets * weights[:, None]


def numpy_mix(images, targets, lam, cutmix, box):
  """timm's 'batch' mode: blend with the flipped batch, or paste its box (rows top..bottom-1)."""
  flipped = images[::-1]
  if cutmix:
    top, bottom, left, right = box
    mixed = images.copy()
    mixed[:, top:bottom, left:right] = flipped[:, top:bottom, left:right]
  else:
    mixed = lam * images + (1 - lam) * flipped
  return mixed, lam * targets + (1 - lam) * targets[::-1]


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, images):
  return model.apply({'params': params}, images)


def numpy_loss(model, params, images, targets, normaliser):
  """sum(-targets * log_softmax(logits)) / normaliser in float64, from the model's logits."""
  logits = np.asarray(_logits(model, params, jnp.asarray(images, jnp.float32)), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                         ) - logits.max(-1, keepdims=True)
  return -(targets * logp).sum() / normaliser


@pytest.mark.parametrize('key,value', [('label_smoothing', 1.0), ('mixup_alpha', -0.1),
                                       ('cutmix_alpha', -1.0), ('mix_prob', 1.5),
                                       ('mixup_switch_prob', -0.5), ('ema_decay', 1.0)])
def test_bad_recipe_values_are_errors_listing_the_allowed_ones(key, value, tmp_path):
  config = tiny_config.get_config(str(tmp_path / 'no_data'))
  config[key] = value
  # Before the data or any compile: the dataset folder does not even exist.
  with pytest.raises(ValueError, match=rf'config.{key}={value}; allowed: a number (in|>=)'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.parametrize('key,value,allowed', [
    ('plateau_factor', 1.0, r'in \(0, 1\)'), ('plateau_patience', 0, 'an integer >= 1'),
    ('plateau_cooldown', -1, 'an integer >= 0'), ('plateau_rtol', 2.0, r'in \[0, 1\]'),
    ('plateau_atol', -1.0, '>= 0'), ('eval_every', 0, 'an integer >= 1 with reduce_on')])
def test_bad_plateau_values_are_errors(key, value, allowed):
  config = defaults.get_config()
  config.decay_type = 'reduce_on_plateau'
  config[key] = value
  with pytest.raises(ValueError, match=rf'config.{key}={value}; allowed: {allowed}'):
    optim.make_optimizer(config)
  config[key] = defaults.get_config()[key]
  config.plateau_rtol = config.plateau_atol = 0.0
  with pytest.raises(ValueError, match='plateau_rtol and config.plateau_atol are both 0'):
    optim.make_optimizer(config)


def test_mixed_images_and_targets_equal_numpy_for_the_drawn_lambda_and_box():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 16, 12, 3)).astype(np.float32)
  targets = numpy_targets(rng.integers(0, 5, 6), 5, 0.1, rng.uniform(0.5, 2, 6))
  step_recipe = recipe.StepRecipe(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
  kinds = set()
  sample = jax.jit(recipe.sample, static_argnums=(1, 2, 3))
  apply = jax.jit(recipe.apply)
  for seed in range(12):
    mix = jax.device_get(sample(jax.random.PRNGKey(seed), step_recipe, 16, 12))
    got_images, got_targets = apply(mix, jnp.asarray(images), jnp.asarray(targets, jnp.float32))
    want_images, want_targets = numpy_mix(images, targets, float(mix.lam), bool(mix.cutmix),
                                          mix.box)
    np.testing.assert_allclose(got_images, want_images, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_targets, want_targets, rtol=1e-6, atol=1e-6)
    if mix.cutmix:  # lam is the exact share of pixels kept.
      top, bottom, left, right = mix.box
      assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 12
      assert float(mix.lam) == pytest.approx(1 - (bottom - top) * (right - left) / (16 * 12))
    kinds.add(bool(mix.cutmix))
  assert kinds == {False, True}  # Both mixup blends and CutMix boxes were checked.


def test_lambda_box_and_probabilities_follow_their_distributions():
  step_recipe = recipe.StepRecipe(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.6,
                                  mixup_switch_prob=0.3)
  keys = jax.random.split(jax.random.PRNGKey(1), 8000)
  draws = jax.device_get(jax.vmap(lambda k: recipe.sample(k, step_recipe, 1000, 1000))(keys))
  mixed = draws.lam < 1
  assert mixed.mean() == pytest.approx(0.6, abs=0.02)
  assert draws.cutmix.mean() == pytest.approx(0.3, abs=0.02)
  assert stats.kstest(draws.lam[mixed & ~draws.cutmix], stats.beta(0.4, 0.4).cdf).pvalue > 0.01
  # CutMix: a square of side a = sqrt(1 - lam), lam ~ Beta(1, 1) (uniform), centred uniformly
  # in the unit image, keeps on average a - a**2 / 4 of each side after clipping.
  side = np.sqrt(1 - np.linspace(0, 1, 200_001))
  want = np.mean((side - side**2 / 4) ** 2)
  area = 1 - draws.lam[mixed & draws.cutmix]
  assert area.mean() == pytest.approx(want, abs=3 * area.std() / np.sqrt(len(area)))


def _setup():
  """A one-block ViT on 16 random 16 px images of 5 classes, SGD with a float32 momentum
  (bfloat16 rounding would hide small differences or make them)."""
  model = models.get_model('testing', 5, hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1,
                           patch_size=(4, 4), dropout_rate=0.0)
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 10, 2, 0.1
  config.optim_dtype = 'float32'
  tx = optim.make_optimizer(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(0, 5, 16).astype(np.int32)}
  params = random_params(jax.jit(lambda x: model.init(
      jax.random.PRNGKey(0), x, train=False))(batch['image'][:1])['params'], scale=0.1)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  return model, tx, state, batch


def _step_fn(model, tx, accum_steps, step_recipe):
  return jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   accum_steps=accum_steps, dropout_rng=jax.random.PRNGKey(1),
                                   step_recipe=step_recipe))


def test_label_smoothing_loss_with_weights_and_accumulation_equals_numpy():
  model, tx, state, batch = _setup()
  weights = np.random.default_rng(1).uniform(0, 2, 16).astype(np.float32)
  batch = dict(batch, weight=weights)
  _, metrics = _step_fn(model, tx, 4, recipe.StepRecipe(label_smoothing=0.2))(state, batch)
  targets = numpy_targets(batch['label'], 5, 0.2, weights)
  want = numpy_loss(model, state.params, batch['image'], targets, weights.sum())
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)


@pytest.fixture(scope='module')
def mixed_run():
  """Three steps at accum_steps=4 with smoothing, mixup/CutMix, loss weights and EMA."""
  model, tx, state, batch = _setup()
  batch = dict(batch, weight=np.random.default_rng(2).uniform(0, 2, 16).astype(np.float32))
  step_recipe = recipe.StepRecipe(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0,
                                  ema_decay=0.6)
  state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
  step_fn, s, trajectory, losses = _step_fn(model, tx, 4, step_recipe), state, [], []
  for _ in range(3):
    s, metrics = step_fn(s, batch)
    trajectory.append(jax.device_get(s.params))
    losses.append(float(metrics['loss']))
  return model, state, batch, step_recipe, (s, trajectory, losses)


def test_mixed_step_loss_is_numpy_of_the_global_batch_mixed_by_the_step_key(mixed_run):
  model, state, batch, step_recipe, (_, trajectory, losses) = mixed_run
  kinds = []
  for step, params in enumerate([state.params, trajectory[0]]):
    # The key train_step draws a step's mixing from; mixing the whole batch before the
    # micro-batch split, so accum_steps=4 gives the loss of the mixed global batch.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(1), step),
                             recipe.MIX_STREAM)
    mix = jax.device_get(jax.jit(recipe.sample, static_argnums=(1, 2, 3))(
        key, step_recipe, 16, 16))
    targets = numpy_targets(batch['label'], 5, 0.1, batch['weight'])
    images, targets = numpy_mix(batch['image'], targets, float(mix.lam), bool(mix.cutmix),
                                mix.box)
    want = numpy_loss(model, params, images, targets, batch['weight'].sum())
    np.testing.assert_allclose(losses[step], want, rtol=1e-5)
    kinds.append((float(mix.lam), bool(mix.cutmix)))
  assert kinds[0] != kinds[1] and all(lam < 1 for lam, _ in kinds)


def test_ema_is_the_recurrence_over_the_parameter_trajectory(mixed_run):
  _, state, _, _, (final, trajectory, _) = mixed_run
  want = jax.tree.map(lambda p: np.asarray(p, np.float64), jax.device_get(state.params))
  for params in trajectory:
    want = jax.tree.map(lambda e, p: 0.6 * e + 0.4 * p, want, params)
  for got, w, p in zip(jax.tree.leaves(final.ema_params), jax.tree.leaves(want),
                       jax.tree.leaves(final.params)):
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
  assert any(np.abs(g - p).max() > 1e-4 for g, p in zip(jax.tree.leaves(final.ema_params),
                                                         jax.tree.leaves(final.params)))


def reference_plateau_scales(losses, factor, patience, cooldown, rtol, atol):
  """optax.contrib.reduce_on_plateau's documented rule, one evaluation at a time."""
  best, bad, cooling, scale, scales = float('inf'), 0, 0, 1.0, []
  for loss in losses:
    if loss < (1 - rtol) * best - atol:
      best, bad = loss, 0
    else:
      bad += 1
    if cooling:
      cooling, bad = cooling - 1, 0
    elif bad == patience:
      scale, bad, cooling = scale * factor, 0, cooldown
    scales.append(scale)
  return scales


def test_plateau_scale_follows_optax_rule_and_scales_the_updates():
  config = defaults.get_config()
  config.total_steps, config.warmup_steps, config.base_lr = 100, 0, 0.1
  config.decay_type, config.optim_dtype = 'reduce_on_plateau', 'float32'
  config.plateau_factor, config.plateau_patience, config.plateau_cooldown = 0.5, 2, 1
  config.plateau_rtol, config.plateau_atol = 0.01, 0.001
  config.freeze = ('^b/',)  # The plateau state sits inside optax.multi_transform too.
  params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'bias': jnp.ones(5)}}
  tx = optim.make_optimizer(config)
  opt_state = tx.init(params)
  plateau_step = jax.jit(optim.plateau_step(config))
  losses = [2.0, 1.5, 1.499, 1.6, 1.2, 1.3, 1.3, 1.3, 1.3, 1.19, 1.2, 1.2, 1.2, 1.2, 1.2]
  scales = []
  for loss in losses:
    opt_state = plateau_step(opt_state, loss)
    scales.append(optim.plateau_scale(opt_state))
  want = reference_plateau_scales(losses, 0.5, 2, 1, 0.01, 0.001)
  assert want[-1] < 0.2  # Several reductions, one within a cooldown's reach.
  np.testing.assert_allclose(scales, want, rtol=1e-6)
  grads = jax.tree.map(jnp.ones_like, params)
  scaled, _ = tx.update(grads, opt_state, params)
  plain, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(scaled['a']['kernel'], want[-1] * plain['a']['kernel'], rtol=1e-6)
  assert np.all(np.asarray(scaled['b']['bias']) == 0)  # Frozen.


@pytest.fixture(scope='module')
def digits(tmp_path_factory) -> pathlib.Path:
  """A few of scikit-learn's real 8x8 digits as ROOT/{train,test}/CLASS/*.png."""
  root = tmp_path_factory.mktemp('digits')
  data = load_digits()
  for i, (image, label) in enumerate(zip(data.images[:480], data.target[:480])):
    folder = root / ('test' if i % 4 == 0 else 'train') / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f'{i}.png')
  return root


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent compilation cache for one test, whose runs compile the same functions."""
  settings = {'jax_compilation_cache_dir': str(tmp_path / 'jax_cache'),
              'jax_persistent_cache_min_compile_time_secs': 0.0,
              'jax_persistent_cache_min_entry_size_bytes': 0}
  before = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _recipe_config(digits):
  config = tiny_config.get_config(str(digits))
  config.model.update(dict(hidden_size=16, mlp_dim=32, num_layers=1))
  config.total_steps, config.warmup_steps, config.eval_every = 24, 5, 6
  config.checkpoint_every, config.progress_every = 0, 0
  config.label_smoothing, config.mixup_alpha, config.cutmix_alpha = 0.1, 0.8, 1.0
  config.ema_decay = 0.9
  config.decay_type, config.plateau_factor, config.plateau_patience = 'reduce_on_plateau', 0.5, 1
  config.plateau_rtol = 0.3  # Most evaluations count as no improvement: several reductions.
  return config


def _final_state(workdir, step=24):
  path = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default'
  return ocp.PyTreeCheckpointer().restore(str(path))


def test_resumed_run_with_every_knob_equals_the_uninterrupted_one(digits, tmp_path,
                                                                   monkeypatch, compile_cache):
  config = _recipe_config(digits)
  reference = train.train_and_evaluate(config, str(tmp_path / 'reference'))
  # Stop at step 18, an evaluation step: the save comes first and the evaluation is skipped.
  monkeypatch.setattr(train._Preemption, 'should_stop', lambda self, step: step == 18)
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.undo()
  saved = _final_state(tmp_path / 'resumed', 18)
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed == reference
  want, got = _final_state(tmp_path / 'reference'), _final_state(tmp_path / 'resumed')
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  # The plateau's scale went on dropping after the interruption (0.5 per reduction).
  scales = [float(s['scale']) for s in (saved, got) for s in _plateau_states(s)]
  assert scales[1] < scales[0] < 1
  assert set(reference) >= {'ema_accuracy_top1', 'ema_accuracy_top5', 'ema_loss'}
  assert reference['ema_accuracy_top1'] != reference['accuracy_top1'] or (
      reference['ema_loss'] != reference['loss'])
  # `--ema` reads the average the checkpoint holds.
  loaded = run_dir.load(str(tmp_path / 'reference'), ema=True)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want['ema_params'])):
    np.testing.assert_array_equal(a, b)


def _plateau_states(state):
  """The restored reduce-on-plateau states (dicts with a 'scale') of a checkpoint tree."""
  found = []

  def visit(node):
    if isinstance(node, dict):
      if {'scale', 'plateau_count', 'best_value'} <= set(node):
        found.append(node)
      for value in node.values():
        visit(value)
    elif isinstance(node, (list, tuple)):
      for value in node:
        visit(value)
  visit(state['opt_state'])
  assert len(found) == 1
  return found


def test_ema_flag_needs_a_workdir():
  with pytest.raises(ValueError, match='--ema reads the moving average'):
    predict.load_model(checkpoint_path='x.npz', model_name='testing', ema=True)


@pytest.mark.parametrize('saved_ema,wanted_ema', [(False, True), (True, False)])
def test_resuming_with_another_ema_setting_names_the_key(tmp_path, saved_ema, wanted_ema):
  def state(ema):
    params = {'a': jnp.ones(3)}
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(),
                            ema_params=params if ema else None)
  manager = checkpointing.manager(str(tmp_path), SimpleNamespace(keep_checkpoints=2))
  checkpointing.save(manager, 1, state(saved_ema))
  checkpointing.finish(manager)
  manager = checkpointing.manager(str(tmp_path), SimpleNamespace(keep_checkpoints=2))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(wanted_ema))
  with pytest.raises(checkpointing.CheckpointError, match=r'config.ema_decay: .ema_params'):
    checkpointing.restore_latest(manager, target)
  checkpointing.finish(manager)


def test_ema_evaluations_get_their_own_output_folder():
  assert evaluate.default_output_dir('/w', 'test', 7, ema=True) == '/w/evaluation/test_step7_ema'
  assert evaluate.default_output_dir('/w', 'test', 7) == '/w/evaluation/test_step7'
