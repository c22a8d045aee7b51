"""Independent numpy forward passes of ViT, the hybrid stem and BiT, written from the papers
and the official code's equations (not from this project's modules), for comparison."""
import math

import numpy as np


def conv2d(x, w, stride, pad):
  """NHWC x HWIO convolution with explicit ((top, bottom), (left, right)) zero padding."""
  x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw, cin, cout = w.shape
  n, h, wd, _ = x.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((n, oh, ow, cout), np.float64)
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
      out += patch @ w[i, j]
  return out


def same_pad(size, kernel, stride):
  """TensorFlow SAME padding (before, after) for one spatial axis."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2)


def max_pool(x, kernel, stride, pad, pad_value):
  x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)), constant_values=pad_value)
  n, h, w, c = x.shape
  oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
  out = np.full((n, oh, ow, c), -np.inf)
  for i in range(kernel):
    for j in range(kernel):
      out = np.maximum(out, x[:, i:i + stride * oh:stride, j:j + stride * ow:stride])
  return out


def group_norm(x, scale, bias, groups, eps):
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(n, h, w, c) * scale + bias


def layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def relu(x):
  return np.maximum(x, 0)


def ws_std_eps(w, eps=1e-5):
  """Hybrid stem: (w - mean) / (std + eps) over H, W, Cin."""
  m = w.mean(axis=(0, 1, 2))
  s = w.std(axis=(0, 1, 2))
  return (w - m) / (s + eps)


def ws_var_eps(w, eps=1e-10):
  """BiT: (w - mean) / sqrt(var + eps) over H, W, Cin."""
  m = w.mean(axis=(0, 1, 2))
  v = ((w - m) ** 2).mean(axis=(0, 1, 2))
  return (w - m) / np.sqrt(v + eps)


def attention(x, p, num_heads):
  def proj(name):
    return np.einsum('btd,dhk->bthk', x, p[name]['kernel']) + p[name]['bias']
  q, k, v = proj('query'), proj('key'), proj('value')
  logits = np.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(q.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bhqt,bthk->bqhk', weights, v)
  return np.einsum('bqhk,hkd->bqd', out, p['out']['kernel']) + p['out']['bias']


def hybrid_stem(x, p, num_layers):
  """vit_jax hybrid root + post-activation bottleneck stages."""
  def conv(x, w, stride):
    k = w.shape[0]
    pad = (same_pad(x.shape[1], k, stride), same_pad(x.shape[2], k, stride))
    return conv2d(x, ws_std_eps(w), stride, pad)

  def gn(x, q):
    return group_norm(x, q['scale'], q['bias'], 32, 1e-6)

  x = relu(gn(conv(x, p['conv_root']['kernel'], 2), p['gn_root']))
  pad = (same_pad(x.shape[1], 3, 2), same_pad(x.shape[2], 3, 2))
  x = max_pool(x, 3, 2, pad, -np.inf)
  for b, units in enumerate(num_layers):
    for u in range(units):
      q = p[f'block{b + 1}'][f'unit{u + 1}']
      stride = 2 if (b > 0 and u == 0) else 1
      residual = x
      if 'conv_proj' in q:
        residual = gn(conv(x, q['conv_proj']['kernel'], stride), q['gn_proj'])
      y = relu(gn(conv(x, q['conv1']['kernel'], 1), q['gn1']))
      y = relu(gn(conv(y, q['conv2']['kernel'], stride), q['gn2']))
      y = gn(conv(y, q['conv3']['kernel'], 1), q['gn3'])
      x = relu(residual + y)
  return x


def sincos_2d(h, w, width, temperature=10_000.0):
  """Fixed 2-D embeddings from the definition: row y, column x, width/4 frequencies each."""
  quarter = width // 4
  table = np.zeros((h * w, width))
  for y in range(h):
    for x in range(w):
      for d in range(quarter):
        omega = temperature ** (-d / (quarter - 1))
        row = table[y * w + x]
        row[d], row[quarter + d] = np.sin(x * omega), np.cos(x * omega)
        row[2 * quarter + d], row[3 * quarter + d] = np.sin(y * omega), np.cos(y * omega)
  return table


def vit_forward(params, images, *, num_heads, patch, classifier='token',
                resnet_layers=None, posemb='learned'):
  """Official ViT forward pass (inference) on NHWC images; `posemb` as the model option."""
  p = {k: v for k, v in params.items()}
  x = np.asarray(images, np.float64)
  if resnet_layers is not None:
    x = hybrid_stem(x, p, resnet_layers)
  x = conv2d(x, p['embedding']['kernel'], patch, ((0, 0), (0, 0))) + p['embedding']['bias']
  n, h, w, c = x.shape
  x = x.reshape(n, h * w, c)
  if classifier == 'token':
    x = np.concatenate([np.broadcast_to(p['cls'], (n, 1, c)), x], axis=1)
  t = p['Transformer']
  if posemb == 'learned':
    x = x + t['posembed_input']['pos_embedding']
  elif posemb == 'sincos2d':
    x[:, x.shape[1] - h * w:] += sincos_2d(h, w, c)  # The class token's embedding is zero.
  i = 0
  while f'encoderblock_{i}' in t:
    blk = t[f'encoderblock_{i}']
    y = attention(layer_norm(x, blk['LayerNorm_0']), blk['MultiHeadDotProductAttention_0'],
                  num_heads)
    x = x + y
    y = layer_norm(x, blk['LayerNorm_1'])
    mlp = blk['MlpBlock_0']
    y = gelu_tanh(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    x = x + (y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias'])
    i += 1
  x = layer_norm(x, t['encoder_norm'])
  x = x[:, 0] if classifier == 'token' else x.mean(axis=1)
  if 'pre_logits' in p and p['pre_logits']:
    x = np.tanh(x @ p['pre_logits']['kernel'] + p['pre_logits']['bias'])
  i = 0
  while f'head_hidden_{i}' in p:
    x = gelu_tanh(x @ p[f'head_hidden_{i}']['kernel'] + p[f'head_hidden_{i}']['bias'])
    i += 1
  return x @ p['head']['kernel'] + p['head']['bias']


def bit_forward(params, images, block_sizes):
  """BiT ResNet-v2 forward pass (big_transfer's equations) on NHWC images."""
  def conv(x, w, stride, k):
    pad = ((k - 1) // 2, (k - 1) - (k - 1) // 2)
    return conv2d(x, ws_var_eps(w), stride, (pad, pad))

  def gn(x, q):
    return group_norm(x, q['scale'], q['bias'], 32, 1e-5)

  p = params
  x = np.asarray(images, np.float64)
  x = conv(x, p['root_block']['conv_root']['kernel'], 2, 7)
  x = max_pool(x, 3, 2, ((1, 1), (1, 1)), 0.0)
  for b, units in enumerate(block_sizes):
    for u in range(units):
      q = p[f'block{b + 1}'][f'unit{u + 1:02d}']
      stride = 2 if (b > 0 and u == 0) else 1
      pre = relu(gn(x, q['gn1']))
      shortcut = conv(pre, q['conv_proj']['kernel'], stride, 1) if 'conv_proj' in q else x
      y = conv(pre, q['conv1']['kernel'], 1, 1)
      y = conv(relu(gn(y, q['gn2'])), q['conv2']['kernel'], stride, 3)
      y = conv(relu(gn(y, q['gn3'])), q['conv3']['kernel'], 1, 1)
      x = y + shortcut
  x = relu(gn(x, p['norm-pre-head'])).mean(axis=(1, 2))
  return x @ p['head']['kernel'] + p['head']['bias']


def mixer_forward(params, images, *, patch):
  """Official MLP-Mixer forward pass (`vit_jax/models_mixer.py`'s equations) on NHWC images."""
  x = np.asarray(images, np.float64)
  x = conv2d(x, params['stem']['kernel'], patch, ((0, 0), (0, 0))) + params['stem']['bias']
  n, h, w, c = x.shape
  x = x.reshape(n, h * w, c)

  def mlp(y, q):
    y = gelu_tanh(y @ q['Dense_0']['kernel'] + q['Dense_0']['bias'])
    return y @ q['Dense_1']['kernel'] + q['Dense_1']['bias']

  i = 0
  while f'MixerBlock_{i}' in params:
    block = params[f'MixerBlock_{i}']
    y = layer_norm(x, block['LayerNorm_0']).transpose(0, 2, 1)
    x = x + mlp(y, block['token_mixing']).transpose(0, 2, 1)
    x = x + mlp(layer_norm(x, block['LayerNorm_1']), block['channel_mixing'])
    i += 1
  x = layer_norm(x, params['pre_head_layer_norm']).mean(axis=1)
  return x @ params['head']['kernel'] + params['head']['bias']
