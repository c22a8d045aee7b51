"""NAT and DiNAT: neighbourhood attention, blocks and the whole network equal to numpy
computations written here from the definition; the authors' checkpoints load; counts match."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import scipy.special

from vit_jax_ft import checkpoint
from vit_jax_ft.models import MODEL_SPECS, get_model, nat, neighborhood_attention

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
EPS = 1e-5  # PyTorch's LayerNorm default, which the authors' models use.
# Made by tests/fixtures/make_nat_fixtures.py from the authors' classification/nat.py and
# dinat.py with NATTEN 0.14.6's NeighborhoodAttention2D module (see its docstring).
AUTHORS = json.loads((FIXTURES / 'nat_authors_counts.json').read_text())


# --- numpy reference, from the definition --------------------------------------------------
def _neighbours(length: int, kernel: int, dilation: int, i: int):
  """The `kernel` positions query `i` sees along one axis: the nearest ones of its sub-grid
  (every `dilation`-th position, starting at i % dilation), shifted inward at the borders."""
  grid = list(range(i % dilation, length, dilation))
  j = grid.index(i)
  start = min(max(j - kernel // 2, 0), len(grid) - kernel)
  return grid[start:start + kernel]


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def na_numpy(q, k, v, rpb, dilation):
  """Loops over queries: gather the k x k keys, add rpb[(key - query) / d + k - 1], softmax."""
  b, h, w, heads, _ = q.shape
  kernel = (rpb.shape[-1] + 1) // 2
  out = np.zeros_like(q)
  for y in range(h):
    rows = _neighbours(h, kernel, dilation, y)
    for x in range(w):
      cols = _neighbours(w, kernel, dilation, x)
      keys, values = k[:, rows][:, :, cols], v[:, rows][:, :, cols]  # (b, k, k, heads, d)
      logits = np.einsum('bnd,bijnd->bnij', q[:, y, x], keys)
      bias = rpb[:, [(r - y) // dilation + kernel - 1 for r in rows]][
          :, :, [(c - x) // dilation + kernel - 1 for c in cols]]
      weights = _softmax((logits + bias[None]).reshape(b, heads, -1), -1).reshape(logits.shape)
      out[:, y, x] = np.einsum('bnij,bijnd->bnd', weights, values)
  return out


def linear_numpy(x, sd, name):
  return x @ sd[f'{name}.weight'].T + sd[f'{name}.bias']


def layer_norm_numpy(x, sd, name):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * sd[f'{name}.weight'] + sd[f'{name}.bias']


def conv3x3_stride2_numpy(x, weight, bias=None):
  """PyTorch's Conv2d(kernel 3, stride 2, padding 1) on NHWC `x`, weight (out, in, 3, 3)."""
  _, h, w, _ = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(xp[:, di:di + 2 * ho - 1:2, dj:dj + 2 * wo - 1:2] @ weight[:, :, di, dj].T
            for di in range(3) for dj in range(3))
  return out if bias is None else out + bias


def attention_numpy(x, sd, name, heads, kernel, dilation):
  """NATTEN 0.14's module: right/bottom zero padding to kernel x dilation, qkv, NA, crop, proj."""
  b, h, w, c = x.shape
  window = kernel * dilation
  x = np.pad(x, ((0, 0), (0, max(0, window - h)), (0, max(0, window - w)), (0, 0)))
  qkv = linear_numpy(x, sd, f'{name}.qkv').reshape(x.shape[:3] + (3, heads, c // heads))
  y = na_numpy(qkv[..., 0, :, :] * (c // heads)**-0.5, qkv[..., 1, :, :], qkv[..., 2, :, :],
               sd[f'{name}.rpb'], dilation)
  return linear_numpy(y[:, :h, :w].reshape(b, h, w, c), sd, f'{name}.proj')


def block_numpy(x, sd, name, heads, kernel, dilation):
  """The authors' NATLayer: x + g1 * attn(norm1(x)), then x + g2 * mlp(norm2(x))."""
  ones = np.ones(x.shape[-1])
  y = attention_numpy(layer_norm_numpy(x, sd, f'{name}.norm1'), sd, f'{name}.attn', heads,
                      kernel, dilation)
  x = x + sd.get(f'{name}.gamma1', ones) * y
  y = linear_numpy(layer_norm_numpy(x, sd, f'{name}.norm2'), sd, f'{name}.mlp.fc1')
  y = linear_numpy(0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2))), sd, f'{name}.mlp.fc2')
  return x + sd.get(f'{name}.gamma2', ones) * y


def network_numpy(images, sd, heads, kernel, dilations):
  """The authors' NAT: tokenizer, levels (blocks, downsampler), norm, mean, head."""
  x = conv3x3_stride2_numpy(images, sd['patch_embed.proj.0.weight'],
                            sd['patch_embed.proj.0.bias'])
  x = conv3x3_stride2_numpy(x, sd['patch_embed.proj.1.weight'], sd['patch_embed.proj.1.bias'])
  x = layer_norm_numpy(x, sd, 'patch_embed.norm')
  for level, level_dilations in enumerate(dilations):
    for i, dilation in enumerate(level_dilations):
      x = block_numpy(x, sd, f'levels.{level}.blocks.{i}', heads[level], kernel, dilation)
    if level < len(dilations) - 1:
      x = conv3x3_stride2_numpy(x, sd[f'levels.{level}.downsample.reduction.weight'])
      x = layer_norm_numpy(x, sd, f'levels.{level}.downsample.norm')
  return linear_numpy(layer_norm_numpy(x, sd, 'norm').mean(axis=(1, 2)), sd, 'head')


def authors_state_dict(seed, embed_dim, depths, heads, mlp_ratio, kernel, layer_scale, classes):
  """Random non-trivial weights under the authors' key names and PyTorch shapes (nat.py)."""
  rng = np.random.default_rng(seed)
  sd = {}

  def normal(shape, scale):
    return rng.normal(0, scale, shape).astype(np.float32)

  def linear(name, fan_in, fan_out):
    sd[f'{name}.weight'] = normal((fan_out, fan_in), fan_in**-0.5)
    sd[f'{name}.bias'] = normal((fan_out,), 0.1)

  def norm(name, width):
    sd[f'{name}.weight'] = 1 + normal((width,), 0.2)
    sd[f'{name}.bias'] = normal((width,), 0.2)

  sd['patch_embed.proj.0.weight'] = normal((embed_dim // 2, 3, 3, 3), 27**-0.5)
  sd['patch_embed.proj.0.bias'] = normal((embed_dim // 2,), 0.1)
  sd['patch_embed.proj.1.weight'] = normal((embed_dim, embed_dim // 2, 3, 3),
                                           (9 * embed_dim // 2)**-0.5)
  sd['patch_embed.proj.1.bias'] = normal((embed_dim,), 0.1)
  norm('patch_embed.norm', embed_dim)
  for level, (depth, n_heads) in enumerate(zip(depths, heads)):
    dim = embed_dim * 2**level
    for i in range(depth):
      block = f'levels.{level}.blocks.{i}'
      norm(f'{block}.norm1', dim)
      linear(f'{block}.attn.qkv', dim, 3 * dim)
      sd[f'{block}.attn.rpb'] = normal((n_heads, 2 * kernel - 1, 2 * kernel - 1), 1.0)
      linear(f'{block}.attn.proj', dim, dim)
      norm(f'{block}.norm2', dim)
      linear(f'{block}.mlp.fc1', dim, int(dim * mlp_ratio))
      linear(f'{block}.mlp.fc2', int(dim * mlp_ratio), dim)
      if layer_scale:
        sd[f'{block}.gamma1'] = 1 + normal((dim,), 0.3)
        sd[f'{block}.gamma2'] = 1 + normal((dim,), 0.3)
    if level < len(depths) - 1:
      sd[f'levels.{level}.downsample.reduction.weight'] = normal((2 * dim, dim, 3, 3),
                                                                 (9 * dim)**-0.5)
      norm(f'levels.{level}.downsample.norm', 2 * dim)
  norm('norm', embed_dim * 2**(len(depths) - 1))
  linear('head', embed_dim * 2**(len(depths) - 1), classes)
  return sd


# --- neighbourhood attention ----------------------------------------------------------------
def _natten_window_start(index, length, kernel, dilation):
  """NATTEN 0.14's get_window_start (natten_cpu_commons.h), transliterated."""
  n = kernel // 2
  if dilation <= 1:
    return max(index - n, 0) + (index + n >= length) * (length - index - n - 1)
  if index - n * dilation < 0:
    return index % dilation
  if index + n * dilation >= length:
    imodd, a = index % dilation, length // dilation * dilation
    b = length - a
    return length - b + imodd - 2 * n * dilation if imodd < b else a + imodd - kernel * dilation
  return index - n * dilation


def _natten_pb_start(index, length, kernel, dilation):
  """NATTEN 0.14's get_pb_start, transliterated: the bias row of the window's first key."""
  n = kernel // 2
  if dilation <= 1:
    return n + (index < n) * (n - index) + (index + n >= length) * (length - index - 1 - n)
  if index - n * dilation < 0:
    return kernel - 1 - index // dilation
  if index + n * dilation >= length:
    return (length - index - 1) // dilation
  return n


@pytest.mark.parametrize('kernel', [3, 5, 7])
@pytest.mark.parametrize('dilation', [1, 2, 3, 4])
def test_axis_neighbours_equal_natten_window_and_bias_starts(kernel, dilation):
  for length in range(kernel * dilation, kernel * dilation + 12):
    keys, bias = neighborhood_attention.axis_neighbours(length, kernel, dilation)
    for i in range(length):
      assert list(keys[i]) == _neighbours(length, kernel, dilation, i)
      assert keys[i, 0] == _natten_window_start(i, length, kernel, dilation)
      assert list(bias[i]) == list(range(_natten_pb_start(i, length, kernel, dilation),
                                         _natten_pb_start(i, length, kernel, dilation) + kernel))


@pytest.mark.parametrize('h,w,kernel,dilation', [
    (7, 9, 3, 1),  # Odd sizes; every border row and column shifted inward.
    (5, 5, 5, 1),  # The map is one window.
    (9, 11, 3, 2),  # Dilated, sides not multiples of the dilation: unequal sub-grids.
    (13, 10, 3, 3),
])
def test_neighborhood_attention_equals_numpy_definition(h, w, kernel, dilation):
  rng = np.random.default_rng(h * w + dilation)
  q, k, v = (rng.normal(size=(2, h, w, 2, 4)).astype(np.float32) for _ in range(3))
  rpb = rng.normal(size=(2, 2 * kernel - 1, 2 * kernel - 1)).astype(np.float32)
  with jax.default_matmul_precision('highest'):
    got = neighborhood_attention.neighborhood_attention(q, k, v, rpb, dilation)
  np.testing.assert_allclose(np.asarray(got), na_numpy(q, k, v, rpb, dilation), atol=2e-5)


def test_neighborhood_attention_refuses_maps_smaller_than_the_dilated_window():
  x = np.zeros((1, 5, 8, 1, 2), np.float32)
  with pytest.raises(ValueError, match='at least kernel x dilation = 6'):
    neighborhood_attention.neighborhood_attention(x, x, x, np.zeros((1, 5, 5)), 2)


# --- blocks and the whole network -----------------------------------------------------------
@pytest.mark.parametrize('size,dilation,layer_scale', [
    (6, 1, None),  # NAT block at the borders.
    (7, 2, 1e-5),  # DiNAT block with layer scale, padded to 3 x 2 = 8 then cropped.
    (4, 3, None),  # Both sides padded (to 9).
])
def test_block_equals_numpy_composition(size, dilation, layer_scale):
  sd = authors_state_dict(size, 8, (1,), (2,), 2.0, 3, layer_scale, 4)
  block = {k[len('levels.0.blocks.0.'):]: v for k, v in sd.items()
           if k.startswith('levels.0.blocks.0.')}
  x = np.random.default_rng(0).normal(size=(2, size, size + 1, 8)).astype(np.float32)
  layer = nat.NATLayer(2, 3, dilation, 2.0, layer_scale)
  with jax.default_matmul_precision('highest'):
    got = jax.jit(layer.apply)({'params': nat.from_authors(block)}, x)
  want = block_numpy(x, sd, 'levels.0.blocks.0', 2, 3, dilation)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())


TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), mlp_ratio=2.0, kernel_size=3,
            dilations=((1, 2), (1, 1)), layer_scale=1e-5)


def _tiny_state_dict(classes=5):
  return authors_state_dict(1, TINY['embed_dim'], TINY['depths'], TINY['num_heads'],
                            TINY['mlp_ratio'], TINY['kernel_size'], True, classes)


def test_authors_safetensors_load_and_the_network_equals_numpy(tmp_path):
  sd = _tiny_state_dict()
  path = str(tmp_path / 'dinat_tiny_test.safetensors')
  safetensors.numpy.save_file(sd, path)
  variables = checkpoint.load_variables(path)
  assert list(variables) == ['params']
  model = get_model('dinat_mini', 5, **TINY)
  # 20 px: level 0 is 5 x 5, padded to 3 x 2 = 6 for its dilated block; level 1 is 3 x 3.
  images = np.random.default_rng(2).normal(size=(2, 20, 20, 3)).astype(np.float32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))['params']
  assert jax.tree.map(np.shape, variables['params']) == jax.tree.map(np.shape, expected)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(model.apply)(variables, images))
  want = network_numpy(images, sd, TINY['num_heads'], 3, TINY['dilations'])
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize('case', sorted(AUTHORS['cases']))
def test_logits_equal_the_authors_code_on_random_weights(case):
  fixture = np.load(FIXTURES / 'nat_authors.npz')
  prefix = f'{case}/sd/'
  sd = {k[len(prefix):]: fixture[k] for k in fixture.files if k.startswith(prefix)}
  spec = AUTHORS['cases'][case]
  model = get_model('nat_mini', 5, embed_dim=spec['embed_dim'], depths=tuple(spec['depths']),
                    num_heads=tuple(spec['num_heads']), mlp_ratio=spec['mlp_ratio'],
                    kernel_size=spec['kernel_size'], layer_scale=spec['layer_scale'],
                    dilations=tuple(map(tuple, spec.get('dilations') or [])) or None)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(model.apply)({'params': nat.from_authors(sd)},
                                          fixture[f'{case}/images']))
  want = fixture[f'{case}/logits']
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4 * np.abs(want).max())


def test_load_pretrained_new_head_and_new_resolution(tmp_path):
  sd = _tiny_state_dict(classes=7)
  path = str(tmp_path / 'nat.safetensors')
  safetensors.numpy.save_file(sd, path)
  model = get_model('dinat_mini', 3, **TINY)
  # The bias tables are (heads, 2k - 1, 2k - 1) at any resolution: all but the head fit as-is.
  want = jax.tree.map(np.shape, nat.from_authors(sd))
  want['head'] = {'kernel': (32, 3), 'bias': (3,)}
  for size in (48, 64):
    shapes = jax.eval_shape(lambda s=size: model.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, s, s, 3))))
    assert jax.tree.map(np.shape, shapes['params']) == want
  rng = np.random.default_rng(3)  # Stand-ins for fresh params: the head must come from them.
  init = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes['params'])
  params = checkpoint.load_pretrained(path, init)
  np.testing.assert_array_equal(params['head']['kernel'], init['head']['kernel'])
  np.testing.assert_array_equal(params['levels_0']['blocks_1']['attn']['rpb'],
                                sd['levels.0.blocks.1.attn.rpb'])
  np.testing.assert_array_equal(params['levels_1']['blocks_0']['attn']['qkv']['kernel'],
                                sd['levels.1.blocks.0.attn.qkv.weight'].T)
  logits = jax.jit(model.apply)({'params': params}, jnp.ones((1, 48, 48, 3)))
  assert logits.shape == (1, 3)


def test_authors_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  path = tmp_path / 'nat_mini.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)
  with pytest.raises(checkpoint.CheckpointError, match='needs torch'):
    checkpoint.load_variables(str(path))


# --- the registry ---------------------------------------------------------------------------
# classification/dinat.py, copied: every DiNAT name uses these per-block dilations.
AUTHORS_DILATIONS = {
    (3, 4, 6, 5): [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]],
    (3, 4, 18, 5): [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize('name', ['dinat_mini', 'dinat_tiny', 'dinat_small', 'dinat_base'])
def test_dinat_dilations_are_the_authors(name):
  spec = MODEL_SPECS[name]
  assert [list(d) for d in spec['dilations']] == AUTHORS_DILATIONS[spec['depths']]
  assert MODEL_SPECS[name.replace('dinat', 'nat')]['dilations'] is None


AUTHORS_COUNTS = AUTHORS['counts']
# Their README tables (classification/NAT.md, DiNAT.md), in millions.
PUBLISHED_MILLIONS = {'mini': 20, 'tiny': 28, 'small': 51, 'base': 90}


@pytest.mark.parametrize('name', sorted(AUTHORS_COUNTS))
def test_parameter_counts_equal_the_authors(name):
  model = get_model(name, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert count == AUTHORS_COUNTS[name]
  assert round(count / 1e6) == PUBLISHED_MILLIONS[name.split('_')[1]]
