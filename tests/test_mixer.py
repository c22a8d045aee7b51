"""MLP-Mixer: the official names, sizes and `.npz` layout, outputs against numpy and timm."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from conftest import random_params
from numpy_reference import mixer_forward
from vit_jax_ft import checkpoint
from vit_jax_ft.models import get_model

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# timm's published counts of mixer_b16_224 and mixer_l16_224 (224 px, 1000 classes).
TIMM_COUNTS = {'Mixer-B_16': 59_880_472, 'Mixer-L_16': 208_196_168}


def formula_count(patch, hidden, blocks, tokens_mlp, channels_mlp, size=224, classes=1000):
  """Parameters of a Mixer from its definition: stem, blocks, pre-head norm, head."""
  tokens = (size // patch) ** 2
  stem = patch * patch * 3 * hidden + hidden
  block = (4 * hidden + tokens * tokens_mlp + tokens_mlp + tokens_mlp * tokens + tokens
           + 2 * hidden * channels_mlp + channels_mlp + hidden)
  return stem + blocks * block + 2 * hidden + hidden * classes + classes


@pytest.mark.parametrize('name, sizes', [('Mixer-B_16', (16, 768, 12, 384, 3072)),
                                         ('Mixer-B_32', (32, 768, 12, 384, 3072)),
                                         ('Mixer-L_16', (16, 1024, 24, 512, 4096))])
def test_parameter_counts_match_the_definition_and_timm(name, sizes):
  model = get_model(name, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert count == formula_count(*sizes)
  assert count == TIMM_COUNTS.get(name, count)


def _tiny_mixer(**overrides):
  spec = dict(patch_size=(8, 8), hidden_dim=24, num_blocks=2, tokens_mlp_dim=12,
              channels_mlp_dim=40)
  spec.update(overrides)
  return get_model('Mixer-B_16', 5, **spec)


def test_mixer_matches_numpy_reference():
  model = _tiny_mixer()
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  params = random_params(model.init(jax.random.PRNGKey(0), images[:1])['params'])
  got = np.asarray(model.apply({'params': params}, images))
  want = mixer_forward(params, images, patch=8)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_official_npz_layout_loads_and_a_new_resolution_is_a_clear_error(tmp_path):
  model = _tiny_mixer()
  params = random_params(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params'])
  # The key names of the released Mixer files, written out.
  names = ['stem/kernel', 'stem/bias', 'pre_head_layer_norm/scale', 'pre_head_layer_norm/bias',
           'head/kernel', 'head/bias']
  for i in range(2):
    for norm in ('LayerNorm_0', 'LayerNorm_1'):
      names += [f'MixerBlock_{i}/{norm}/scale', f'MixerBlock_{i}/{norm}/bias']
    for mlp in ('token_mixing', 'channel_mixing'):
      names += [f'MixerBlock_{i}/{mlp}/Dense_{j}/{leaf}' for j in (0, 1)
                for leaf in ('kernel', 'bias')]
  flat = {}
  for name in names:
    value = params
    for part in name.split('/'):
      value = value[part]
    flat[name] = np.asarray(value)
  assert len(flat) == len(jax.tree.leaves(params))  # The layout names every parameter.
  np.savez(tmp_path / 'Mixer.npz', **flat)
  loaded = checkpoint.load(str(tmp_path / 'Mixer.npz'))
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
  new_task = model.clone(num_classes=3).init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  adapted = checkpoint.load_pretrained(str(tmp_path / 'Mixer.npz'), new_task['params'])
  assert adapted['head']['kernel'].shape == (24, 3) and not adapted['head']['kernel'].any()
  bigger = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 48, 48, 3)))['params']
  with pytest.raises(checkpoint.CheckpointError, match='Mixer trained on 16 patches.*has 36'):
    checkpoint.load_pretrained(str(tmp_path / 'Mixer.npz'), bigger)


TIMM = json.loads((FIXTURES / 'mixer_timm_counts.json').read_text())


@pytest.mark.parametrize('name', sorted(TIMM['counts']))
def test_timm_names_have_timm_parameter_counts(name):
  model = get_model(name, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params'])) == (
      TIMM['counts'][name])


def test_timm_safetensors_give_timm_logits_in_the_official_tree(tmp_path):
  outputs = np.load(FIXTURES / 'mixer_timm.npz')
  spec = TIMM['cases']['tiny']
  state_dict = {k[len('tiny/sd/'):]: outputs[k] for k in outputs.files
                if k.startswith('tiny/sd/')}
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'mixer.safetensors'))
  params = checkpoint.load(str(tmp_path / 'mixer.safetensors'))
  assert 'MixerBlock_1' in params and 'token_mixing' in params['MixerBlock_0']
  patch, hidden = spec['patch_size'], spec['embed_dim']
  model = get_model('mixer_b16_224', 5, patch_size=(patch, patch), hidden_dim=hidden,
                    num_blocks=spec['num_blocks'], tokens_mlp_dim=hidden // 2,
                    channels_mlp_dim=4 * hidden)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(model.apply({'params': params}, jnp.asarray(outputs['tiny/images'])))
  want = outputs['tiny/logits']
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4 * np.abs(want).max())
