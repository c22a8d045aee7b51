r"""Writes a fine-tuned workdir's parameters as a released checkpoint, to use them elsewhere.

  python -m vit_jax_ft.export --workdir=/tmp/run1 --out=/tmp/ViT-B_16-cifar10.npz
  python -m vit_jax_ft.export --workdir=gs://bucket/run1 --step=5000 --out=gs://bucket/model.npz
  python -m vit_jax_ft.export --workdir=/tmp/swin1 --out=/tmp/swin-cifar10.safetensors

Each family is written in the layout its weights are released in (`checkpoint.save_variables`):
ViTs and hybrids get the names of the official `.npz` files (`embedding/kernel`,
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`, ...), which the
official `vit_jax.checkpoint.load` and timm's npz loader read; BiT ResNets get the BiT
release names (`resnet/block1/unit01/a/standardized_conv2d/kernel`, ...) of big_transfer;
Mixers the official Mixer `.npz` tree; Swin, ResNet v1.5 and Mixer as a `.safetensors` timm
state dict, which `timm.create_model(name, num_classes=N).load_state_dict` takes as it is.
The model to load them into is printed: its name, and every option that differs from it.
"""
from typing import List, Optional

import jax
from absl import app, flags

from vit_jax_ft import checkpoint, logs, models, run_dir

FLAGS = flags.FLAGS

# Options that change how a model computes, not its parameters.
_COMPUTATION = ('attention', 'dtype', 'remat', 'sow_attention')


def export(workdir: str, out: str, step: Optional[int] = None) -> run_dir.Loaded:
  """Writes the parameters of a workdir checkpoint (latest by default) to the file `out`."""
  if not out.endswith(('.npz',) + checkpoint.SAFETENSORS_EXTENSIONS):
    raise ValueError(f'--out={out!r} must name an .npz file (the official layout) or a '
                     '.safetensors file (timm\'s, for Swin, ResNet v1.5 and Mixer).')
  loaded = run_dir.load(workdir, step)
  if jax.process_index() == 0:
    checkpoint.save_variables(jax.device_get(loaded.variables), out)
  return loaded


def describe(loaded: run_dir.Loaded) -> str:
  """The model a user builds to load the file: its name and the options that differ."""
  spec = run_dir.model_spec(loaded.model)
  name, num_classes = spec['model_name'], spec['num_classes']
  official = (run_dir.model_spec(models.get_model(name, num_classes))
              if name in models.MODEL_SPECS else {})
  changed = {k: v for k, v in spec.items() if k not in _COMPUTATION and v != official.get(k)}
  return (f'{name} with {num_classes} classes (step {loaded.step})'
          + (f', options differing from {name}: {changed}' if changed else ''))


def define_flags() -> None:
  """The command's flags (defined only when run, to keep importers' flags clean)."""
  flags.DEFINE_string('workdir', None, 'Training workdir of `python -m vit_jax_ft.main`.',
                      required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('out', None, 'The .npz or .safetensors file to write (local or gs://).',
                      required=True)


def main(argv: List[str]) -> None:
  logs.configure_terminal()  # Other libraries' INFO (orbax's restore) off the terminal.
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  loaded = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
  print(f'Wrote {FLAGS.out}: {describe(loaded)}.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
