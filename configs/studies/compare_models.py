r"""ViT-B/32 against Swin-B, ViT-B/16 against ResNet-50 and ResNet-152, full and head-only.

  python -m vit_jax_ft.sweep --config=configs/studies/compare_models.py:cifar10 \
      --workdir=runs/compare

Every model fine-tunes on the tfds dataset at 224 px (Swin-B's window 7 needs it) for
2,500 steps with SGD, the learning rate in {0.003, 0.01, 0.03} chosen on the held-out 2% of
`train`; each model in two modes: all parameters with BatchNorm statistics updated, and
head-only (`freeze=backbone`) with them frozen, so the backbone is a fixed feature extractor.
One table: test top-1, macro F1 (from the confusion matrix) and the final model's inference
time per image (`ms_per_image`, batch `batch_eval`) for each model and mode.

The weights: ViTs from ImageNet-21k (`python -m vit_jax_ft.hub fetch imagenet21k/ViT-B_16`),
Swin-B and the ResNets from timm's default `.safetensors` files on the Hugging Face Hub
(ImageNet-22k then 1k, and 1k), all by their public names: the first host fetches each once
(`python -m vit_jax_ft.hub fetch timm/resnet50` does it ahead).
"""
import ml_collections

from vit_jax_ft import defaults, studies

# (model name, pretrained checkpoint): public names of `python -m vit_jax_ft.hub list`.
MODELS = (
    ('ViT-B_32', 'imagenet21k/ViT-B_32'),
    ('swin_base_patch4_window7_224', 'timm/swin_base_patch4_window7_224'),
    ('ViT-B_16', 'imagenet21k/ViT-B_16'),
    ('resnet50', 'timm/resnet50'),
    ('resnet152', 'timm/resnet152'),
)
# Full fine-tuning with BatchNorm statistics updated; head-only with them frozen.
MODES = (('freeze', ((), ('backbone',))), ('batch_norm', ('train', 'frozen')))


def get_config(dataset: str = 'cifar10') -> ml_collections.ConfigDict:
  """Returns the comparison on `dataset`: 5 models x 2 modes x 3 learning rates."""
  config = defaults.with_dataset(defaults.get_config(), dataset)
  config.pp.crop = 224
  config.total_steps, config.warmup_steps = 2_500, 200
  config.sweep = studies.sweep_options()
  names, paths = zip(*MODELS)
  config.sweep.axes = ((('model_name', names), ('pretrained_path', paths)), MODES,
                       ('base_lr', (0.003, 0.01, 0.03)))
  config.sweep.dev_split = 'train[' + config.pp.train.split('[:')[1].rstrip(']') + ':]'
  config.sweep.rows = ('model_name', 'freeze')
  config.sweep.metrics = ('test_top1', 'test_macro_f1', 'ms_per_image')
  return config
