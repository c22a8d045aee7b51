"""Recipe defaults of the official fine-tuning code, plus this project's keys.

Keys that exist in `vit_jax/configs/common.py` keep their names and meanings. The
experiment files in `configs/` start from `get_config()` here; the package never imports
them. As a config file itself (`--config=.../vit_jax_ft/defaults.py`) it gives the defaults.
"""
from typing import Any, Iterator, Optional, Tuple, Union

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the fine-tuning defaults; model and dataset keys are set by `configs/*.py`."""
  config = ml_collections.ConfigDict()
  placeholder = ml_collections.config_dict.placeholder

  # ---- Pretrained start --------------------------------------------------------
  # Folder (local, gs:// or https://) holding `{model_name}.npz`; '' trains from scratch.
  # Experiment files in `configs/` set it relative to the repository, not the shell's folder.
  config.pretrained_dir = ''
  # Explicit checkpoint path; when set it wins over `pretrained_dir`.
  config.pretrained_path = ''

  # ---- Data ----------------------------------------------------------------------
  # A tfds name (`cifar10`) or a folder `ROOT/{train,test}/CLASS/*.jpg`.
  config.dataset = ''
  # Path to manually downloaded dataset files (tfds `manual_dir`).
  config.tfds_manual_dir = placeholder(str)
  # Path to the tensorflow_datasets directory (tfds `data_dir`); None: tfds' default.
  config.tfds_data_dir = placeholder(str)
  # Whether tfds may download (False fails fast when a dataset is not prepared).
  config.tfds_download = False
  # For a single folder ROOT/CLASS/*: share of each class held out as the test split,
  # and the seed of that split (independent of `seed`).
  config.folder_test_fraction = 0.2
  config.folder_split_seed = 0
  # Number of steps; taken from the dataset preset when not given.
  config.total_steps = 10_000

  # ---- Optimisation ----------------------------------------------------------------
  # Clips the global gradient norm to this value (0 or None: no clipping).
  config.grad_norm_clip = 1.0
  # Dtype of the SGD momentum accumulator ('bfloat16' or 'float32').
  config.optim_dtype = 'bfloat16'
  # Splits each batch into this many micro-batches whose gradients are averaged.
  config.accum_steps = 8
  # Instead, pick the fewest micro-batches whose compiled step fits the memory budget (and
  # rematerialise blocks when none fits without), logging the choice; accum_steps is ignored.
  config.auto_accum_steps = False
  # Per-device memory budget in GiB for auto_accum_steps; None: the device's memory limit.
  config.memory_budget_gb = placeholder(float)
  # Optimiser: 'sgd' (momentum 0.9, the paper's), 'adam' or 'adamw'.
  config.optimizer = 'sgd'
  # Momentum of SGD.
  config.momentum = 0.9
  # Decoupled weight decay for every optimiser: each step subtracts
  # learning_rate * weight_decay * param (the paper uses none).
  config.weight_decay = 0.0
  # Regex on '/'-joined parameter names that weight decay applies to; the default decays
  # kernels only (not biases, norms, the class token or position embeddings), as big_vision.
  config.weight_decay_params = r'(^|/)kernel$'

  # Global batch size for training.
  config.batch = 512
  # Global batch size for evaluation.
  config.batch_eval = 512
  # Shuffle buffer over encoded records of streamed tfds splits (in-memory splits are fully
  # permuted every epoch instead).
  config.shuffle_buffer = 50_000
  # tfds splits whose encoded size reaches this many GB are streamed from their files
  # instead of held in memory; 0 streams every tfds split (folders stay in memory).
  # 10 GB keeps ImageNet's validation split (6.3 GB) in memory and streams its train split.
  config.stream_threshold_gb = 10.0
  # Evaluate every so many steps (and at the end); 0 only at the end.
  config.eval_every = 100
  # Log training metrics every so many steps.
  config.progress_every = 10
  # Save a checkpoint every so many steps (and on SIGTERM and at the end); 0: never.
  config.checkpoint_every = 1_000
  # How many checkpoints to keep.
  config.keep_checkpoints = 3
  # Number of batches to prefetch to the devices.
  config.prefetch = 2
  # Also time the final model's inference (`seconds_per_image`: 5 batches of batch_eval after
  # a warm-up, once the final evaluation is done); the studies' runner turns it on.
  config.time_inference = False

  # Base learning rate.
  config.base_lr = 0.03
  # Learning rate decay after warm-up: 'cosine', 'linear' (both official), 'constant',
  # 'exponential' (times `decay_rate` each step), 'step' (times `decay_factor` from each of
  # `decay_milestones`, absolute step numbers) or 'reduce_on_plateau' (below).
  config.decay_type = 'cosine'
  config.decay_rate = 0.999
  config.decay_milestones = ()
  config.decay_factor = 0.1
  # reduce_on_plateau (optax.contrib's): base_lr times a scale that drops by `plateau_factor`
  # once the evaluation loss (raw parameters on config.pp.test, every `eval_every` steps) has
  # not beaten its best by rtol * best + atol for `plateau_patience` evaluations, then waits
  # `plateau_cooldown` evaluations (so eval_every must be >= 1). Evaluations during warm-up do
  # not count. The scale is in the optimiser state, so checkpoints keep it.
  config.plateau_factor = 0.1
  config.plateau_patience = 3
  config.plateau_cooldown = 0
  config.plateau_rtol = 1e-4
  config.plateau_atol = 0.0
  # Layer-wise learning-rate decay as timm's `layer_decay` (ViTs): block i of L learns at
  # layer_decay ** (L - i) times the rate, the embeddings at layer_decay ** (L + 1); 0: off.
  config.layer_decay = 0.0
  # Linear warm-up steps.
  config.warmup_steps = 500

  # ---- Regularisation (timm's names and meanings) -----------------------------------------
  # Label smoothing s: targets 1 - s + s/classes on the label, s/classes elsewhere.
  config.label_smoothing = 0.0
  # Mixup and CutMix on the device, per global batch (before the micro-batch split), each image
  # with the image at the mirrored batch position: lam ~ Beta(alpha, alpha), 0 turns one off.
  # CutMix pastes a box of area ~ (1 - lam) and sets lam to the box's exact area. A batch is
  # mixed with probability `mix_prob`; with both on, CutMix with `mixup_switch_prob`.
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.mix_prob = 1.0
  config.mixup_switch_prob = 0.5
  # Exponential moving average of the parameters (0: off; e.g. 0.9999): ema = d * ema +
  # (1 - d) * params after each step, from the starting parameters, no warm-up of d, so pick
  # 1 / (1 - d) well below total_steps. Kept in checkpoints and evaluated beside the raw
  # parameters (test_ema_* metrics); `python -m vit_jax_ft.evaluate --ema` uses it.
  config.ema_decay = 0.0

  # ---- Model -----------------------------------------------------------------------
  # Official model name (`python -m vit_jax_ft.models` lists them).
  config.model_name = 'ViT-B_16'
  # Overrides of the model's options; None keeps the official value of `model_name`.
  config.model = model_options()
  # Computation dtype: 'float32' (official numerics) or 'bfloat16' (GPU/TPU speed).
  config.dtype = 'float32'
  # Parameters to freeze: regexes on '/'-joined names ('Transformer/encoderblock_[0-5]/'), or
  # 'backbone' to train only the head (`--config.freeze=backbone`).
  config.freeze = ()
  # BatchNorm statistics of models that have them (ResNet v1; others ignore the key): 'train'
  # normalises with each batch's statistics, synchronised over the devices (the global batch,
  # or global micro-batch with accumulation), and updates the running ones, as timm and
  # torchvision fine-tune; 'frozen' normalises with the pretrained statistics and keeps them,
  # for micro-batches too small for stable statistics (under ~16 images) or head-only training.
  config.batch_norm = 'train'

  # ---- Preprocessing -------------------------------------------------------------------
  config.pp = ml_collections.ConfigDict()
  # Train and test splits (tfds split strings, slicing allowed: 'train[:98%]').
  config.pp.train = 'train'
  config.pp.test = 'test'
  # Image size seen by the model.
  config.pp.crop = 384
  # Resize before the crop in the big_vision variant; None for the official pipeline.
  config.pp.resize = placeholder(int)
  # Op strings ('decode|resize(384)|value_range(-1,1)'); None builds them from `crop` and
  # `resize` (official: inception crop + flip for training, resize for testing).
  config.pp.train_ops = placeholder(str)
  config.pp.test_ops = placeholder(str)

  # ---- Data studies --------------------------------------------------------------------
  # Fraction of the training split to use (1.0: all), chosen by `seed`.
  config.train_fraction = 1.0
  # Images per class to keep (0: all), chosen by `seed`.
  config.train_per_class = 0
  # Class balance: '' (none), 'resample' (to `balance_target` images per class) or 'loss_weights'.
  config.balance = ''
  # Images per class after resampling (0: the mean class size).
  config.balance_target = 0
  # Keep decoded training images in memory (small datasets).
  config.cache = False
  # What a corrupt image does: 'skip' (counted in the logs) or 'error' (stops, naming the file).
  config.on_corrupt_image = 'skip'

  # ---- Run -------------------------------------------------------------------------------
  # Seed of initialisation, data order, augmentation and dropout.
  config.seed = 0
  return config


def model_options() -> ml_collections.ConfigDict:
  """Model options settable from the command line (`--config.model.remat=True`)."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict({
      # Dropout after attention and in the MLP, and on attention weights.
      'dropout_rate': placeholder(float),
      'attention_dropout_rate': placeholder(float),
      # 'dense' (official) or 'dot_product' (jax.nn.dot_product_attention, flash on GPU).
      'attention': placeholder(str),
      # Rematerialise each block: less memory, about a third more compute.
      'remat': placeholder(bool),
      # Size of the tanh pre-logits layer (None: none, as in fine-tuning).
      'representation_size': placeholder(int),
      # 'token' (class token) or 'gap' (global average pooling).
      'classifier': placeholder(str),
      # Position embeddings: 'learned' (official), 'none' or 'sincos2d' (fixed, big_vision).
      'posemb': placeholder(str),
      # Hidden layers before the classifier, e.g. (512,), each GELU then dropout.
      'head_hidden': placeholder(tuple),
      'head_dropout_rate': placeholder(float),
  })


# The paper's transfer setup (`vit_jax/configs/common.py` and the ViT paper, appendix B.1.1).
DATASET_PRESETS = {
    'cifar10': dict(total_steps=10_000, warmup_steps=500,
                    pp=dict(train='train[:98%]', test='test', crop=384)),
    'cifar100': dict(total_steps=10_000, warmup_steps=500,
                     pp=dict(train='train[:98%]', test='test', crop=384)),
    'imagenet2012': dict(total_steps=20_000, warmup_steps=500,
                         pp=dict(train='train[:99%]', test='validation', crop=384)),
    'oxford_iiit_pet': dict(total_steps=500, warmup_steps=100,
                            pp=dict(train='train[:90%]', test='test', crop=384)),
    'oxford_flowers102': dict(total_steps=500, warmup_steps=100,
                              pp=dict(train='train[:90%]', test='test', crop=384)),
    'fashion_mnist': dict(total_steps=2_000, warmup_steps=100,
                          pp=dict(train='train[:98%]', test='test', crop=224)),
}


def with_dataset(config: ml_collections.ConfigDict, dataset: str,
                 preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """Sets `dataset` and applies the preset of `preset` (default: the dataset's own)."""
  preset = preset or dataset
  if preset not in DATASET_PRESETS:
    raise ValueError(f'No preset for dataset {preset!r}; known: {sorted(DATASET_PRESETS)}. '
                     'Set config.pp.train/test/crop and total_steps yourself.')
  config.dataset = dataset
  config.update_from_flattened_dict(dict(flatten(DATASET_PRESETS[preset])))
  return config


def flatten(config: Union[dict, ml_collections.ConfigDict],
            prefix: str = '') -> Iterator[Tuple[str, Any]]:
  """('pp.crop', 384)-style pairs of a nested config, e.g. for sweeps and hparams."""
  for key, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from flatten(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value
