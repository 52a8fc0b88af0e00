"""LoRA for any zoo model, on its params: W' = W + (alpha / rank) A B on matched Dense kernels.

Adapters live beside the params, not in the modules, so every model gets them unchanged: a
target is any 2-D `kernel` whose path (`down_blocks_1/attentions_0/transformer_blocks_0/attn1/
to_q/kernel`) matches `config.lora.targets` (a regex searched in the path). The adapter tree
mirrors the params down to the module and holds `lora_a` (in x rank, PEFT's Kaiming-uniform
init) and `lora_b` (rank x out, zeros: a fresh adapter leaves the model as it was).

- `init(rng, params, rank, targets)`: the adapters of a params tree.
- `merge(params, adapters, scale)` / `unmerge(...)`: W +/- scale A B on the targets (training
  differentiates through `merge`; the merged tree is an ordinary params tree to save or export).
- `apply_unmerged(module, params, adapters, scale, ...)`: the LoRA forward without merging,
  y = x W + b + scale (x A) B in every matched `nn.Dense` (Flax method interception).
- `save` / `load`: adapters as safetensors. U-Nets use the diffusers / PEFT naming
  (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`, A as
  rank x in, B as out x rank) with `r` / `lora_alpha` in the file's `lora_adapter_metadata`, as
  `StableDiffusionPipeline.save_lora_weights` writes them. B is stored times alpha / rank with
  lora_alpha = r, since `UNet2DConditionModel.load_lora_adapter(file)` ignores the metadata
  (alpha would fall back to r); other models use their zoo paths and keep alpha.
"""

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from zoo.convert import diffusers as diffusers_convert
from zoo import files
from zoo.nn import stack

# Attention and MLP projections across the zoo's models (diffusers, HF and DiT naming).
DEFAULT_TARGETS = (r'(to_q|to_k|to_v|to_out_0|q_proj|k_proj|v_proj|out_proj|qkv|attn/proj|'
                   r'ff/net_0/proj|ff/net_2|fc1|fc2|mlp/.*)/kernel$')
METADATA_KEY = 'lora_adapter_metadata'


def _path_str(path):
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def targets_of(params, targets):
  """{path tuple: kernel shape} of the 2-D kernels whose path matches the regex `targets`."""
  pattern = re.compile(targets)
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _path_str(path)
    if name.endswith('/kernel') and pattern.search(name) and np.ndim(leaf) == 2:
      found[tuple(str(getattr(k, 'key', k)) for k in path)] = tuple(np.shape(leaf))
  return found


def check(params, rank, targets):
  """ValueError unless `targets` is a regex matching some 2-D kernel and 1 <= rank <= min dim."""
  try:
    re.compile(targets)
  except re.error as e:
    raise ValueError(f'config.lora.targets={targets!r} is not a regex: {e}') from None
  found = targets_of(params, targets)
  if not found:
    raise ValueError(f'config.lora.targets={targets!r} matches no 2-D kernel of this model')
  small = min(min(shape) for shape in found.values())
  if not 1 <= rank <= small:
    raise ValueError(f'config.lora.rank={rank} must be in [1, {small}] (the smallest matched '
                     'kernel dimension)')
  return found


def init(rng, params, rank, targets):
  """Fresh adapters for the matched kernels of `params` (arrays or ShapeDtypeStructs)."""
  found = targets_of(params, targets)
  keys = jax.random.split(rng, len(found))
  items = []
  for key, (path, (fan_in, fan_out)) in zip(keys, sorted(found.items())):
    bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
    items.append(((*path[:-1], 'lora_a'),
                  jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)))
    items.append(((*path[:-1], 'lora_b'), jnp.zeros((rank, fan_out), jnp.float32)))
  return diffusers_convert.nest(items)


def _pairs(adapters):
  """{module path tuple: (A, B)} of an adapter tree."""
  pairs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    path = tuple(str(getattr(k, 'key', k)) for k in path)
    pairs.setdefault(path[:-1], {})[path[-1]] = leaf
  return {p: (ab['lora_a'], ab['lora_b']) for p, ab in pairs.items()}


def _shift(params, adapters, scale, sign):
  pairs = _pairs(adapters)

  def one(path, leaf):
    path = tuple(str(getattr(k, 'key', k)) for k in path)
    if path[-1] != 'kernel' or path[:-1] not in pairs:
      return leaf
    a, b = pairs[path[:-1]]
    return leaf + (sign * scale * (a @ b)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(one, params)


def merge(params, adapters, scale):
  """params with W + scale A B on every adapted kernel."""
  return _shift(params, adapters, scale, 1.0)


def unmerge(params, adapters, scale):
  """The inverse of `merge` (exact up to float rounding)."""
  return _shift(params, adapters, scale, -1.0)


def apply_unmerged(module, params, adapters, scale, *args, **kwargs):
  """`module.apply({'params': params}, ...)` with each adapted Dense computing
  x W + b + scale (x A) B: the LoRA forward of PEFT, without materialising W + scale A B."""
  pairs = _pairs(adapters)

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    mod = context.module
    if context.method_name != '__call__' or not isinstance(mod, nn.Dense):
      return out
    ab = pairs.get(tuple(mod.scope.path))
    if ab is None:
      return out
    x = call_args[0].astype(jnp.float32)
    return out + (scale * ((x @ ab[0]) @ ab[1])).astype(out.dtype)
  # Interception matches scope paths, which a scanned stack's layers do not have.
  with nn.intercept_methods(interceptor), stack.unrolled():
    return module.apply({'params': params}, *args, **kwargs)


def save(path, adapters, *, rank, alpha, naming='zoo'):
  """Writes adapters as safetensors; naming 'diffusers' for U-Nets (PEFT keys under `unet.`)."""
  flat, modules = {}, []
  if naming == 'diffusers':  # Fold alpha / rank into B: loaders that skip the metadata agree.
    b_scale, alpha = alpha / rank, float(rank)
  else:
    b_scale = 1.0
  for module_path, (a, b) in sorted(_pairs(adapters).items()):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32) * np.float32(b_scale)
    if naming == 'diffusers':
      name = 'unet.' + diffusers_convert.torch_key((*module_path, 'kernel'), b)[0][:-len('.weight')]
    else:
      name = '.'.join(module_path)
    modules.append(name.removeprefix('unet.'))
    flat[f'{name}.lora_A.weight'] = np.asarray(a.T, order='C')
    flat[f'{name}.lora_B.weight'] = np.asarray(b.T, order='C')
  prefix = 'unet.' if naming == 'diffusers' else ''
  meta = {f'{prefix}r': rank, f'{prefix}lora_alpha': alpha,
          f'{prefix}target_modules': sorted(modules)}
  with files.atomic_path(path) as tmp:
    safetensors.numpy.save_file(flat, tmp, metadata={
        'format': 'pt', METADATA_KEY: json.dumps(meta, sort_keys=True), 'zoo_lora_naming': naming})


def load(path, params):
  """(adapters, rank, alpha) from a file `save` wrote (or a PEFT / diffusers U-Net LoRA), its
  modules checked against `params` (a module the model lacks, or a wrong shape, raises)."""
  if not path.endswith('.safetensors'):
    raise ValueError(f'{path}: LoRA weights load from .safetensors only (no pickles)')
  with safetensors.safe_open(path, framework='np') as f:
    metadata = f.metadata() or {}
  flat = safetensors.numpy.load_file(path)
  kernels = {'.'.join(p[:-1]): (p, s) for p, s in targets_of(params, '.*').items()}
  diffusers_names = {diffusers_convert.torch_key(p, np.zeros((1, 1)))[0][:-len('.weight')]: (p, s)
                     for p, s in targets_of(params, '.*').items()}
  items, rank = [], None
  for key in sorted(k for k in flat if k.endswith('.lora_A.weight')):
    name = key[:-len('.lora_A.weight')]
    found = kernels.get(name) or diffusers_names.get(name.removeprefix('unet.'))
    if found is None:
      raise ValueError(f'{path}: LoRA module {name!r} is not a Dense layer of this model')
    (module_path, (fan_in, fan_out)), b_key = found, f'{name}.lora_B.weight'
    if b_key not in flat:
      raise ValueError(f'{path}: {key!r} has no {b_key!r}')
    a, b = flat[key].T, flat[b_key].T
    if a.shape[0] != fan_in or b.shape[1] != fan_out or a.shape[1] != b.shape[0]:
      raise ValueError(f'{path}: {name} adapters {a.shape} x {b.shape} do not fit the kernel '
                       f'{(fan_in, fan_out)}')
    rank = a.shape[1]
    items += [((*module_path[:-1], 'lora_a'), a), ((*module_path[:-1], 'lora_b'), b)]
  if not items:
    raise ValueError(f'{path}: no `*.lora_A.weight` keys')
  meta = json.loads(metadata.get(METADATA_KEY, '{}'))
  alpha = meta.get('unet.lora_alpha', meta.get('lora_alpha', rank))
  return diffusers_convert.nest(items), rank, float(alpha)
