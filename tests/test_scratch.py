"""From-scratch configs: the small ViTs at 32 px, their recipe, and the position-embedding study."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from configs.scratch import cifar10
from configs.studies import posemb
from vit_jax_ft import image_size, memory, models, optim, parallel, run_dir, studies


def _shapes(config):
  model = run_dir.build_model(config, 10)
  params = models.abstract_variables(model, config.pp.crop)['params']
  return model, {k: v.shape for k, v in traverse_util.flatten_dict(params, sep='/').items()}


@pytest.mark.parametrize('size, width, heads', [('ti', 192, 3), ('s', 384, 6),
                                                ('ablation', 384, 8)])
def test_scratch_configs_build_vits_on_4px_patches_that_pass_the_start_checks(size, width,
                                                                              heads):
  config = cifar10.get_config(size)
  model, shapes = _shapes(config)
  image_size.check(config, model)  # The ops end at pp.crop, a multiple of the patches.
  memory.check_accum_steps(config)
  parallel.check_batch_size(config.batch, 'batch')
  assert (model.num_layers, model.num_heads, model.hidden_size) == (12, heads, width)
  assert shapes['embedding/kernel'] == (4, 4, 3, width)
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, (32 // 4)**2 + 1, width)
  assert config.pretrained_dir == '' and config.pp.train == 'train[:98%]'
  assert (config.optimizer, config.base_lr, config.weight_decay) == ('adamw', 1e-3, 0.05)
  assert 'pad(4)|random_crop(32)|flip_lr' in config.pp.train_ops


def test_scratch_recipe_decays_kernels_only_and_warms_up_to_the_peak():
  config = cifar10.get_config('ti')
  _, shapes = _shapes(config)
  mask = traverse_util.flatten_dict(optim.decayed_mask(config.weight_decay_params)(
      traverse_util.unflatten_dict(shapes, sep='/')), sep='/')
  assert {k for k, decayed in mask.items() if decayed} == {k for k in shapes
                                                           if k.endswith('/kernel')}
  schedule = optim.learning_rate_schedule(config)
  peak, end = config.warmup_steps, config.total_steps
  assert float(schedule(peak // 2)) == pytest.approx(config.base_lr / 2, rel=1e-2)
  assert float(schedule(peak)) == pytest.approx(config.base_lr)
  assert float(schedule(end)) == pytest.approx(0.0, abs=1e-9)
  # AdamW's step on a zero gradient is the decoupled decay alone: lr * wd * kernel.
  tx = optim.make_optimizer(config)
  params = {'head': {'kernel': np.ones((2, 2), np.float32), 'bias': np.ones(2, np.float32)}}
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr = float(schedule(0))
  np.testing.assert_allclose(updates['head']['kernel'], -lr * 0.05 * np.ones((2, 2)), atol=1e-12)
  np.testing.assert_array_equal(updates['head']['bias'], 0)


def test_unknown_size_lists_the_allowed_ones():
  with pytest.raises(ValueError, match=r"allowed: \['ablation', 's', 'ti'\]"):
    cifar10.get_config('b')


def test_posemb_study_sweeps_learned_none_and_sincos_with_lr_selected_on_dev():
  config = posemb.get_config()
  grid = studies.expand(config)
  assert grid.name_keys == ['model.posemb', 'base_lr'] and grid.selected == ['base_lr']
  assert [c.name for c in grid.cells][:2] == ['model.posemb=learned,base_lr=0.0005',
                                              'model.posemb=learned,base_lr=0.001']
  assert len(grid.cells) == 6 and config.sweep.dev_split == 'train[98%:]'
  has_posemb = {}
  for cell in grid.cells[::2]:
    cell_config = studies.cell_config(config, cell)
    model, shapes = _shapes(cell_config)
    assert (model.num_layers, model.num_heads, model.patch_size) == (12, 8, (4, 4))
    has_posemb[cell.values['model.posemb']] = any('pos_embedding' in k for k in shapes)
  assert has_posemb == {'learned': True, 'none': False, 'sincos2d': False}
