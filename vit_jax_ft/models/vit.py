"""Vision Transformer with the official `vit_jax` parameter tree and numerics.

Tree: `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0}`, `Transformer/encoder_norm`, `pre_logits`, `head`;
hybrids add the ResNet stem (`conv_root`, `gn_root`, `blockN/unitM`) in front.
GELU is tanh-approximate and LayerNorm eps is 1e-6, as in the official code.

Mixed precision (`dtype=bfloat16`): parameters stay float32 and are cast to bfloat16 where
they are used, so matmuls, convolutions and activations run in bfloat16, while LayerNorm
statistics, the attention softmax, the classification head (the logits) and the loss stay
float32. `attention='dot_product'` runs cuDNN flash attention when the backend is a GPU, the
dtype bfloat16 or float16 and the head dimension allows it (`attention_implementation`),
else XLA's version, saying why once in the log.
"""
import functools
from typing import Any, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax_ft.models import resnet

Dtype = Any

# Allowed values of the `attention`, `classifier` and `posemb` options.
ATTENTION_KINDS = ('dense', 'dot_product')
CLASSIFIERS = ('token', 'gap')
# 'learned' (official), 'none' (no position information: the ablation), 'sincos2d' (fixed
# 2-D sine-cosine, as big_vision; the class token gets a zero embedding).
POSEMB_KINDS = ('learned', 'none', 'sincos2d')


# cuDNN flash attention's limits (jax `check_is_flash_attention`): half-precision inputs and a
# head dimension that is a multiple of 8, at most 128 (256 from Hopper on; 128 holds on all).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def attention_implementation(backend: str, dtype: Dtype, head_dim: int
                             ) -> Tuple[str, Optional[str]]:
  """('cudnn', None) when cuDNN flash attention can run, else ('xla', why not)."""
  if backend != 'gpu':
    return 'xla', f'the backend is {backend}, and cuDNN attention needs an NVIDIA GPU'
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return 'xla', (f'dtype is {jnp.dtype(dtype).name}, and cuDNN attention needs bfloat16 or '
                   "float16 (set config.dtype='bfloat16')")
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return 'xla', (f'the head dimension {head_dim} is not a multiple of 8 at most '
                   f'{CUDNN_MAX_HEAD_DIM}, as cuDNN attention needs')
  return 'cudnn', None


@functools.lru_cache(maxsize=None)
def _log_fallback(reason: str) -> None:
  """Logs once per reason (every layer of every trace asks)."""
  logging.info('attention="dot_product" uses XLA attention, not cuDNN: %s.', reason)


def fused_attention(query, key, value, bias=None, mask=None, *,
                    dropout_rate: float = 0.0, deterministic: bool = True,
                    dtype: Dtype = None, **unused):
  """`jax.nn.dot_product_attention` for Flax MHA: cuDNN flash attention where it can run."""
  del unused
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError('attention="dot_product" has no attention dropout; set '
                     'attention_dropout_rate=0 or use attention="dense".')
  if dtype is not None:
    query, key, value = (t.astype(dtype) for t in (query, key, value))
  implementation, reason = attention_implementation(jax.default_backend(), query.dtype,
                                                    query.shape[-1])
  if reason:
    _log_fallback(reason)
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                      implementation=implementation)


class MlpBlock(nn.Module):
  """Transformer MLP: Dense, tanh-GELU, dropout, Dense, dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    out_dim = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim)(x), approximate=True)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: attention then MLP, each with a residual."""

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention: str = 'dense'
  sow_attention: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, deterministic: bool):
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(inputs)
    attention_fn = (fused_attention if self.attention == 'dot_product'
                    else nn.dot_product_attention)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        broadcast_dropout=False, deterministic=deterministic,
        dropout_rate=self.attention_dropout_rate, force_fp32_for_softmax=True,
        attention_fn=attention_fn)(x, x, sow_weights=self.sow_attention)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype)(
        y, deterministic=deterministic)
    return x + y


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention: str = 'dense'
  remat: bool = False
  sow_attention: bool = False
  dtype: Dtype = jnp.float32

  posemb: str = 'learned'

  @nn.compact
  def __call__(self, x, *, train: bool, grid: Optional[Tuple[int, int]] = None):
    if self.posemb == 'learned':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif self.posemb == 'sincos2d':
      x = x + sincos_posemb_2d(grid, x.shape[-1], x.shape[1] - grid[0] * grid[1]).astype(x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
    for i in range(self.num_layers):
      x = block(self.mlp_dim, self.num_heads, self.dropout_rate,
                self.attention_dropout_rate, self.attention, self.sow_attention,
                self.dtype, name=f'encoderblock_{i}')(x, not train)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='encoder_norm')(x)


def sincos_posemb_2d(grid: Tuple[int, int], width: int, num_prefix_tokens: int,
                     temperature: float = 10_000.0) -> jax.Array:
  """(1, prefix + h * w, width) fixed embeddings: [sin x, cos x, sin y, cos y] (big_vision)."""
  if width % 4:
    raise ValueError(f'posemb="sincos2d" needs hidden_size divisible by 4, not {width}.')
  y, x = jnp.mgrid[:grid[0], :grid[1]]
  omega = 1.0 / temperature**(jnp.arange(width // 4) / (width // 4 - 1))
  y = jnp.outer(y.flatten(), omega)
  x = jnp.outer(x.flatten(), omega)
  table = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.concatenate([jnp.zeros((num_prefix_tokens, width)), table])[None]


class PatchEmbedding(nn.Module):
  """The official stride-p p x p `nn.Conv` (same parameters and init) as patches @ kernel.

  XLA CPU runs the kernel gradient of that convolution with a slow generic loop inside the
  gradient-accumulation loop (a fifth of the step at accum_steps=8); as one matmul it is fast
  on every backend.
  """

  features: int
  patch_size: Tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    (ph, pw), c = self.patch_size, x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (ph, pw, c, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    n, gh, gw = x.shape[0], x.shape[1] // ph, x.shape[2] // pw  # 'VALID': the rest is cut.
    patches = x[:, :gh * ph, :gw * pw].reshape(n, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, gh, gw, ph * pw * c).astype(self.dtype)
    return patches @ kernel.reshape(ph * pw * c, self.features).astype(self.dtype) + bias.astype(
        self.dtype)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding (BERT init, stddev 0.02)."""

  @nn.compact
  def __call__(self, x):
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                    (1,) + x.shape[1:], jnp.float32)
    return x + pe.astype(x.dtype)


class VisionTransformer(nn.Module):
  """ViT and hybrid ViT; with `num_classes=0` it returns the pre-logits features."""

  num_classes: int
  patch_size: Tuple[int, int]
  hidden_size: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  classifier: str = 'token'
  representation_size: Optional[int] = None
  resnet_layers: Optional[Sequence[int]] = None
  resnet_width: float = 1
  attention: str = 'dense'  # 'dense' (official) or 'dot_product' (cuDNN on GPU in bf16).
  remat: bool = False  # Rematerialise each block to trade compute for memory.
  sow_attention: bool = False  # Store attention weights in 'intermediates'.
  dtype: Dtype = jnp.float32  # Computation dtype; parameters stay float32.
  posemb: str = 'learned'  # One of POSEMB_KINDS.
  head_hidden: Sequence[int] = ()  # Hidden layers (GELU, dropout) before the classifier.
  head_dropout_rate: float = 0.0  # Dropout after each hidden head layer.
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = images.astype(self.dtype)
    if self.resnet_layers is not None:
      x = resnet.hybrid_stem(x, self.resnet_layers, self.resnet_width, self.dtype)
    x = PatchEmbedding(self.hidden_size, tuple(self.patch_size), self.dtype,
                       name='embedding')(x)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
    x = Encoder(self.num_layers, self.mlp_dim, self.num_heads, self.dropout_rate,
                self.attention_dropout_rate, self.attention, self.remat,
                self.sow_attention, self.dtype, self.posemb,
                name='Transformer')(x, train=train, grid=(h, w))
    x = x[:, 0] if self.classifier == 'token' else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                            name='pre_logits')(x))
    if self.num_classes:
      for i, width in enumerate(self.head_hidden):
        x = nn.gelu(nn.Dense(width, dtype=self.dtype, name=f'head_hidden_{i}')(x),
                    approximate=True)
        x = nn.Dropout(self.head_dropout_rate)(x, deterministic=not train)
    x = x.astype(jnp.float32)
    if self.num_classes:  # The logits in float32 under mixed precision too.
      x = nn.Dense(self.num_classes, dtype=jnp.float32, name='head',
                   kernel_init=nn.initializers.zeros)(x)
    return x
