r"""Small ViTs trained from scratch on 32 px CIFAR-10, with a from-scratch recipe.

  python -m vit_jax_ft.main --config=configs/scratch/cifar10.py:ti --workdir=runs/scratch_ti

SIZE: `ti` (ViT-Ti widths), `s` (ViT-S widths) or `ablation` (the position-embedding study's:
12 layers, 8 heads, ViT-S widths), all on 4 px patches: an 8x8 grid of tokens. The sizes are
model overrides of the official names (config.json records the architecture built).
Recipe (DeiT's, scaled to CIFAR): AdamW at 1e-3 after 5 epochs of linear warm-up, cosine
decay, decoupled weight decay 0.05 on kernels only (not biases, norms, the class token or
position embeddings: defaults.weight_decay_params), clipping at 1, batch 256 for about 100
epochs of train[:98%]; 4 px zero padding, a random 32 px crop and a random flip.
`--config.dataset=ROOT` trains on an image folder instead (`bench/scratch_cifar10.py` does).
"""
import ml_collections

from vit_jax_ft import defaults

CROP = 32
PATCH = 4
# SIZE -> (official name the overrides start from, architecture overrides).
SIZES = {
    'ti': ('ViT-Ti_16', dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12)),
    's': ('ViT-S_16', dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12)),
    'ablation': ('ViT-S_16', dict(hidden_size=384, mlp_dim=1536, num_heads=8, num_layers=12)),
}
# Any image size becomes 32 px first (a no-op on CIFAR), so folders of other sizes work too.
TRAIN_OPS = f'decode|resize({CROP})|pad(4)|random_crop({CROP})|flip_lr|value_range(-1,1)'
TEST_OPS = f'decode|resize({CROP})|value_range(-1,1)'


def get_config(size: str = 'ti') -> ml_collections.ConfigDict:
  """Returns the from-scratch recipe for the ViT of `size` on CIFAR-10 at 32 px."""
  if size not in SIZES:
    raise ValueError(f'Unknown from-scratch ViT size {size!r}; allowed: {sorted(SIZES)}.')
  config = defaults.with_dataset(defaults.get_config(), 'cifar10')
  config.pretrained_dir = ''  # From scratch.
  config.model_name, architecture = SIZES[size]
  config.model.update(dict(architecture, patch_size=(PATCH, PATCH), dropout_rate=0.0))
  config.pp.crop = CROP
  config.pp.train_ops = TRAIN_OPS
  config.pp.test_ops = TEST_OPS
  config.optimizer = 'adamw'
  config.optim_dtype = 'float32'
  config.base_lr = 1e-3
  config.weight_decay = 0.05
  config.grad_norm_clip = 1.0
  config.decay_type = 'cosine'
  config.batch = 256
  config.batch_eval = 500
  config.accum_steps = 1
  config.total_steps = 20_000  # 104 epochs of the 49,000 images of train[:98%].
  config.warmup_steps = 1_000
  config.eval_every = 2_000
  config.checkpoint_every = 2_000
  return config
