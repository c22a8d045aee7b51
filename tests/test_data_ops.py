"""Preprocessing ops against direct TF/numpy computations, and the op-string parser."""
import numpy as np
import pytest
import tensorflow as tf
from ml_collections import ConfigDict

from vit_jax_ft.data import preprocess
from vit_jax_ft.data.preprocess import OPS

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
SEED = tf.constant([3, 7], tf.int64)


def _config(**pp):
  """An official name's config with the pp fields `pp` (the rest unset)."""
  fields = dict(crop=None, resize=None, train_ops=None, test_ops=None)
  return ConfigDict(dict(model_name='ViT-B_16', pp={**fields, **pp}))


def _run(spec, image=IMAGE, seed=SEED):
  _, augment = preprocess.build(spec)
  return augment(tf.constant(image), seed).numpy()


def test_official_eval_is_resize_then_scale():
  want = (tf.image.resize(IMAGE, [32, 32]).numpy() - 127.5) / 127.5
  got = _run(preprocess.default_ops(_config(crop=32), train=False))
  np.testing.assert_array_equal(got, want)
  assert got.min() >= -1 and got.max() <= 1


def test_inception_crop_is_the_official_bounding_box_sampler():
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      IMAGE.shape, tf.zeros([0, 0, 4]), seed=SEED, area_range=(0.05, 1.0),
      min_object_covered=0, use_image_if_no_bounding_boxes=True)
  want = tf.image.resize(tf.slice(IMAGE, begin, size), [24, 24]).numpy()
  got = OPS['inception_crop'](24)(tf.constant(IMAGE), SEED).numpy()
  np.testing.assert_array_equal(got, want)


def test_official_train_ops_give_scaled_crops_of_the_crop_size():
  spec = preprocess.default_ops(_config(crop=16), train=True)
  assert spec == 'decode|inception_crop(16)|flip_lr|value_range(-1,1)'
  full_crop = np.tile(IMAGE[:1, :1], (16, 16, 1))  # Constant image: crops all look alike.
  outs = [_run(spec, full_crop, tf.constant([s, 0], tf.int64)) for s in range(4)]
  for out in outs:
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, (full_crop[:16, :16] - 127.5) / 127.5, atol=1e-6)


def test_flip_lr_flips_about_half_of_the_seeds():
  flipped = []
  for s in range(40):
    out = _run('flip_lr', seed=tf.constant([s, 5], tf.int64))
    assert np.array_equal(out, IMAGE) or np.array_equal(out, IMAGE[:, ::-1])
    flipped.append(np.array_equal(out, IMAGE[:, ::-1]))
  assert 8 <= sum(flipped) <= 32


def test_resize_small_keeps_aspect_and_central_crop_is_the_middle():
  out = _run('resize_small(20)')
  assert out.shape == (20, 30, 3)
  np.testing.assert_allclose(out, tf.image.resize(IMAGE, [20, 30], 'area').numpy())
  np.testing.assert_array_equal(_run('central_crop((10, 20))'), IMAGE[15:25, 20:40])


def test_random_crop_is_a_window_of_the_image():
  out = _run('random_crop(8)')
  windows = [(y, x) for y in range(33) for x in range(53)
             if np.array_equal(IMAGE[y:y + 8, x:x + 8], out)]
  assert len(windows) == 1


def test_big_vision_variant_from_resize():
  config = _config(crop=24, resize=32)
  train, test = preprocess.default_ops(config, True), preprocess.default_ops(config, False)
  assert train.startswith('decode|resize_small(32)|random_crop(24)|flip_lr')
  assert test == 'decode|resize_small(32)|central_crop(24)|value_range(-1,1)'
  small = tf.image.resize(IMAGE, [32, 48], 'area').numpy()
  np.testing.assert_allclose(_run(test), (small[4:28, 12:36] - 127.5) / 127.5, atol=1e-6)
  assert _run(train).shape == (24, 24, 3)


def test_decode_makes_grey_and_rgba_rgb():
  grey = tf.io.encode_png(IMAGE[..., :1]).numpy()
  rgba = tf.io.encode_png(np.concatenate([IMAGE, IMAGE[..., :1]], -1)).numpy()
  decode, _ = preprocess.build('decode')
  np.testing.assert_array_equal(decode(grey, None).numpy(), np.repeat(IMAGE[..., :1], 3, -1))
  np.testing.assert_array_equal(decode(rgba, None).numpy(), IMAGE)


def test_same_seed_same_output_other_seed_other_output():
  spec = 'inception_crop(16)|flip_lr'
  np.testing.assert_array_equal(_run(spec), _run(spec))
  assert not np.array_equal(_run(spec), _run(spec, seed=tf.constant([4, 7], tf.int64)))


@pytest.mark.parametrize('spec, message', [
    ('decode|rezise(3)', 'Unknown preprocessing op'),
    ('decode|resize(3', 'Cannot parse'),
    ('decode|resize(size=x)', 'Cannot parse'),
    ('decode|resize(1, 2, 3, 4, 5)', 'Bad arguments'),
    ('resize(3)|decode', 'only be the first'),
])
def test_bad_op_strings_name_the_problem(spec, message):
  with pytest.raises(ValueError, match=message):
    preprocess.build(spec)


def test_op_arguments_follow_big_vision():
  """The size is one argument (n or (h, w)); the next positional of inception_crop is area_min."""
  square = IMAGE[:, :40]
  np.testing.assert_allclose(_run('inception_crop(16, 100)', image=square),
                             _run('resize(16)', image=square))
  assert _run('resize((10, 20))').shape == (10, 20, 3)
  assert _run('random_crop((8, 12))').shape == (8, 12, 3)


def test_pad_is_numpy_constant_padding_of_each_side():
  np.testing.assert_array_equal(_run('pad(4)'), np.pad(IMAGE, [(4, 4), (4, 4), (0, 0)]))
  floats = (IMAGE / 255).astype(np.float32)
  np.testing.assert_array_equal(_run('pad(2, value=-1)', image=floats),
                                np.pad(floats, [(2, 2), (2, 2), (0, 0)], constant_values=-1))


def test_padded_random_crop_is_a_window_of_the_padded_image_placed_anywhere():
  """`pad(4)|random_crop(32)|flip_lr` (the CIFAR recipe): a possibly mirrored 32 px window of
  the zero-padded image at one of the 9x9 offsets, each offset reachable."""
  image = IMAGE[:32, :32]
  padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
  offsets, flips = set(), 0
  for s in range(60):
    out = _run('pad(4)|random_crop(32)|flip_lr', image, tf.constant([s, 1], tf.int64))
    hits = [(y, x, flip) for y in range(9) for x in range(9) for flip in (False, True)
            if np.array_equal(padded[y:y + 32, x:x + 32][:, ::-1 if flip else 1], out)]
    assert len(hits) == 1
    offsets.add(hits[0][:2])
    flips += hits[0][2]
  assert len(offsets) >= 30 and {y for y, _ in offsets} == set(range(9)) and 15 <= flips <= 45
