"""Preprocessing ops by name, composed from strings such as `decode|resize(384)|value_range(-1,1)`.

Each op takes `(image, seed)` and returns an image. Random ops draw from stateless
TF ops seeded per example, so results do not depend on parallelism or on where a run
resumed. `default_ops(config, train)` is the pipeline the weights of `config.model_name`
expect: the official vit_jax one for the official names, timm's for timm's names.
"""
import ast
import math
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import ml_collections
import tensorflow as tf

from vit_jax_ft import models

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
OPS: Dict[str, Callable[..., Op]] = {}

# Aspect ratios that `tf.image.sample_distorted_bounding_box` draws by default (official crop).
INCEPTION_ASPECT_RATIOS = (0.75, 1.33)


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Adds an op factory to `OPS` under `name`."""
  def add(factory: Callable[..., Op]) -> Callable[..., Op]:
    OPS[name] = factory
    return factory
  return add


Size = Union[int, Sequence[int]]


def _size(size: Size) -> Tuple[int, int]:
  """`n` or `(height, width)`, as big_vision's ops take sizes."""
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@register('decode')
def decode(channels: int = 3) -> Op:
  """JPEG/PNG/BMP/GIF bytes to uint8 HWC; grey and RGBA become `channels` (first GIF frame)."""
  def _decode(data, seed):
    del seed
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])
  return _decode


@register('resize')
def resize(size: Size, method: str = 'bilinear') -> Op:
  """Resizes to `size` (aspect not kept), as the official eval pipeline does."""
  def _resize(image, seed):
    del seed
    return tf.image.resize(image, _size(size), method=method)
  return _resize


@register('resize_small')
def resize_small(smaller_size: int, method: str = 'area', antialias: bool = False) -> Op:
  """Resizes so the shorter side is `smaller_size`, keeping the aspect ratio (big_vision)."""
  def _resize_small(image, seed):
    del seed
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = smaller_size / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    return tf.image.resize(image, new_shape, method=method, antialias=antialias)
  return _resize_small


@register('central_crop')
def central_crop(size: Size) -> Op:
  """Crops the centre window of `size`."""
  crop_h, crop_w = _size(size)

  def _central_crop(image, seed):
    del seed
    top = (tf.shape(image)[0] - crop_h) // 2
    left = (tf.shape(image)[1] - crop_w) // 2
    return tf.image.crop_to_bounding_box(image, top, left, crop_h, crop_w)
  return _central_crop


@register('timm_eval_crop')
def timm_eval_crop(crop: int, crop_pct: float, method: str = 'bicubic') -> Op:
  """timm's evaluation: the shorter side to floor(crop / crop_pct) (the longer truncated, as
  torchvision), antialiased and rounded to uint8 as PIL, then the central crop (its offsets
  rounded half to even, as torchvision)."""
  shorter = math.floor(crop / crop_pct)

  def _timm_eval_crop(image, seed):
    del seed
    shape = tf.shape(image)[:2]
    new_shape = shape * shorter // tf.reduce_min(shape)
    image = tf.image.resize(image, new_shape, method=method, antialias=True)
    image = tf.round(tf.clip_by_value(image, 0, 255))
    top, left = tf.unstack(tf.cast(tf.round((new_shape - crop) / 2), tf.int32))
    return tf.image.crop_to_bounding_box(image, top, left, crop, crop)
  return _timm_eval_crop


@register('random_crop')
def random_crop(size: Size) -> Op:
  """Crops a uniformly placed window of `size`."""
  crop_h, crop_w = _size(size)

  def _random_crop(image, seed):
    return tf.image.stateless_random_crop(image, [crop_h, crop_w, tf.shape(image)[2]], seed)
  return _random_crop


@register('pad')
def pad(pixels: int, value: int = 0) -> Op:
  """Pads each side with `pixels` of `value`: `pad(4)|random_crop(32)` is the CIFAR crop."""
  def _pad(image, seed):
    del seed
    return tf.pad(image, [[pixels, pixels], [pixels, pixels], [0, 0]],
                  constant_values=tf.cast(value, image.dtype))
  return _pad


@register('inception_crop')
def inception_crop(size: Size, area_min: float = 5, area_max: float = 100,
                   method: str = 'bilinear') -> Op:
  """Random window of `area_min..area_max` percent of the image, resized (official train crop)."""
  def _inception_crop(image, seed):
    begin, window, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
        area_range=(area_min / 100, area_max / 100),
        aspect_ratio_range=INCEPTION_ASPECT_RATIOS,
        min_object_covered=0, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, window)
    crop = tf.ensure_shape(crop, [None, None, image.shape[-1]])
    return tf.image.resize(crop, _size(size), method=method)
  return _inception_crop


@register('flip_lr')
def flip_lr() -> Op:
  """Mirrors left-right with probability 1/2."""
  def _flip_lr(image, seed):
    return tf.image.stateless_random_flip_left_right(image, seed)
  return _flip_lr


@register('value_range')
def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255) -> Op:
  """Maps `[in_min, in_max]` linearly to `[vmin, vmax]` as float32."""
  # (x - offset) / scale is the official `(x - 127.5) / 127.5` bit for bit at the defaults.
  scale = (in_max - in_min) / (vmax - vmin)
  offset = in_min - vmin * scale

  def _value_range(image, seed):
    del seed
    return (tf.cast(image, tf.float32) - offset) / scale
  return _value_range


@register('normalize')
def normalize(mean: Sequence[float], std: Sequence[float]) -> Op:
  """`(x / 255 - mean) / std` per channel as float32: timm's ToTensor then Normalize (big_vision's
  `vgg_value_range`, with mean and std of [0, 1] pixels)."""
  mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

  def _normalize(image, seed):
    del seed
    return (tf.cast(image, tf.float32) / 255 - mean) / std
  return _normalize


def parse(spec: str) -> List[Tuple[str, Tuple[Any, ...], Dict[str, Any]]]:
  """Splits `op1(args)|op2|...` into (name, args, kwargs) triples; arguments are literals."""
  ops = []
  for text in (t.strip() for t in spec.split('|')):
    try:
      node = ast.parse(text, mode='eval').body
      if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[])
      if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise SyntaxError('not a call')
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(f'Cannot parse preprocessing op {text!r} in {spec!r}: write ops as '
                       '`name` or `name(1, 2, key=3)` with literal arguments, joined by `|`.'
                       ) from e
    if node.func.id not in OPS:
      raise ValueError(f'Unknown preprocessing op {node.func.id!r} in {spec!r}; '
                       f'known ops: {", ".join(sorted(OPS))}.')
    ops.append((node.func.id, args, kwargs))
  return ops


def build(spec: str) -> Tuple[Op, Op]:
  """Returns `(decode, augment)`: bytes to image (cacheable) and the seeded rest of `spec`."""
  ops = parse(spec)
  if ops[0][0] != 'decode':
    ops.insert(0, ('decode', (), {}))
  decode_op = _instantiate(*ops[0], spec)
  rest = [_instantiate(*op, spec) for op in ops[1:]]
  if any(name == 'decode' for name, _, _ in ops[1:]):
    raise ValueError(f'`decode` may only be the first op of {spec!r}.')

  def augment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    for position, op in enumerate(rest):
      image = op(image, tf.random.experimental.stateless_fold_in(seed, position))
    return tf.cast(image, tf.float32)
  return decode_op, augment


def _instantiate(name: str, args: tuple, kwargs: dict, spec: str) -> Op:
  try:
    return OPS[name](*args, **kwargs)
  except TypeError as e:
    raise ValueError(f'Bad arguments for preprocessing op {name!r} in {spec!r}: {e}') from e


def _value_op(convention: models.InputConvention) -> str:
  """The normalisation op; mean = std = 0.5 is the official `value_range(-1,1)` (the same map)."""
  if convention.mean == convention.std == (0.5, 0.5, 0.5):
    return 'value_range(-1,1)'
  return f'normalize({tuple(convention.mean)}, {tuple(convention.std)})'


def default_ops(config: ml_collections.ConfigDict, train: bool) -> str:
  """`pp.train_ops`/`pp.test_ops`, else the ops built from `pp.crop`/`pp.resize` and the input
  convention of `config.model_name` (official names: the official vit_jax pipeline)."""
  pp = config.pp
  explicit = pp.train_ops if train else pp.test_ops
  if explicit:
    return explicit
  convention = models.input_convention(config.model_name)
  method = '' if convention.interpolation is None else f", method='{convention.interpolation}'"
  value = _value_op(convention)
  crop, resize_to = pp.crop, pp.get('resize')
  if resize_to:  # big_vision variant; timm's interpolation antialiased, as PIL resizes.
    crop_op = f'random_crop({crop})|flip_lr' if train else f'central_crop({crop})'
    antialias = ', antialias=True' if method else ''
    return f'decode|resize_small({resize_to}{method}{antialias})|{crop_op}|{value}'
  if train:  # Official vit_jax: inception crop (5% to 100% of the area), random flip.
    return f'decode|inception_crop({crop}{method})|flip_lr|{value}'
  if convention.crop_pct:
    return f'decode|timm_eval_crop({crop}, {convention.crop_pct}{method})|{value}'
  return f'decode|resize({crop}{method})|{value}'
