r"""Classifies image files with a fine-tuned workdir or a released checkpoint.

  python -m vit_jax_ft.predict --workdir=/tmp/run1 cat.jpg dog.png
  python -m vit_jax_ft.predict --checkpoint=checkpoints/imagenet21k+imagenet2012/ViT-B_16.npz \
      --model_name=ViT-B_16 --image_size=384 --top_k=5 --format=json photo.jpg

Images go through the evaluation preprocessing of the model's config (official:
resize to the crop size, values to [-1, 1]). A released checkpoint with a
1000-class head is labelled with the ImageNet synset ids that tensorflow-datasets
ships; `--class_names=FILE` (one name per line) gives other names.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags
from flax import traverse_util

from vit_jax_ft import checkpoint, defaults, hub, logs, memory, models, run_dir
from vit_jax_ft.data import preprocess

FLAGS = flags.FLAGS

# The ImageNet-1k label order of the released checkpoints (WordNet synset ids).
IMAGENET_LABELS = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012',
                               'labels.txt')


def read_class_names(path: str) -> List[str]:
  """One class name per line."""
  with tf.io.gfile.GFile(path) as f:
    return [line.strip() for line in f if line.strip()]


def default_class_names(num_classes: int) -> List[str]:
  """ImageNet synset ids for a 1000-class head, else the class indices."""
  if num_classes == 1000 and os.path.exists(IMAGENET_LABELS):
    return read_class_names(IMAGENET_LABELS)
  return [str(i) for i in range(num_classes)]


def head_size(model_name: str, params: Any, image_size: int, **overrides: Any) -> int:
  """The number of classes of `params`' head, found where the registry's model changes
  shape with the number of classes (no parameter names assumed); 0 when it has no head."""
  one, two = (traverse_util.flatten_dict(models.abstract_variables(
      models.get_model(model_name, n, **overrides), image_size)['params'], sep='/')
              for n in (1, 2))
  stored = traverse_util.flatten_dict(dict(params), sep='/')
  for key, shape in one.items():
    if key in stored and key in two and shape.shape != two[key].shape:
      axis = [a != b for a, b in zip(shape.shape, two[key].shape)].index(True)
      return int(np.shape(stored[key])[axis])
  return 0


def load_released(path: str, model_name: str, image_size: int,
                  with_head: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
  """(model, variables) of a released `.npz` or a timm/torchvision file, the head's size
  read from the file.

  Position embeddings are resized to `image_size`; a `pre_logits` layer in the
  file becomes the model's representation layer. Without `with_head` the model
  returns the pre-logits features (for the linear probe).
  """
  variables = checkpoint.load_variables(hub.resolve(path, fetch_missing=False))
  params = variables['params']
  overrides = {}
  if 'pre_logits' in params:
    overrides['representation_size'] = params['pre_logits']['kernel'].shape[-1]
  num_classes = head_size(model_name, params, image_size, **overrides) if with_head else 0
  if with_head and not num_classes:
    raise checkpoint.CheckpointError(
        f'{path} has no classification head; use it with the linear probe '
        '(`python -m vit_jax_ft.evaluate --linear_probe`) or fine-tune it first.')
  model = models.get_model(model_name, num_classes, **overrides)
  return model, checkpoint.adapt_variables(variables, run_dir.inference_shapes(model, image_size),
                                           source=path, keep_head=with_head)


def load_model(workdir: Optional[str] = None, step: Optional[int] = None,
               checkpoint_path: Optional[str] = None, model_name: Optional[str] = None,
               image_size: int = 384, class_names_file: Optional[str] = None,
               with_head: bool = True, ema: bool = False) -> run_dir.Loaded:
  """A fine-tuned workdir's checkpoint (its parameters' moving average with `ema`), or a
  released checkpoint and its model name."""
  if bool(workdir) == bool(checkpoint_path):
    raise ValueError('Give either --workdir (a training run) or --checkpoint with '
                     '--model_name (a released .npz), not both or neither.')
  if ema and not workdir:
    raise ValueError('--ema reads the moving average a --workdir run kept '
                     '(config.ema_decay); a released --checkpoint has none.')
  if workdir:
    loaded = run_dir.load(workdir, step, ema)
    if not with_head:
      loaded.model = loaded.model.clone(num_classes=0)
      features = run_dir.inference_shapes(loaded.model, loaded.config.pp.crop)['params']
      loaded.params = {k: v for k, v in loaded.params.items() if k in features}
    return loaded
  if not model_name:
    raise ValueError('--checkpoint needs --model_name (`python -m vit_jax_ft.models` '
                     'lists them).')
  config = defaults.get_config()
  config.model_name = model_name
  config.pp.crop = image_size
  model, variables = load_released(checkpoint_path, model_name, image_size, with_head)
  names = (read_class_names(class_names_file) if class_names_file
           else default_class_names(model.num_classes))
  if with_head and len(names) != model.num_classes:
    raise ValueError(f'{class_names_file} names {len(names)} classes; the checkpoint '
                     f'head has {model.num_classes}.')
  return run_dir.Loaded(config, model, variables['params'], names,
                        batch_stats=variables.get('batch_stats'))


def load_images(paths: Sequence[str], config: ml_collections.ConfigDict) -> np.ndarray:
  """Image files through the config's evaluation preprocessing: (n, crop, crop, 3)."""
  decode, process = preprocess.build(preprocess.default_ops(config, train=False))
  seed = tf.constant([0, 0], tf.int64)
  images = []
  for path in paths:
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'No image at {path!r}.')
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
    try:
      images.append(process(decode(tf.constant(data), seed), seed).numpy())
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f'{path} is not a readable JPEG, PNG, BMP or GIF image.') from e
  return np.stack(images)


def predict_probabilities(model: nn.Module, variables: Any, images: np.ndarray,
                          batch_size: int = 64) -> np.ndarray:
  """Softmax class probabilities, (n, classes); `variables` as `run_dir.Loaded.variables`."""
  logits_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.concatenate([np.asarray(jax.nn.softmax(logits_fn(variables,
                                                             images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)])


def top_k(probabilities: np.ndarray, class_names: Sequence[str],
          k: int) -> List[List[Dict[str, Any]]]:
  """The `k` most probable classes of each image, most probable first."""
  order = np.argsort(-probabilities, axis=-1)[:, :k]
  return [[{'label': class_names[i], 'index': int(i), 'probability': float(p[i])}
           for i in row] for p, row in zip(probabilities, order)]


def format_text(paths: Sequence[str], predictions: List[List[Dict[str, Any]]]) -> str:
  """One block per image: its path, then `probability  label` lines."""
  lines = []
  for path, top in zip(paths, predictions):
    lines.append(path)
    lines += [f'  {p["probability"]:.4f}  {p["label"]}' for p in top]
  return '\n'.join(lines)


def format_json(paths: Sequence[str], predictions: List[List[Dict[str, Any]]]) -> str:
  return json.dumps([{'image': path, 'predictions': top}
                     for path, top in zip(paths, predictions)], indent=2)


FORMATS = {'text': format_text, 'json': format_json}


def define_model_flags() -> None:
  """Flags that choose the model: shared by predict, evaluate and explain."""
  flags.DEFINE_string('workdir', None, 'Training workdir of `python -m vit_jax_ft.main`.')
  flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the latest).')
  flags.DEFINE_string('checkpoint', None, 'A released .npz or timm .safetensors (path, URL or '
                      'a name fetched with `python -m vit_jax_ft.hub fetch`), not --workdir.')
  flags.DEFINE_string('model_name', None, 'Official model name of --checkpoint (ViT-B_16).')
  flags.DEFINE_integer('image_size', 384, 'Input resolution for --checkpoint.')
  flags.DEFINE_string('class_names', None, 'Text file, one class name per line, for '
                      '--checkpoint (default: ImageNet synset ids for 1000 classes).')
  flags.DEFINE_bool('ema', False, 'Use the moving average of the parameters that a --workdir '
                    'run with config.ema_decay kept, instead of the parameters.')


def define_flags() -> None:
  """The command's flags (defined only when run, to keep importers' flags clean)."""
  define_model_flags()
  flags.DEFINE_integer('top_k', 5, 'How many classes to list per image.')
  flags.DEFINE_enum('format', 'text', sorted(FORMATS), 'Output format.')
  flags.DEFINE_integer('batch', 64, 'Images per forward pass.')


def model_from_flags(with_head: bool = True) -> run_dir.Loaded:
  """`load_model` with the values of `define_model_flags`."""
  return load_model(FLAGS.workdir, FLAGS.step, FLAGS.checkpoint, FLAGS.model_name,
                    FLAGS.image_size, FLAGS.class_names, with_head, FLAGS.ema)


def main(argv: List[str]) -> None:
  memory.hide_gpus_from_tensorflow()
  logs.configure_terminal()  # Other libraries' INFO (orbax's restore) off the terminal.
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files: python -m vit_jax_ft.predict '
                         '--workdir=RUN IMAGE...')
  loaded = model_from_flags()
  probabilities = predict_probabilities(loaded.model, loaded.variables,
                                        load_images(paths, loaded.config), FLAGS.batch)
  print(FORMATS[FLAGS.format](paths, top_k(probabilities, loaded.class_names, FLAGS.top_k)))


if __name__ == '__main__':
  define_flags()
  app.run(main)
