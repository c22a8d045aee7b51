"""The documented configs resolve to the paper's settings and to checkpoints by name."""
import os

import pytest

from configs import augreg, vit
from vit_jax_ft import defaults, hub, train


@pytest.mark.parametrize('dataset', sorted(defaults.DATASET_PRESETS))
def test_vit_config_applies_the_dataset_preset(dataset):
  config = vit.get_config(f'b16,{dataset}')
  preset = defaults.DATASET_PRESETS[dataset]
  assert config.model_name == 'ViT-B_16' and config.dataset == dataset
  assert config.total_steps == preset['total_steps']
  assert (config.pp.train, config.pp.crop) == (preset['pp']['train'], preset['pp']['crop'])
  assert config.base_lr == (0.01 if dataset == 'cifar10' else 0.03)


def test_paper_recipe_defaults():
  config = defaults.get_config()
  assert (config.batch, config.batch_eval, config.base_lr, config.grad_norm_clip) == (
      512, 512, 0.03, 1.0)
  assert (config.optimizer, config.momentum, config.optim_dtype) == ('sgd', 0.9, 'bfloat16')
  assert (config.decay_type, config.warmup_steps, config.weight_decay) == ('cosine', 500, 0.0)
  assert (config.eval_every, config.progress_every, config.checkpoint_every) == (100, 10, 1000)


def test_unknown_preset_is_an_error():
  with pytest.raises(ValueError, match='No preset for dataset'):
    vit.get_config('b16,cifar11')


def test_augreg_config_picks_the_recommended_checkpoint_and_its_model():
  config = augreg.get_config('R_Ti_16')
  assert config.model_name == 'R+ViT-Ti_16'
  assert config.pretrained_path == 'augreg/R_Ti_16'  # hub.pick chooses the file at start.
  recommended = hub.AUGREG_RECOMMENDED['R_Ti_16'][0]
  assert hub.lookup(config.pretrained_path).name == f'augreg/{recommended}'
  assert augreg.get_config('B_8').model_name == 'ViT-B_8'
  assert config.model.dropout_rate == 0.0
  filename = 'S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0'
  assert augreg.get_config(filename).model_name == 'ViT-S_32'


def test_missing_pretrained_dir_file_says_how_to_fetch_it(tmp_path):
  config = vit.get_config('s16,cifar10')
  config.pretrained_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='hub fetch imagenet21k/ViT-S_16'):
    train.pretrained_path(config)
  config.pretrained_dir = ''
  assert train.pretrained_path(config) is None


def test_vit_config_looks_for_each_model_where_hub_fetch_puts_it():
  from vit_jax_ft import pretrained  # pylint: disable=import-outside-toplevel
  config = vit.get_config('b16,cifar10')
  assert config.pretrained_dir == os.path.join(vit.REPO, 'checkpoints', 'imagenet21k')
  config = vit.get_config('swin_base_patch4_window7_224,cifar10')
  assert config.pretrained_dir == os.path.join(vit.REPO, 'checkpoints', 'timm')
  config.pretrained_dir = '/nonexistent/timm'
  with pytest.raises(FileNotFoundError, match='hub fetch timm/swin_base_patch4_window7_224'):
    pretrained.pretrained_path(config)
