"""The model names, their hyper-parameters (official ones from `vit_jax/configs/models.py`)
and the input convention their released weights expect."""
import dataclasses
from typing import Any, Dict, Optional, Tuple

# Each entry: the module class name and its keyword arguments.
ModelSpec = Dict[str, Any]

_VIT_SIZES = {
    # name: (hidden_size, mlp_dim, num_heads, num_layers, dropout_rate)
    'Ti': (192, 768, 3, 12, 0.0),
    'S': (384, 1536, 6, 12, 0.0),
    'B': (768, 3072, 12, 12, 0.0),
    'L': (1024, 4096, 16, 24, 0.1),
    'H': (1280, 5120, 16, 32, 0.1),
}


def _vit(size: str, patch: int, **overrides) -> ModelSpec:
  hidden, mlp, heads, layers, dropout = _VIT_SIZES[size]
  spec = dict(kind='vit', patch_size=(patch, patch), hidden_size=hidden,
              mlp_dim=mlp, num_heads=heads, num_layers=layers,
              dropout_rate=dropout, attention_dropout_rate=0.0,
              classifier='token', representation_size=None)
  spec.update(overrides)
  return spec


def _bit(depth: int, width: int) -> ModelSpec:
  return dict(kind='bit', depth=depth, width_factor=width)


def _mixer(patch: int, hidden: int, blocks: int, tokens_mlp: int, channels_mlp: int,
           **overrides) -> ModelSpec:
  return dict(kind='mixer', patch_size=(patch, patch), hidden_dim=hidden, num_blocks=blocks,
              tokens_mlp_dim=tokens_mlp, channels_mlp_dim=channels_mlp, **overrides)


MODEL_SPECS: Dict[str, ModelSpec] = {
    'testing': dict(kind='vit', patch_size=(16, 16), hidden_size=10, mlp_dim=10,
                    num_heads=2, num_layers=1, dropout_rate=0.1,
                    attention_dropout_rate=0.0, classifier='token',
                    representation_size=None),
    'ViT-Ti_16': _vit('Ti', 16),
    'ViT-S_16': _vit('S', 16),
    'ViT-B_16': _vit('B', 16),
    'ViT-L_16': _vit('L', 16),
    'ViT-H_14': _vit('H', 14),
    'ViT-B_8': _vit('B', 8),
    'ViT-S_32': _vit('S', 32),
    'ViT-B_32': _vit('B', 32),
    'ViT-L_32': _vit('L', 32, dropout_rate=0.0),
    'ViT-S_16-gap-norep': _vit('S', 16, classifier='gap'),
    'ViT-B_16-gap-norep': _vit('B', 16, classifier='gap'),
    'ViT-S_32-gap-norep': _vit('S', 32, classifier='gap'),
    'ViT-B_32-gap-norep': _vit('B', 32, classifier='gap'),
    'R+ViT-Ti_16': _vit('Ti', 8, resnet_layers=(), resnet_width=1),
    'R26+ViT-S_32': _vit('S', 1, resnet_layers=(2, 2, 2, 2), resnet_width=1),
    'R26+ViT-B_32': _vit('B', 1, resnet_layers=(2, 2, 2, 2), resnet_width=1),
    'R50+ViT-B_16': _vit('B', 1, resnet_layers=(3, 4, 9), resnet_width=1,
                         dropout_rate=0.1),
    'R50+ViT-L_32': _vit('L', 1, resnet_layers=(3, 4, 6, 3), resnet_width=1),
}
def _swin(embed_dim: int, depths: Tuple[int, ...], heads: Tuple[int, ...], window: int
          ) -> ModelSpec:
  return dict(kind='swin', embed_dim=embed_dim, depths=depths, num_heads=heads,
              window_size=window)


# timm's Swin Transformer v1 names.
_SWIN_T, _SWIN_S = (2, 2, 6, 2), (2, 2, 18, 2)
MODEL_SPECS.update({
    'swin_tiny_patch4_window7_224': _swin(96, _SWIN_T, (3, 6, 12, 24), 7),
    'swin_small_patch4_window7_224': _swin(96, _SWIN_S, (3, 6, 12, 24), 7),
    'swin_base_patch4_window7_224': _swin(128, _SWIN_S, (4, 8, 16, 32), 7),
    'swin_base_patch4_window12_384': _swin(128, _SWIN_S, (4, 8, 16, 32), 12),
    'swin_large_patch4_window7_224': _swin(192, _SWIN_S, (6, 12, 24, 48), 7),
    'swin_large_patch4_window12_384': _swin(192, _SWIN_S, (6, 12, 24, 48), 12),
})
# timm's (and torchvision's) ResNet v1.5 names.
MODEL_SPECS.update({f'resnet{depth}': dict(kind='resnet_v1', layers=layers)
                    for depth, layers in ((50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)),
                                          (152, (3, 8, 36, 3)))})
# `vit_jax/configs/models.py`: the Mixers of "MLP-Mixer: An all-MLP Architecture for Vision".
MODEL_SPECS.update({
    'Mixer-B_16': _mixer(16, 768, 12, 384, 3072),
    'Mixer-B_32': _mixer(32, 768, 12, 384, 3072),
    'Mixer-L_16': _mixer(16, 1024, 24, 512, 4096),
    # timm's names of the same networks: exact GELU.
    'mixer_b16_224': _mixer(16, 768, 12, 384, 3072, gelu_approximate=False),
    'mixer_l16_224': _mixer(16, 1024, 24, 512, 4096, gelu_approximate=False),
})
# timm's MaxViT ported from the TensorFlow release ('tf' configs); the partitions follow the
# image size (image_size // 32), so the 224 and 384 names share a spec.
_MAXVIT_T = dict(kind='maxvit', embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2),
                 head_hidden_size=512)
_MAXVIT_S = dict(kind='maxvit', embed_dim=(96, 192, 384, 768), depths=(2, 2, 5, 2),
                 head_hidden_size=768)
_MAXVIT_B = dict(_MAXVIT_S, depths=(2, 6, 14, 2))
MODEL_SPECS.update({
    'maxvit_tiny_tf_224': _MAXVIT_T,
    'maxvit_small_tf_224': _MAXVIT_S,
    'maxvit_base_tf_224': _MAXVIT_B,
    'maxvit_base_tf_384': _MAXVIT_B,
})
# timm's DaViT names: (depths, embed_dims, num_heads).
MODEL_SPECS.update({
    f'davit_{size}': dict(kind='davit', depths=depths, embed_dims=dims, num_heads=heads)
    for size, depths, dims, heads in (
        ('tiny', (1, 1, 3, 1), (96, 192, 384, 768), (3, 6, 12, 24)),
        ('small', (1, 1, 9, 1), (96, 192, 384, 768), (3, 6, 12, 24)),
        ('base', (1, 1, 9, 1), (128, 256, 512, 1024), (4, 8, 16, 32)))
})


def _nat(embed_dim: int, depths: Tuple[int, ...], heads: Tuple[int, ...], mlp_ratio: float,
         layer_scale: Optional[float] = None, dilated: bool = False) -> ModelSpec:
  # DiNAT (classification/dinat.py): dilation 8, 4, 2 on every other block of levels 0-2.
  dilations = tuple(tuple(dilation if i % 2 else 1 for i in range(depth))
                    for depth, dilation in zip(depths, (8, 4, 2, 1))) if dilated else None
  return dict(kind='nat', embed_dim=embed_dim, depths=depths, num_heads=heads,
              mlp_ratio=mlp_ratio, kernel_size=7, dilations=dilations, layer_scale=layer_scale)


# The authors' NAT and DiNAT names (SHI-Labs/Neighborhood-Attention-Transformer).
_NAT_M, _NAT_T = (3, 4, 6, 5), (3, 4, 18, 5)
MODEL_SPECS.update({
    'nat_mini': _nat(64, _NAT_M, (2, 4, 8, 16), 3),
    'nat_tiny': _nat(64, _NAT_T, (2, 4, 8, 16), 3),
    'nat_small': _nat(96, _NAT_T, (3, 6, 12, 24), 2, layer_scale=1e-5),
    'nat_base': _nat(128, _NAT_T, (4, 8, 16, 32), 2, layer_scale=1e-5),
    'dinat_mini': _nat(64, _NAT_M, (2, 4, 8, 16), 3, dilated=True),
    'dinat_tiny': _nat(64, _NAT_T, (2, 4, 8, 16), 3, dilated=True),
    'dinat_small': _nat(96, _NAT_T, (3, 6, 12, 24), 2, dilated=True),  # No layer scale.
    'dinat_base': _nat(128, _NAT_T, (4, 8, 16, 32), 2, layer_scale=1e-5, dilated=True),
})
for _prefix in ('BiT-S', 'BiT-M'):
  for _depth, _width in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4)):
    MODEL_SPECS[f'{_prefix}-R{_depth}x{_width}'] = _bit(_depth, _width)

# AugReg checkpoint prefixes (`B_16`, `R_Ti_16`, `R26_S_32`) -> model names; the official
# code leaves out these four, which have no AugReg checkpoints.
_NOT_AUGREG = ('testing', 'ViT-L_32', 'R50+ViT-B_16', 'ViT-H_14')
AUGREG_NAMES = {
    name.replace('ViT-', '').replace('+', '_'): name
    for name, spec in MODEL_SPECS.items()
    if spec['kind'] == 'vit' and name not in _NOT_AUGREG
}


@dataclasses.dataclass(frozen=True)
class InputConvention:
  """How a model's released weights expect their images (timm's `pretrained_cfg` fields)."""

  # Per-channel mean and std of pixels scaled to [0, 1]; 0.5 and 0.5 is the official [-1, 1].
  mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
  # A `tf.image.resize` method for every resize, antialiased as PIL; None keeps each op's own
  # (official: bilinear crops and resizes, big_vision's area for `pp.resize`).
  interpolation: Optional[str] = None
  # Test time: None resizes the whole image to the crop (official); else timm's shorter side
  # to floor(crop / crop_pct), then the central crop.
  crop_pct: Optional[float] = None
  input_size: int = 224  # The resolution the weights were trained at.


# The official ViT, hybrid, BiT and Mixer `.npz` files: the official vit_jax pipeline.
OFFICIAL_INPUT = InputConvention()
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timm_input(crop_pct: float, input_size: int = 224, interpolation: str = 'bicubic',
               mean: Tuple[float, float, float] = IMAGENET_MEAN,
               std: Tuple[float, float, float] = IMAGENET_STD) -> InputConvention:
  """The convention of a timm name's default pretrained tag (`timm.create_model(name)
  .pretrained_cfg`)."""
  return InputConvention(mean, std, interpolation, crop_pct, input_size)


# Per name; the timm names from the pretrained_cfg of each name's default tag (timm 1.0).
INPUT_CONVENTIONS: Dict[str, InputConvention] = {
    name: OFFICIAL_INPUT for name, spec in MODEL_SPECS.items()
    if spec['kind'] in ('vit', 'bit') or name.startswith('Mixer-')}
INPUT_CONVENTIONS.update({
    'swin_tiny_patch4_window7_224': timm_input(0.9),  # .ms_in1k
    'swin_small_patch4_window7_224': timm_input(0.9),  # .ms_in22k_ft_in1k, as the rest.
    'swin_base_patch4_window7_224': timm_input(0.9),
    'swin_base_patch4_window12_384': timm_input(1.0, 384),
    'swin_large_patch4_window7_224': timm_input(0.9),
    'swin_large_patch4_window12_384': timm_input(1.0, 384),
    'resnet50': timm_input(0.95),  # .a1_in1k (torchvision's .tv_in1k: bilinear, 0.875).
    'resnet101': timm_input(0.95),  # .a1h_in1k
    'resnet152': timm_input(0.95),  # .a1h_in1k
    'mixer_b16_224': timm_input(0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    'mixer_l16_224': timm_input(0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    'maxvit_tiny_tf_224': timm_input(0.95),  # .in1k
    'maxvit_small_tf_224': timm_input(0.95),
    'maxvit_base_tf_224': timm_input(0.95),
    # .in1k, crop_mode 'squash': the whole image resized to 384 x 384 (crop_pct None here).
    'maxvit_base_tf_384': InputConvention(interpolation='bicubic', input_size=384),
    'davit_tiny': timm_input(0.95),  # .msft_in1k
    'davit_small': timm_input(0.95),
    'davit_base': timm_input(0.95),
})
# The authors' NAT and DiNAT: no pretrained_cfg of their own, so timm's defaults of their
# training code.
INPUT_CONVENTIONS.update({name: timm_input(0.875) for name, spec in MODEL_SPECS.items()
                          if spec['kind'] == 'nat'})
