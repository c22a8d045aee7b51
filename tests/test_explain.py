"""Explain: attention, rollout, distances, embeddings, Grad-CAM and curves against
independent numpy computations; every figure written as a real PNG."""
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers
from PIL import Image

from conftest import fresh_process_env, random_params
from numpy_reference import conv2d, layer_norm
from vit_jax_ft import checkpoint, defaults, run_dir
from vit_jax_ft.explain import attention, curves, embeddings, figures, gradcam
from vit_jax_ft.explain.__main__ import FIGURES, Inputs, missing
from vit_jax_ft.models import get_model
from vit_jax_ft.models.resnet import BitGroupNorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(hidden_size=16, mlp_dim=16, num_heads=2, patch_size=(8, 8))
TINY_HYBRID = dict(TINY_VIT, resnet_layers=(1,), resnet_width=0.5, patch_size=(2, 2))


def init(model, size=32, seed=0):
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params']
  return random_params(params, seed)


def images(n=2, size=32, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def assert_png(path):
  with Image.open(path) as image:
    assert image.format == 'PNG' and min(image.size) > 50


def test_first_layer_attention_matches_numpy():
  model = get_model('testing', 3, **TINY_VIT, num_layers=1, dropout_rate=0.0)
  params, x = init(model), images()
  weights = attention.attention_weights(model, params, x)
  # Independent: patch embedding, class token, position embedding, LN, q.k softmax.
  p = jax.tree.map(np.asarray, params)
  tokens = conv2d(x.astype(np.float64), p['embedding']['kernel'], 8, ((0, 0), (0, 0)))
  tokens = tokens.reshape(2, 16, 16) + p['embedding']['bias']
  tokens = np.concatenate([np.broadcast_to(p['cls'], (2, 1, 16)), tokens], axis=1)
  tokens = layer_norm(tokens + p['Transformer']['posembed_input']['pos_embedding'],
                      p['Transformer']['encoderblock_0']['LayerNorm_0'])
  mha = p['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']
  q, k = (np.einsum('btd,dhk->bhtk', tokens, mha[n]['kernel']) + mha[n]['bias'][:, None]
          for n in ('query', 'key'))
  logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(weights[0], expected, atol=1e-5)
  fused = get_model('testing', 3, **TINY_VIT, num_layers=1, attention='dot_product')
  np.testing.assert_allclose(attention.attention_weights(fused, params, x), weights, atol=1e-6)


@pytest.mark.parametrize('overrides', [TINY_VIT, TINY_HYBRID], ids=['vit', 'hybrid'])
def test_attention_shapes_and_maps(overrides, tmp_path):
  model = get_model('testing', 3, **overrides, num_layers=2)
  params, x = init(model), images()
  weights = attention.attention_weights(model, params, x)
  assert weights.shape == (2, 2, 2, 17, 17)  # layers, batch, heads, 1 + 4x4 tokens.
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-5)
  maps = attention.class_token_maps(weights)
  assert maps.shape == (2, 2, 2, 4, 4)
  np.testing.assert_array_equal(maps[1, 0, 1].ravel(), weights[1, 0, 1, 0, 1:])
  assert_png(figures.attention_maps(x[0], maps[:, 0], str(tmp_path / 'maps.png')))


def test_rollout_is_the_product_of_identity_mixed_layers():
  rng = np.random.default_rng(0)
  weights = rng.uniform(size=(3, 2, 4, 5, 5))
  weights /= weights.sum(-1, keepdims=True)
  rollout = attention.attention_rollout(weights)
  np.testing.assert_allclose(rollout.sum(-1), 1)
  for b in range(2):
    mixed = [0.5 * weights[layer, b].mean(0) + 0.5 * np.eye(5) for layer in range(3)]
    np.testing.assert_allclose(rollout[b], mixed[2] @ mixed[1] @ mixed[0])


def test_rollout_maps_of_a_model(tmp_path):
  model = get_model('testing', 3, **TINY_VIT, num_layers=3)
  params, x = init(model), images()
  weights = attention.attention_weights(model, params, x)
  np.testing.assert_allclose(attention.attention_rollout(weights).sum(-1), 1, atol=1e-5)
  maps = attention.rollout_maps(weights, class_token=True)
  assert maps.shape == (2, 4, 4) and np.allclose(maps.max(axis=(1, 2)), 1)
  assert_png(figures.heat_overlays(x, maps, str(tmp_path / 'rollout.png'),
                                   titles=['a', 'b'], name='rollout'))


def test_mean_attention_distance_against_brute_force(tmp_path):
  grid, size = 3, 48  # 16 px per patch.
  centres = [(16 * i + 8, 16 * j + 8) for i in range(grid) for j in range(grid)]
  uniform = np.full((1, 1, 1, 10, 10), 0.1)
  local = np.zeros((1, 1, 1, 10, 10))
  local[..., np.arange(10), np.arange(10)] = 1  # Each token attends only to itself.
  weights = np.concatenate([uniform, local], axis=2)  # 1 layer, 1 image, 2 heads.
  distances = attention.mean_attention_distance(weights, size, class_token=True)
  mean_pairwise = np.mean([np.hypot(a[0] - b[0], a[1] - b[1])
                           for a, b in itertools.product(centres, centres)])
  np.testing.assert_allclose(distances, [[mean_pairwise, 0.0]])
  assert_png(figures.attention_distance(np.abs(np.random.default_rng(0).normal(
      20, 5, (4, 3))), str(tmp_path / 'distance.png'), image_size=size))


def test_position_similarity_of_a_checkpoint_with_known_structure(tmp_path):
  theta = np.linspace(0, np.pi / 2, 4)  # Rows vary slower than columns.
  phi = np.linspace(0, np.pi, 4)
  # Embedding of patch (i, j): [cos t_i, sin t_i, cos p_j, sin p_j] -> cosine
  # similarity (cos(t_i - t_k) + cos(p_j - p_l)) / 2.
  grid = np.array([[np.cos(t), np.sin(t), np.cos(p), np.sin(p)] for t in theta for p in phi])
  pos = np.concatenate([np.ones((1, 4)), grid])[None].astype(np.float32)
  path = str(tmp_path / 'posemb.npz')
  checkpoint.save({'cls': np.zeros((1, 1, 4), np.float32),
                   'Transformer': {'posembed_input': {'pos_embedding': pos}}}, path)
  similarity = embeddings.position_similarity(checkpoint.load(path))
  expected = (np.cos(theta[:, None, None, None] - theta[None, None, :, None]) +
              np.cos(phi[None, :, None, None] - phi[None, None, None, :])) / 2
  np.testing.assert_allclose(similarity, expected, atol=1e-6)
  no_class_token = embeddings.position_similarity(
      {'Transformer': {'posembed_input': {'pos_embedding': pos[:, 1:]}}})
  np.testing.assert_allclose(no_class_token, expected, atol=1e-6)
  assert_png(figures.position_similarity(similarity, str(tmp_path / 'posemb.png')))


def test_filter_components_recover_the_directions_of_largest_variance(tmp_path):
  rng = np.random.default_rng(0)
  directions = np.linalg.qr(rng.standard_normal((4 * 4 * 3, 2)))[0].T  # Orthonormal.
  coefficients = rng.standard_normal((64, 2)) * [5.0, 1.0]
  filters = coefficients @ directions + 3.0  # Plus a common offset PCA removes.
  kernel = filters.T.reshape(4, 4, 3, 64)
  components = embeddings.filter_components({'embedding': {'kernel': kernel}}, count=2)
  assert components.shape == (2, 4, 4, 3)
  # Independent: the top eigenvectors of the filters' covariance, up to sign.
  _, eigenvectors = np.linalg.eigh(np.cov(filters, rowvar=False))
  overlap = np.abs(components.reshape(2, -1) @ eigenvectors[:, ::-1][:, :2])
  np.testing.assert_allclose(overlap, np.eye(2), atol=1e-6)
  # And they span the two directions the filters were built from.
  np.testing.assert_allclose(np.linalg.svd(components.reshape(2, -1) @ directions.T)[1],
                             1, atol=1e-6)
  with pytest.raises(ValueError, match='hybrid'):
    embeddings.filter_components({'embedding': {'kernel': np.zeros((1, 1, 128, 8))}})
  many = embeddings.filter_components({'embedding': {'kernel': kernel}})
  assert_png(figures.filter_components(many, str(tmp_path / 'filters.png')))


def test_vit_gradcam_gradient_matches_finite_differences(tmp_path):
  model = get_model('testing', 3, **TINY_VIT, num_layers=1, dropout_rate=0.0)
  params, x = init(model), images()
  activation, gradient, logits = gradcam.activation_and_gradient(model, {'params': params}, x)
  assert activation.shape == gradient.shape == (2, 4, 4, 16)
  chosen = logits.argmax(-1)
  # With one block its input is patch embedding + position embedding; along an
  # image direction d the chosen logits change by <gradient, conv(d)>.
  direction = images(seed=7)
  change = conv2d(direction.astype(np.float64), np.asarray(params['embedding']['kernel']),
                  8, ((0, 0), (0, 0)))
  predicted = np.sum(gradient * change)

  def chosen_logits(eps):
    out = model.apply({'params': params}, x + eps * direction, train=False)
    return float(np.take_along_axis(np.asarray(out, np.float64), chosen[:, None], 1).sum())

  eps = 1e-2
  numeric = (chosen_logits(eps) - chosen_logits(-eps)) / (2 * eps)
  np.testing.assert_allclose(predicted, numeric, rtol=2e-3, atol=1e-4)
  cams = gradcam.cam_from(activation, gradient)
  weights = gradient.mean(axis=(1, 2))
  expected = np.maximum(np.einsum('bhwc,bc->bhw', activation, weights), 0)
  np.testing.assert_allclose(cams, expected / expected.max(axis=(1, 2), keepdims=True),
                             atol=1e-6)
  assert_png(figures.heat_overlays(x, cams, str(tmp_path / 'gradcam.png'), name='Grad-CAM'))


def test_hybrid_gradcam_is_on_the_token_grid():
  model = get_model('testing', 3, **TINY_HYBRID, num_layers=2)
  cams = gradcam.gradcam(model, {'params': init(model)}, images(),
                         class_index=np.array([0, 2]))
  assert cams.shape == (2, 4, 4) and cams.min() >= 0 and cams.max() <= 1


def test_bit_gradcam_activation_and_gradient_are_the_last_stage_and_its_head():
  model = get_model('BiT-S-R50x1', 3, block_sizes=(1,))
  params, x = init(model), images()
  activation, gradient, logits = gradcam.activation_and_gradient(
      model, {'params': params}, x, class_index=np.array([1, 2]))
  assert activation.shape == (2, 8, 8, 256)  # 32 px / 4; 4 x 64 channels.
  _, state = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, capture_intermediates=True, mutable=['intermediates']))(params, x)
  np.testing.assert_allclose(activation, state['intermediates']['block1']['__call__'][0],
                             rtol=1e-4, atol=1e-4)

  def head(features):  # Independent: norm-pre-head, ReLU, global mean, Dense.
    y = jax.nn.relu(BitGroupNorm().apply({'params': params['norm-pre-head']}, features))
    out = y.mean(axis=(1, 2)) @ params['head']['kernel'] + params['head']['bias']
    return out[0, 1] + out[1, 2], out

  expected, out = jax.grad(head, has_aux=True)(jnp.asarray(activation))
  np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)


def test_gradcam_needs_a_head():
  model = get_model('testing', 0, **TINY_VIT)
  with pytest.raises(ValueError, match='num_classes'):
    gradcam.gradcam(model, {'params': init(model)}, images())


def test_training_curves_read_back_what_clu_wrote(tmp_path):
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  for step in range(1, 6):
    writer.write_scalars(step, {'train_loss': 2.0 / step, 'learning_rate': 0.01 * step})
  writer.write_scalars(5, {'accuracy_test': 0.75})
  writer.write_images(5, {'sample': np.zeros((1, 4, 4, 3))})
  writer.flush()
  series = curves.read_scalars(str(tmp_path))
  assert set(series) == {'train_loss', 'learning_rate', 'accuracy_test'}
  steps, values = series['train_loss']
  np.testing.assert_array_equal(steps, np.arange(1, 6))
  np.testing.assert_allclose(values, 2.0 / np.arange(1, 6), rtol=1e-6)
  assert set(curves.read_scalars(str(tmp_path), 'loss|rate')) == {'train_loss',
                                                                   'learning_rate'}
  assert_png(figures.curves(series, str(tmp_path / 'curves.png')))


def test_curves_of_an_empty_workdir_say_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match='No TensorBoard event files'):
    curves.read_scalars(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='No workdir'):
    curves.read_scalars(str(tmp_path / 'missing'))


def test_confusion_matrix_figures_for_10_and_300_classes(tmp_path):
  rng = np.random.default_rng(0)
  for n in (10, 300):
    confusion = rng.integers(0, 5, (n, n)) + np.diag(np.full(n, 20))
    names = [f'class_{i}' for i in range(n)]
    assert_png(figures.confusion_matrix(confusion, names, str(tmp_path / f'cm{n}.png')))


def test_figure_requirements():
  vit = get_model('testing', 3)
  hybrid = get_model('testing', 3, **TINY_HYBRID)
  bit = get_model('BiT-S-R50x1', 3)
  assert missing(FIGURES['rollout'], True, vit, None) is None
  assert 'image files' in missing(FIGURES['rollout'], False, vit, None)
  assert 'ViT' in missing(FIGURES['attention'], True, bit, None)
  assert missing(FIGURES['gradcam'], True, bit, None) is None
  assert 'plain ViT' in missing(FIGURES['filters'], False, hybrid, None)
  assert missing(FIGURES['posembed'], False, hybrid, None) is None
  assert '--workdir' in missing(FIGURES['curves'], False, None, None)


def test_cli_draws_every_figure_of_a_released_checkpoint(tmp_path):
  model = get_model('testing', 3)  # Patch 16: a 2x2 grid at 32 px.
  params = jax.tree.map(np.asarray, init(model))
  checkpoint.save(params, str(tmp_path / 'vit.npz'))
  pixels = (np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))).astype(np.uint8)
  paths = []
  for i, image in enumerate(pixels):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax_ft.explain', f'--checkpoint={tmp_path / "vit.npz"}',
       '--model_name=testing', '--image_size=32', f'--output_dir={tmp_path / "out"}', *paths],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=fresh_process_env())
  assert result.returncode == 0, result.stderr[-3000:]
  written = sorted(os.path.basename(p) for p in result.stdout.split())
  assert written == sorted(['attention_0.png', 'attention_1.png', 'rollout.png',
                            'gradcam.png', 'position_embeddings.png',
                            'embedding_filters.png', 'attention_distance.png'])
  for name in written:
    assert_png(tmp_path / 'out' / name)


@pytest.mark.parametrize('model_name, test_ops, mean, std', [
    ('resnet50', None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # timm's ImageNet.
    ('ViT-B_16', None, (0.5,) * 3, (0.5,) * 3),  # The official [-1, 1].
    ('resnet50', 'decode|resize(8)|value_range(-1,1)', (0.5,) * 3, (0.5,) * 3),
])
def test_figures_show_the_images_as_they_were_before_normalisation(model_name, test_ops, mean,
                                                                    std):
  config = defaults.get_config()
  config.model_name, config.pp.test_ops = model_name, test_ops
  rgb = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3))
  inputs = Inputs(run_dir.Loaded(config, None, None, [], 0), [], (rgb - mean) / np.asarray(std),
                  None, '')
  np.testing.assert_allclose(inputs.display_images, rgb, atol=1e-12)
