"""DiT checkpoints (facebookresearch/DiT and diffusers DiTTransformer2DModel) <-> zoo params.

Inputs are `{name: numpy array}` as `safetensors.numpy.load_file` returns them (nothing is
unpickled); outputs are nested zoo params of numpy arrays. Both readers check the result
against the parameter tree of `zoo.models.dit.DiT(**model_kwargs)`: a checkpoint key that is
not consumed, a key the model needs but the checkpoint lacks, or a wrong shape raises
ValueError naming the key.

facebookresearch/DiT names are zoo's with `_N` written `.N` (`blocks.0.adaLN_modulation.1`),
converted by `zoo.convert.diffusers.convert_key`; the frozen `pos_embed` buffer is dropped
after checking it equals zoo's fixed sin-cos table. diffusers names are first rewritten to
those (table below): to_q/to_k/to_v concatenate on the output axis into `qkv`, and the
timestep/label embedders that diffusers copies into every block (`norm1.emb`) must agree and
become the single t_embedder / y_embedder. diffusers embeds timesteps with
`downscale_freq_shift=1`: load its weights into a DiT with `freq_shift=1.0`.
"""

import re

import jax
import numpy as np

from zoo.convert import diffusers as diffusers_convert
from zoo.models import dit

_EMB = 'transformer_blocks.{}.norm1.emb.'
# (diffusers prefix, facebook prefix, q/k/v slot or None); '{}' is the block index.
NAME_TABLE = (
    ('pos_embed.proj.', 'x_embedder.proj.', None),
    (_EMB + 'timestep_embedder.linear_1.', 't_embedder.mlp.0.', None),
    (_EMB + 'timestep_embedder.linear_2.', 't_embedder.mlp.2.', None),
    (_EMB + 'class_embedder.embedding_table.', 'y_embedder.embedding_table.', None),
    ('transformer_blocks.{}.norm1.linear.', 'blocks.{}.adaLN_modulation.1.', None),
    ('transformer_blocks.{}.attn1.to_q.', 'blocks.{}.attn.qkv.', 'q'),
    ('transformer_blocks.{}.attn1.to_k.', 'blocks.{}.attn.qkv.', 'k'),
    ('transformer_blocks.{}.attn1.to_v.', 'blocks.{}.attn.qkv.', 'v'),
    ('transformer_blocks.{}.attn1.to_out.0.', 'blocks.{}.attn.proj.', None),
    ('transformer_blocks.{}.ff.net.0.proj.', 'blocks.{}.mlp.fc1.', None),
    ('transformer_blocks.{}.ff.net.2.', 'blocks.{}.mlp.fc2.', None),
    ('proj_out_1.', 'final_layer.adaLN_modulation.1.', None),
    ('proj_out_2.', 'final_layer.linear.', None),
)


def _prefix_regex(template):
  return re.compile(re.escape(template).replace(r'\{\}', r'(\d+)'))


def _expected_shapes(model_kwargs):
  """{zoo path tuple: shape} of DiT(**model_kwargs), without running it."""
  dit.check_config(model_kwargs, None)
  model = dit.DiT(**model_kwargs)
  batch, size, channels = 1, model.input_size, model.in_channels
  inputs = {'context_BxLxD': np.zeros((batch, 1, model.context_dim), np.float32)
            if model.context_dim else None,
            'pooled_BxD': np.zeros((batch, model.pooled_dim), np.float32)
            if model.pooled_dim else None}
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((batch, size, size, channels), np.float32),
      np.zeros((batch,), np.float32), **inputs))['params']
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: hasattr(x, 'names'))[0]
  return {tuple(k.key for k in path): tuple(leaf.value.shape if hasattr(leaf, 'names')
                                            else leaf.shape) for path, leaf in flat}


def facebook_name(path):
  """The facebookresearch/DiT key of a zoo param path (`blocks_0/attn/qkv/kernel`)."""
  *modules, leaf = path
  parts = [re.sub(r'_(\d+)$', r'.\1', m) for m in modules]
  return '.'.join(parts + ['bias' if leaf == 'bias' else 'weight'])


def _check_pos_embed(value, model_kwargs):
  model = dit.DiT(**model_kwargs)
  want = dit.sincos_pos_embed(model.hidden_size, model.input_size // model.patch_size)
  value = np.asarray(value).reshape(-1, want.shape[-1]) if np.size(value) == want.size else None
  if value is None or not np.allclose(value, want, atol=1e-5):
    raise ValueError('checkpoint key pos_embed is not the 2-D sin-cos table of this '
                     f'model.input_size / model.patch_size / model.hidden_size ({model_kwargs})')


def from_facebook(state_dict, model_kwargs, *, source_name=facebook_name):
  """Nested zoo DiT params from a facebookresearch/DiT state dict (`{name: numpy array}`).

  `model_kwargs` are the DiT fields (e.g. `dit.preset('DiT-XL/2') | {'input_size': 32}`);
  the tree they imply is what the checkpoint must fill exactly. `source_name` renders a zoo
  path as the checkpoint's key in error messages.
  """
  expected = _expected_shapes(model_kwargs)
  flat = {}
  for key, value in state_dict.items():
    if key == 'pos_embed':
      _check_pos_embed(value, model_kwargs)
      continue
    path, value = diffusers_convert.convert_key(key, value)
    if path not in expected:
      raise ValueError(f'checkpoint key {source_name(path)!r} is not used by '
                       f'DiT({model_kwargs})')
    if tuple(value.shape) != expected[path]:
      raise ValueError(f'checkpoint key {source_name(path)!r} has shape {tuple(value.shape)} '
                       f'after conversion; the model wants {expected[path]} at '
                       f'{"/".join(path)}')
    flat[path] = value
  missing = [source_name(p) for p in expected if p not in flat]
  if missing:
    raise ValueError(f'checkpoint lacks keys {missing} needed by DiT({model_kwargs})')
  return diffusers_convert.nest(flat.items())


def _rename(key):
  """(facebook key, block index or None, q/k/v slot or None) for a diffusers key."""
  for diffusers_prefix, facebook_prefix, slot in NAME_TABLE:
    match = _prefix_regex(diffusers_prefix).match(key)
    if match:
      block = int(match.group(1)) if match.groups() else None
      return facebook_prefix.format(block) + key[match.end():], block, slot
  raise ValueError(f'diffusers key {key!r} is not a DiTTransformer2DModel parameter')


def diffusers_name(path):
  """The diffusers key of a zoo param path, for error messages (embedders: block 0's)."""
  fb = facebook_name(path)
  for diffusers_prefix, facebook_prefix, _ in NAME_TABLE:
    match = _prefix_regex(facebook_prefix).match(fb)
    if match:
      block = match.group(1) if match.groups() else '0'
      return diffusers_prefix.format(block) + fb[match.end():]
  return fb


def from_diffusers(state_dict, model_kwargs):
  """Nested zoo DiT params from a diffusers DiTTransformer2DModel state dict.

  Raises ValueError when a block's embedder copy differs from block 0's (zoo shares one).
  """
  fb, qkv, copies = {}, {}, {}
  for key, value in state_dict.items():
    name, block, slot = _rename(key)
    if slot is not None:
      qkv.setdefault(name, {})[slot] = (key, np.asarray(value))
    elif name.startswith(('t_embedder', 'y_embedder')) and block != 0:
      copies[key] = (name, np.asarray(value))
    else:
      fb[name] = np.asarray(value)
  for key, (name, value) in copies.items():
    if name in fb and not np.array_equal(fb[name], value):
      raise ValueError(f'diffusers key {key!r} differs from its block-0 copy; zoo DiT shares '
                       'one timestep/label embedder across blocks')
  for name, parts in qkv.items():
    for slot in 'qkv':
      if slot not in parts:
        key = re.sub(r'to_[qkv]\.', f'to_{slot}.', next(iter(parts.values()))[0])
        raise ValueError(f'checkpoint lacks diffusers key {key!r}')
    fb[name] = np.concatenate([parts[slot][1] for slot in 'qkv'], axis=0)
  return from_facebook(fb, model_kwargs, source_name=diffusers_name)


def to_facebook(params):
  """facebookresearch/DiT state dict (`{name: numpy array}`) from nested zoo DiT params.

  The inverse of `from_facebook` minus `pos_embed`, which a reader recomputes; text
  conditioning params (a zoo extension) get names by the same rule.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for path, value in flat:
    path = tuple(k.key for k in path)
    value = np.asarray(value)
    if path[-1] == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[facebook_name(path)] = np.asarray(value, order='C')
  return out


def pos_embed(model_kwargs):
  """facebookresearch/DiT's frozen `pos_embed` buffer (1 x N x D) for these DiT fields."""
  model = dit.DiT(**model_kwargs)
  return dit.sincos_pos_embed(model.hidden_size, model.input_size // model.patch_size)[None]


def to_diffusers(params):
  """diffusers DiTTransformer2DModel state dict from nested zoo DiT params.

  The inverse of `from_diffusers`: `qkv` splits into to_q / to_k / to_v and the shared
  timestep / label embedders are copied into every block's `norm1.emb`.
  """
  fb = to_facebook(params)
  depth = 1 + max(int(k.split('.')[1]) for k in fb if k.startswith('blocks.'))
  out = {}
  for key, value in fb.items():
    for diffusers_prefix, facebook_prefix, slot in NAME_TABLE:
      match = _prefix_regex(facebook_prefix).match(key)
      if not match:
        continue
      rest = key[match.end():]
      if match.groups():
        block = int(match.group(1))
        if slot is not None:
          value_slot = np.split(value, 3, axis=0)['qkv'.index(slot)]
          out[diffusers_prefix.format(block) + rest] = np.asarray(value_slot, order='C')
          continue
        out[diffusers_prefix.format(block) + rest] = value
      elif diffusers_prefix.startswith(_EMB):
        for block in range(depth):
          out[diffusers_prefix.format(block) + rest] = value
      else:
        out[diffusers_prefix + rest] = value
    if not any(_prefix_regex(f).match(key) for _, f, _ in NAME_TABLE):
      raise ValueError(f'zoo DiT param {key!r} has no diffusers DiTTransformer2DModel name')
  return out
