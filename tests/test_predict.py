"""Predict: released checkpoints on image files written here and real CIFAR-10 photos,
against the independent numpy forward pass; text/JSON output; the CLI; bad input."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import fresh_process_env, random_params
from numpy_reference import vit_forward
from vit_jax_ft import checkpoint, predict
from vit_jax_ft.models import get_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """A 'testing' ViT with a 3-class head and a pre_logits layer, saved as a release."""
  model = get_model('testing', 3, representation_size=6)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  params = jax.tree.map(np.asarray, random_params(params, seed=3, scale=0.5))
  path = str(tmp_path_factory.mktemp('ckpt') / 'testing.npz')
  checkpoint.save(params, path)
  return path, params


def write_images(folder, pixels, suffix='png'):
  paths = []
  for i, image in enumerate(pixels):
    path = str(folder / f'image_{i}.{suffix}')
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths


def expected_probabilities(params, pixels):
  logits = vit_forward(params, pixels / 127.5 - 1, num_heads=2, patch=16)
  return softmax(logits)


def test_released_checkpoint_on_written_images_matches_numpy(released, tmp_path):
  path, params = released
  pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  paths = write_images(tmp_path, pixels)
  loaded = predict.load_model(checkpoint_path=path, model_name='testing', image_size=32)
  assert loaded.model.representation_size == 6 and loaded.class_names == ['0', '1', '2']
  images = predict.load_images(paths, loaded.config)
  np.testing.assert_allclose(images, pixels / 127.5 - 1, atol=1e-6)
  probabilities = predict.predict_probabilities(loaded.model, loaded.variables, images, 2)
  np.testing.assert_allclose(probabilities, expected_probabilities(params, pixels),
                             atol=1e-5)


def test_grey_and_rgba_files_become_rgb(released, tmp_path):
  path, _ = released
  grey = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
  Image.fromarray(grey).save(tmp_path / 'grey.png')
  rgba = np.random.default_rng(2).integers(0, 256, (32, 32, 4), dtype=np.uint8)
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  loaded = predict.load_model(checkpoint_path=path, model_name='testing', image_size=32)
  images = predict.load_images([str(tmp_path / 'grey.png'), str(tmp_path / 'rgba.png')],
                               loaded.config)
  np.testing.assert_allclose(images[0], np.repeat(grey[..., None], 3, -1) / 127.5 - 1,
                             atol=1e-6)
  np.testing.assert_allclose(images[1], rgba[..., :3] / 127.5 - 1, atol=1e-6)


def test_real_cifar_photos_with_names_and_both_formats(released, tmp_path, shared_data):
  path, params = released
  with np.load(shared_data / 'cifar10_partial.npz') as npz:
    pixels = npz['x_test'][:4]
  paths = write_images(tmp_path, pixels, 'png')
  jpegs = write_images(tmp_path, pixels, 'jpg')
  names_file = tmp_path / 'names.txt'
  names_file.write_text('airplane\nautomobile\nbird\n')
  loaded = predict.load_model(checkpoint_path=path, model_name='testing', image_size=32,
                              class_names_file=str(names_file))
  probabilities = predict.predict_probabilities(
      loaded.model, loaded.variables, predict.load_images(paths, loaded.config))
  expected = expected_probabilities(params, pixels.astype(np.float64))
  np.testing.assert_allclose(probabilities, expected, atol=1e-5)
  top = predict.top_k(probabilities, loaded.class_names, 2)
  for row, p in zip(top, expected):
    assert [t['index'] for t in row] == list(np.argsort(-p)[:2])
    assert row[0]['label'] == loaded.class_names[int(np.argmax(p))]
  parsed = json.loads(predict.format_json(paths, top))
  assert [r['image'] for r in parsed] == paths
  assert parsed[0]['predictions'][0]['probability'] == pytest.approx(expected[0].max(),
                                                                     abs=1e-5)
  text = predict.format_text(paths, top)
  assert text.splitlines()[0] == paths[0] and top[0][0]['label'] in text.splitlines()[1]
  # JPEG files: compared with PIL's decoding of the same files (decoders may differ by 1).
  jpeg_probabilities = predict.predict_probabilities(
      loaded.model, loaded.variables, predict.load_images(jpegs, loaded.config))
  decoded = np.stack([np.asarray(Image.open(p).convert('RGB'), np.float64) for p in jpegs])
  np.testing.assert_allclose(jpeg_probabilities, expected_probabilities(params, decoded),
                             atol=2e-2)


def test_position_embeddings_follow_the_requested_resolution(released, tmp_path):
  path, params = released
  loaded = predict.load_model(checkpoint_path=path, model_name='testing', image_size=64)
  pos = loaded.params['Transformer']['posembed_input']['pos_embedding']
  assert pos.shape == (1, 1 + 16, 10)
  np.testing.assert_array_equal(pos[0, 0], params['Transformer']['posembed_input'][
      'pos_embedding'][0, 0])  # The class token's embedding is kept as it is.
  pixels = np.random.default_rng(4).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
  images = predict.load_images(write_images(tmp_path, pixels), loaded.config)
  probabilities = predict.predict_probabilities(loaded.model, loaded.variables, images)
  adapted = dict(params, Transformer=dict(params['Transformer'],
                                          posembed_input={'pos_embedding': pos}))
  np.testing.assert_allclose(probabilities, expected_probabilities(adapted, pixels),
                             atol=1e-5)


def test_imagenet_heads_get_the_tfds_synset_ids():
  names = predict.default_class_names(1000)
  assert len(names) == 1000 and names[0] == 'n01440764' and len(set(names)) == 1000
  assert predict.default_class_names(4) == ['0', '1', '2', '3']


def test_bad_input_names_the_problem(released, tmp_path):
  path, _ = released
  with pytest.raises(ValueError, match='either --workdir'):
    predict.load_model(workdir=str(tmp_path), checkpoint_path=path)
  with pytest.raises(ValueError, match='--model_name'):
    predict.load_model(checkpoint_path=path)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"Shape mismatch for '.+'.* has \(10,\), the model expects \(192,\)"):
    predict.load_model(checkpoint_path=path, model_name='ViT-Ti_16', image_size=32)
  names_file = tmp_path / 'names.txt'
  names_file.write_text('a\nb\n')
  with pytest.raises(ValueError, match='names 2 classes; the checkpoint head has 3'):
    predict.load_model(checkpoint_path=path, model_name='testing', image_size=32,
                       class_names_file=str(names_file))
  loaded = predict.load_model(checkpoint_path=path, model_name='testing', image_size=32)
  with pytest.raises(FileNotFoundError, match='No image'):
    predict.load_images([str(tmp_path / 'missing.png')], loaded.config)
  with pytest.raises(ValueError, match='not a readable'):
    predict.load_images([str(names_file)], loaded.config)


def test_cli_prints_json(released, tmp_path):
  path, params = released
  pixels = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  paths = write_images(tmp_path, pixels)
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax_ft.predict', f'--checkpoint={path}',
       '--model_name=testing', '--image_size=32', '--format=json', '--top_k=3', *paths],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=fresh_process_env())
  assert result.returncode == 0, result.stderr[-2000:]
  parsed = json.loads(result.stdout)
  expected = expected_probabilities(params, pixels)
  for row, p in zip(parsed, expected):
    np.testing.assert_allclose([t['probability'] for t in row['predictions']],
                               np.sort(p)[::-1], atol=1e-4)
