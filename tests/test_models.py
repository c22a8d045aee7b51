"""Models: official names and sizes, and outputs against an independent numpy forward pass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from numpy_reference import bit_forward, vit_forward
from vit_jax_ft import checkpoint
from vit_jax_ft.models import MODEL_SPECS, get_model

OFFICIAL_COUNTS = {
    'ViT-Ti_16': 5_717_416, 'ViT-S_16': 22_050_664, 'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232, 'ViT-L_16': 304_326_632, 'ViT-H_14': 632_045_800,
    'R50+ViT-B_16': 98_659_112, 'R+ViT-Ti_16': 6_337_704,
}


def param_shapes(model, size=224):
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))['params']


def count(shapes) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('name', sorted(OFFICIAL_COUNTS))
def test_parameter_counts_match_official(name):
  assert count(param_shapes(get_model(name, num_classes=1000))) == OFFICIAL_COUNTS[name]


def test_every_official_name_instantiates():
  expected = {
      'ViT-Ti_16', 'ViT-S_16', 'ViT-B_16', 'ViT-L_16', 'ViT-H_14', 'ViT-B_8', 'ViT-S_32',
      'ViT-B_32', 'ViT-L_32', 'ViT-S_16-gap-norep', 'ViT-B_16-gap-norep',
      'ViT-S_32-gap-norep', 'ViT-B_32-gap-norep', 'R26+ViT-S_32', 'R26+ViT-B_32',
      'R50+ViT-B_16', 'R50+ViT-L_32', 'R+ViT-Ti_16', 'testing'} | {
          f'BiT-{s}-R{d}' for s in 'SM'
          for d in ('50x1', '50x3', '101x1', '101x3', '152x2', '152x4')}
  assert expected <= set(MODEL_SPECS)
  for name in sorted(expected):
    shapes = param_shapes(get_model(name, num_classes=10))
    assert shapes['head']['kernel'].shape[-1] == 10, name


def test_vit_tree_is_official():
  shapes = param_shapes(get_model('ViT-Ti_16', 10))
  assert set(shapes) == {'embedding', 'cls', 'Transformer', 'head'}
  block = shapes['Transformer']['encoderblock_11']
  assert set(block) == {'LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
                        'MlpBlock_0'}
  assert shapes['Transformer']['posembed_input']['pos_embedding'].shape == (1, 197, 192)
  hybrid = param_shapes(get_model('R50+ViT-B_16', 10))
  assert {'conv_root', 'gn_root', 'block1', 'block2', 'block3'} <= set(hybrid)
  assert set(hybrid['block1']) == {'unit1', 'unit2', 'unit3'}


def test_unknown_name_lists_close_names():
  with pytest.raises(ValueError, match=r"Unknown model name 'ViT-B16'.*ViT-B_16"):
    get_model('ViT-B16', 10)
  with pytest.raises(ValueError, match='Unknown option'):
    get_model('ViT-B_16', 10, hiden_size=3)
  with pytest.raises(ValueError, match="classifier='tokn'"):
    get_model('ViT-B_16', 10, classifier='tokn')
  with pytest.raises(ValueError, match="posemb='sincos'; allowed"):
    get_model('ViT-B_16', 10, posemb='sincos')
  with pytest.raises(ValueError, match='sow_attention'):
    get_model('ViT-B_16', 10, attention='dot_product', sow_attention=True)


def _tiny_vit(**overrides):
  spec = dict(patch_size=(16, 16), hidden_size=32, num_layers=2, mlp_dim=48, num_heads=4)
  spec.update(overrides)
  return get_model('testing', num_classes=7, **spec)


def _compare(model, reference, size=224, seed=0, atol=1e-4):
  images = np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), images[:1], train=False)['params']
  params = random_params(params, seed)
  got = np.asarray(model.apply({'params': params}, images, train=False))
  want = reference(params, images)
  assert got.shape == want.shape
  assert np.abs(want).max() > 0.1  # The comparison is not between near-zero vectors.
  np.testing.assert_allclose(got, want, atol=atol, rtol=0)
  return params, images, got


def test_vit_matches_numpy_reference():
  model = _tiny_vit()
  _compare(model, lambda p, x: vit_forward(p, x, num_heads=4, patch=16))


def test_vit_gap_with_representation_matches_numpy_reference():
  model = _tiny_vit(classifier='gap', representation_size=24)
  _compare(model, lambda p, x: vit_forward(p, x, num_heads=4, patch=16, classifier='gap'))


@pytest.mark.parametrize('posemb, classifier', [('none', 'token'), ('sincos2d', 'token'),
                                                ('sincos2d', 'gap')])
def test_position_embedding_kinds_match_numpy_reference(posemb, classifier):
  model = _tiny_vit(posemb=posemb, classifier=classifier)
  params, _, _ = _compare(model, lambda p, x: vit_forward(
      p, x, num_heads=4, patch=16, classifier=classifier, posemb=posemb), size=64)
  assert 'posembed_input' not in params['Transformer']  # Nothing learned in either.


def test_hidden_head_layers_match_numpy_reference_and_start_fresh(tmp_path):
  model = _tiny_vit(head_hidden=(24, 16))
  params, _, _ = _compare(model, lambda p, x: vit_forward(p, x, num_heads=4, patch=16),
                          size=64)
  assert params['head_hidden_0']['kernel'].shape == (32, 24)
  assert params['head_hidden_1']['kernel'].shape == (24, 16)
  released = {k: v for k, v in params.items() if not k.startswith('head')}
  released['head'] = {'kernel': np.ones((32, 3)), 'bias': np.ones((3,))}
  checkpoint.save(released, str(tmp_path / 'pretrained.npz'))
  init = model.init(jax.random.PRNGKey(1), np.zeros((1, 64, 64, 3)), train=False)['params']
  loaded = checkpoint.load_pretrained(str(tmp_path / 'pretrained.npz'), init)
  for name in ('head_hidden_0', 'head_hidden_1', 'head'):
    np.testing.assert_array_equal(loaded[name]['kernel'], init[name]['kernel'])
  np.testing.assert_array_equal(loaded['embedding']['kernel'], params['embedding']['kernel'])


def test_hybrid_matches_numpy_reference():
  model = _tiny_vit(patch_size=(2, 2), resnet_layers=(1, 1), resnet_width=0.5)
  _compare(model, lambda p, x: vit_forward(p, x, num_heads=4, patch=2, resnet_layers=(1, 1)))


def test_bit_matches_numpy_reference():
  model = get_model('BiT-M-R50x1', num_classes=5, block_sizes=(1, 1, 1, 1))
  _compare(model, lambda p, x: bit_forward(p, x, (1, 1, 1, 1)))


def test_memory_and_speed_options_keep_outputs():
  base = _tiny_vit(num_layers=3)
  params, images, want = _compare(base, lambda p, x: vit_forward(p, x, num_heads=4, patch=16),
                                  size=64)
  for options in (dict(remat=True), dict(attention='dot_product')):
    got = _tiny_vit(num_layers=3, **options).apply({'params': params}, images, train=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, err_msg=str(options))
  low = _tiny_vit(num_layers=3, dtype=jnp.bfloat16).apply({'params': params}, images,
                                                          train=False)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(low), want, atol=0.1 * np.abs(want).max())
  assert not np.allclose(np.asarray(low), want, atol=1e-6)  # bf16 really was used.


def test_remat_gives_the_same_gradients():
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  plain, remat = _tiny_vit(patch_size=(8, 8)), _tiny_vit(patch_size=(8, 8), remat=True)
  params = random_params(plain.init(jax.random.PRNGKey(0), images, train=False)['params'])
  loss = lambda m: jax.grad(lambda p: jnp.sum(m.apply({'params': p}, images) ** 2))(params)
  for a, b in zip(jax.tree.leaves(loss(plain)), jax.tree.leaves(loss(remat))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dropout_is_active_only_in_training():
  model = _tiny_vit(patch_size=(8, 8), dropout_rate=0.5)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  params = random_params(model.init(jax.random.PRNGKey(0), images, train=False)['params'])
  run = lambda seed: model.apply({'params': params}, images, train=True,
                                 rngs={'dropout': jax.random.PRNGKey(seed)})
  assert not np.allclose(run(0), run(1))
  np.testing.assert_allclose(model.apply({'params': params}, images),
                             model.apply({'params': params}, images))


def test_features_without_head():
  model = get_model('testing', num_classes=0, hidden_size=16)
  out = model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))),
                    jnp.zeros((3, 32, 32, 3)))
  assert out.shape == (3, 16)


@pytest.mark.parametrize('size', [32, 35])  # 35: 'VALID' drops the incomplete patches.
def test_patch_embedding_equals_the_official_strided_convolution(size):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from vit_jax_ft.models.vit import PatchEmbedding  # pylint: disable=import-outside-toplevel
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)),
                       jnp.float32)
  conv = nn.Conv(16, (8, 8), strides=(8, 8), padding='VALID')
  ours = PatchEmbedding(16, (8, 8))
  params = conv.init(jax.random.PRNGKey(0), images)
  ours_params = ours.init(jax.random.PRNGKey(0), images)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ours_params)
  np.testing.assert_array_equal(params['params']['kernel'], ours_params['params']['kernel'])
  params['params']['bias'] = jnp.linspace(-1, 1, 16)

  def loss(module, p):
    return jnp.sum(jnp.sin(module.apply(p, images)))
  np.testing.assert_allclose(ours.apply(params, images), conv.apply(params, images),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(functools.partial(loss, ours))(params)),
                  jax.tree.leaves(jax.grad(functools.partial(loss, conv))(params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
