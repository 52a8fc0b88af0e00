"""Public checkpoint files <-> zoo params, by kind: what `zoo convert` reads, `zoo export` writes.

A source is a `.safetensors` file or a Hugging Face-style folder (config.json plus
`diffusion_pytorch_model.safetensors` / `model.safetensors`, or their sharded index). Pickled
formats (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) are refused: loading one runs arbitrary code.

  kind                   reads                                        model
  diffusers-vae          AutoencoderKL folder                         vae
  diffusers-unet         UNet2DModel / UNet2DConditionModel folder    unet
  diffusers-controlnet   ControlNetModel folder                       controlnet
  dit                    facebookresearch/DiT .safetensors, or a      dit
                         diffusers DiTTransformer2DModel folder
  clip, siglip           transformers CLIPModel / SiglipModel folder  dual_encoder

A whole StableDiffusionPipeline folder (`--from diffusers-sd`) is read part by part by
zoo/convert/pipeline.py into one text_to_image run.
"""

import json
import os
import typing

import numpy as np
import safetensors.numpy

from zoo import files
from zoo.convert import configs
from zoo.convert import diffusers as diffusers_convert
from zoo.convert import dit as dit_convert
from zoo.convert import transformers as hf_convert

PICKLED = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')
WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'model.safetensors')


class Converted(typing.NamedTuple):
  """A checkpoint in zoo terms: `config.model` name and fields, params, and its file format."""
  model: str
  kwargs: dict
  params: dict
  format: str  # 'diffusers', 'facebook' or 'transformers': what `export` writes back.


def _refuse_pickle(path):
  if path.endswith(PICKLED):
    raise ValueError(f'{path}: pickled checkpoints ({", ".join(PICKLED)}) are never read (loading '
                     'one runs arbitrary code); convert it to safetensors first, e.g. with '
                     'safetensors.torch.save_file(torch.load(path, weights_only=True), '
                     "'x.safetensors') in a sandbox you trust")


def read_state_dict(path):
  """({name: numpy array}, config dict or None) of a safetensors file or an HF-style folder."""
  _refuse_pickle(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found')
  if os.path.isfile(path):
    if not path.endswith('.safetensors'):
      raise ValueError(f'{path}: expected a .safetensors file or a model folder')
    return safetensors.numpy.load_file(path), None
  config_path = os.path.join(path, 'config.json')
  config = None
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  for name in WEIGHT_FILES:
    index = os.path.join(path, name + '.index.json')
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
      break
    if os.path.isfile(os.path.join(path, name)):
      files = [name]
      break
  else:
    pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLED))
    hint = (f'; it holds pickled weights {pickled}, which are never read' if pickled else '')
    raise FileNotFoundError(f'{path}: no {" or ".join(WEIGHT_FILES)} (or sharded index){hint}')
  state_dict = {}
  for name in files:
    state_dict.update(safetensors.numpy.load_file(os.path.join(path, name)))
  return state_dict, config


def _need_config(config, path, kind, classes):
  if config is None:
    raise ValueError(f'{path}: --from {kind} needs a folder with config.json (save_pretrained)')
  name = config.get('_class_name') or config.get('model_type')
  if name not in classes:
    raise ValueError(f'{path}/config.json describes a {name!r}, not a {" / ".join(classes)} '
                     f'(--from {kind})')
  return config


def _float32(state_dict):
  return {k: np.asarray(v, np.float32) for k, v in state_dict.items()}


def read(kind, path, *, num_heads=None):
  """The `Converted` checkpoint of `kind` at `path` (see the module doc for the kinds)."""
  if kind not in KINDS:
    raise ValueError(f'--from {kind!r} is not one of {sorted(KINDS) + ["diffusers-sd"]}')
  state_dict, config = read_state_dict(path)
  state_dict = _float32(state_dict)
  if kind == 'diffusers-vae':
    config = _need_config(config, path, kind, ('AutoencoderKL',))
    return Converted('vae', configs.vae_kwargs(config),
                     diffusers_convert.state_dict_to_params(state_dict), 'diffusers')
  if kind == 'diffusers-unet':
    config = _need_config(config, path, kind, ('UNet2DModel', 'UNet2DConditionModel'))
    return Converted('unet', configs.unet_kwargs(config, f'{path}/config.json'),
                     diffusers_convert.state_dict_to_params(state_dict), 'diffusers')
  if kind == 'diffusers-controlnet':
    config = _need_config(config, path, kind, ('ControlNetModel',))
    # Without cross-attention blocks its `cross_attention_dim` (always stored) is unused.
    crossattn = 'CrossAttn' in ' '.join((*config.get('down_block_types', ('CrossAttn',)),
                                         config.get('mid_block_type') or 'CrossAttn'))
    as_unet = {**config, '_class_name': 'UNet2DConditionModel' if crossattn else 'UNet2DModel'}
    kwargs = (configs.unet_kwargs(as_unet, f'{path}/config.json')
              | configs.controlnet_extra(config))
    if config.get('mid_block_type') == 'UNetMidBlock2D':  # One resnet, as in diffusers.
      kwargs |= dict(mid_block_layers=0, mid_block_attention=False)
    return Converted('controlnet', kwargs, diffusers_convert.state_dict_to_params(state_dict),
                     'diffusers')
  if kind == 'dit':
    if config is not None:
      config = _need_config(config, path, kind, ('DiTTransformer2DModel', 'Transformer2DModel'))
      kwargs = configs.dit_kwargs(config)
      return Converted('dit', kwargs, dit_convert.from_diffusers(state_dict, kwargs), 'diffusers')
    kwargs = configs.dit_kwargs_from_facebook(state_dict, num_heads)
    return Converted('dit', kwargs, dit_convert.from_facebook(state_dict, kwargs), 'facebook')
  config = _need_config(config, path, kind, (kind,))
  kwargs = (hf_convert.clip_config(config) if kind == 'clip' else hf_convert.siglip_config(config))
  return Converted('dual_encoder', kwargs, hf_convert.from_hf_dual(state_dict, kwargs),
                   'transformers')


def state_dict(kind, kwargs, params, fmt):
  """(flat {name: numpy array}, config.json dict or None) in the naming `fmt` of `kind`."""
  params = _numpy(params)
  if kind == 'diffusers-vae':
    return diffusers_convert.params_to_state_dict(params), configs.vae_config(kwargs)
  if kind == 'diffusers-unet':
    return diffusers_convert.params_to_state_dict(params), configs.unet_config(kwargs)
  if kind == 'diffusers-controlnet':
    return diffusers_convert.params_to_state_dict(params), configs.controlnet_config(kwargs)
  if kind == 'dit' and fmt == 'facebook':
    if kwargs['freq_shift'] != 0.0:
      raise ValueError(f'this DiT embeds timesteps with freq_shift={kwargs["freq_shift"]} '
                       '(diffusers); facebookresearch/DiT code uses 0 and would compute another '
                       'model: export it with --format diffusers')
    return dit_convert.to_facebook(params) | {'pos_embed': dit_convert.pos_embed(kwargs)}, None
  if kind == 'dit':
    return dit_convert.to_diffusers(params), configs.dit_config(kwargs)
  return hf_convert.to_hf_dual(params), hf_convert.hf_config(kwargs)


def write(kind, kwargs, params, out, fmt):
  """Writes `params` as `kind` into `out`: a folder (config.json + safetensors) or, for the
  facebook DiT format, `out` itself as one .safetensors file. Returns the paths written."""
  flat, config = state_dict(kind, kwargs, params, fmt)
  # safetensors writes an array's buffer as is: a Fortran-ordered one comes back transposed
  # (np.ascontiguousarray would also turn 0-d scalars such as CLIP's logit_scale into 1-d).
  flat = {k: np.asarray(v, order='C') for k, v in flat.items()}
  _refuse_pickle(out)
  if config is None:
    path = out if out.endswith('.safetensors') else os.path.join(out, 'model.safetensors')
    with files.atomic_path(path) as tmp:
      safetensors.numpy.save_file(flat, tmp, metadata={'format': 'pt'})
    return [path]
  if out.endswith('.safetensors'):
    raise ValueError(f'--out {out}: a {kind} export in the {fmt} naming is a folder '
                     '(config.json + safetensors); name a directory')
  os.makedirs(out, exist_ok=True)
  name = 'model.safetensors' if fmt == 'transformers' else WEIGHT_FILES[0]
  with files.atomic_open(os.path.join(out, 'config.json')) as f:
    json.dump(config, f, indent=2)
  with files.atomic_path(os.path.join(out, name)) as tmp:
    safetensors.numpy.save_file(flat, tmp, metadata={'format': 'pt'})
  return [os.path.join(out, 'config.json'), os.path.join(out, name)]


def _numpy(tree):
  if isinstance(tree, dict):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


# kind -> (zoo model name, default export format)
KINDS = {
    'diffusers-vae': ('vae', 'diffusers'), 'diffusers-unet': ('unet', 'diffusers'),
    'diffusers-controlnet': ('controlnet', 'diffusers'), 'dit': ('dit', 'facebook'),
    'clip': ('dual_encoder', 'transformers'), 'siglip': ('dual_encoder', 'transformers'),
}
