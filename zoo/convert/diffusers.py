"""diffusers state dicts -> zoo params, by the mechanical rules of NUMERICS.md 4.6.

Names: `down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel` (an
integer joins the module before it, so `to_out.0` -> `to_out_0`). Values: conv OIHW -> HWIO,
linear W -> W.T, norm `weight` -> `scale`, embedding tables `weight` -> `embedding`. The input is
`{name: numpy array}`, as `safetensors.numpy.load_file` returns it: nothing is unpickled.
"""

import numpy as np

# Modules whose 2-D `weight` is a lookup table, not a linear map.
EMBEDDINGS = ('class_embedding', 'embedding_table')


def convert_key(key, value, embeddings=EMBEDDINGS):
  """(zoo path tuple, converted value) for one PyTorch parameter (`embeddings`: table names)."""
  *modules, leaf = key.split('.')
  path = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  value = np.asarray(value)
  if leaf == 'weight':
    if value.ndim == 4:
      leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
    elif value.ndim == 2 and path[-1] in embeddings:
      leaf = 'embedding'
    elif value.ndim == 2:
      leaf, value = 'kernel', value.T
    else:
      leaf = 'scale'
  return (*path, leaf), value


def nest(items):
  """A nested params dict from (path tuple, value) pairs."""
  params = {}
  for path, value in items:
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return params


def state_dict_to_params(state_dict):
  """A nested zoo params dict from a flat diffusers `{name: array}` state dict."""
  return nest(convert_key(key, value) for key, value in state_dict.items())


# diffusers `nn.ModuleList` / `nn.Sequential` attributes: `down_blocks.0` <-> zoo `down_blocks_0`.
# Any other `name_N` (`time_embedding.linear_1`) is a plain attribute name on both sides.
LISTS = ('down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers', 'upsamplers',
         'transformer_blocks', 'to_out', 'net', 'controlnet_down_blocks', 'blocks')


def torch_key(path, value):
  """(diffusers name, PyTorch-layout value): `convert_key` backwards, for `zoo export`."""
  *modules, leaf = path
  names = []
  for part in modules:
    head, _, index = part.rpartition('_')
    names.append(f'{head}.{index}' if head in LISTS and index.isdigit() else part)
  value = np.asarray(value)
  if leaf == 'kernel':
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(leaf, leaf)
  return '.'.join((*names, leaf)), np.asarray(value, order='C')


def params_to_state_dict(params):
  """A flat diffusers `{name: numpy array}` state dict from nested zoo params."""
  flat = {}

  def visit(node, path):
    for key, child in node.items():
      if isinstance(child, dict):
        visit(child, (*path, key))
      else:
        name, value = torch_key((*path, key), child)
        flat[name] = value
  visit(params, ())
  return flat
