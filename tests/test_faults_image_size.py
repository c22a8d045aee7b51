"""The preprocessed image size is checked against the model before anything compiles."""
import logging

import pytest

import tiny_config
from configs import embedded as embedded_config
from vit_jax_ft import image_size, train


@pytest.mark.parametrize('ops, size', [
    ('decode|resize(40)|value_range(-1,1)', (40, 40)),
    ('decode|resize((24, 32))', (24, 32)),
    ('decode|resize_small(300)|central_crop(224)|value_range(-1,1)', (224, 224)),
    ('decode|inception_crop(48)|flip_lr|value_range(-1,1)', (48, 48)),
    ('decode|resize_small(64)|random_crop(56)|flip_lr', (56, 56)),
])
def test_output_size_of_the_ops(ops, size):
  assert image_size.output_size(ops) == size


def test_ops_without_a_fixed_size_are_an_error():
  with pytest.raises(ValueError, match='depends on the input'):
    image_size.output_size('decode|resize_small(64)|value_range(-1,1)')


def test_a_crop_that_disagrees_with_the_ops_names_both():
  config = embedded_config.get_config()
  config.pp.crop = 48  # The ops still say resize(40).
  model = train.build_model(config, 10)
  with pytest.raises(ValueError) as error:
    image_size.check(config, model)
  message = str(error.value)
  assert 'config.pp.crop=48' in message and "'decode|resize(40)|value_range(-1,1)'" in message
  assert '40x40' in message and '--config.pp.crop=40' in message


def test_the_official_ops_follow_the_crop():
  config = tiny_config.get_config()
  config.pp.train_ops = config.pp.test_ops = None  # Built from pp.crop.
  image_size.check(config, train.build_model(config, 10))


def test_a_crop_off_the_patch_grid_warns_with_the_pixels_dropped(caplog):
  config = tiny_config.get_config()  # 4 px patches.
  config.pp.crop = 18
  config.pp.train_ops = config.pp.test_ops = 'decode|resize(18)|value_range(-1,1)'
  with caplog.at_level(logging.WARNING):
    image_size.check(config, train.build_model(config, 10))
  [warning] = [r.getMessage() for r in caplog.records if 'patches' in r.getMessage()]
  assert 'the last 2 rows and columns' in warning and 'crop of 16 or 20' in warning
  caplog.clear()
  config.pp.crop = 16
  config.pp.train_ops = config.pp.test_ops = 'decode|resize(16)|value_range(-1,1)'
  with caplog.at_level(logging.WARNING):
    image_size.check(config, train.build_model(config, 10))
  assert not caplog.records


def test_hybrid_stride_includes_the_stem():
  config = tiny_config.get_config()
  config.model_name = 'R50+ViT-B_16'
  config.model = {}
  assert image_size._stride(train.build_model(config, 10)) == 16  # pylint: disable=protected-access
