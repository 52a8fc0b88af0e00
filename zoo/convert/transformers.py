"""Hugging Face `transformers` and open_clip state dicts <-> zoo params (NUMERICS Multimodal 4.3).

The input is `{name: numpy array}`, as `safetensors.numpy.load_file` returns it: nothing is
unpickled. Names: `encoder.layers.3.mlp.fc1.weight` -> `encoder/layers_3/mlp/fc1/kernel` (an
integer joins the module before it); linear W -> W.T, conv OIHW -> HWIO, LayerNorm `weight` ->
`scale`, embedding `weight` -> `embedding`.

- `from_hf_clip_text`: a CLIP text tower (zoo.models.text).
- Dual encoders (zoo.models.dual_encoder), whose zoo names are HF's: `from_hf_dual` /
  `to_hf_dual` for `CLIPModel` and `SiglipModel` (the SigLIP MAP head's fused
  `in_proj_weight` splits into q/k/v_proj); `clip_config` / `siglip_config` build the zoo
  config from the HF one; `load_hf_dual(directory)` reads a `save_pretrained` directory.
- open_clip / OpenAI CLIP (`visual.conv1`, `transformer.resblocks.i.attn.in_proj_weight`,
  `ln_1`, `mlp.c_fc`, `visual.proj` ...): `from_open_clip` renames to HF names first;
  `open_clip_config` reads the shapes off the state dict.
"""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from zoo.convert import diffusers
from zoo.models import dual_encoder
from zoo.models import vit

TEXT_PREFIX = 'text_model.'
TEXT_MODULES = ('embeddings', 'encoder', 'final_layer_norm')
TEXT_PROJECTION = 'text_projection.weight'
# Modules whose 2-D `weight` is a lookup table, not a linear map.
EMBEDDINGS = ('token_embedding', 'position_embedding')
# Non-parameter buffers some checkpoints carry.
BUFFERS = ('position_ids',)


def from_hf_clip_text(state_dict) -> dict:
  """zoo TextTransformer params from an HF CLIP state dict.

  Accepts `CLIPTextModel` (keys `text_model.*` as on the Hub, or bare `embeddings.*`,
  `encoder.*`, `final_layer_norm.*` as transformers>=5 saves it), `CLIPTextModelWithProjection`
  or a full `CLIPModel` state dict. Only the text tower and `text_projection.weight` are read;
  the vision tower, `logit_scale` and buffers are ignored.
  """
  items = []
  for key, value in state_dict.items():
    name = key.removeprefix(TEXT_PREFIX)
    if key == TEXT_PROJECTION:
      items.append((('text_projection', 'kernel'), np.asarray(value).T))
    elif name.split('.')[0] in TEXT_MODULES and name.rsplit('.', 1)[-1] not in BUFFERS:
      items.append(diffusers.convert_key(name, value, embeddings=EMBEDDINGS))
  if not any(path[0] != 'text_projection' for path, _ in items):
    raise ValueError(f'no CLIP text-tower keys ({TEXT_PREFIX}* or {TEXT_MODULES}) in the state '
                     f'dict; got e.g. {sorted(state_dict)[:5]}')
  return diffusers.nest(items)


# ---------------------------------------------------------------------------------------------
# Dual encoders: HF CLIPModel / SiglipModel and open_clip (OpenAI layout) <-> zoo DualEncoder.

# HF activation names -> zoo's (text.ACTS).
ACTS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
        'gelu_new': 'gelu_tanh'}
TOWERS = ('vision_model.', 'text_model.')
TOP_LINEAR = ('visual_projection.weight', 'text_projection.weight')
SCALARS = ('logit_scale', 'logit_bias')
# `nn.MultiheadAttention` of the SigLIP MAP head: one fused q/k/v input projection.
MAP_IN_PROJ = 'vision_model.head.attention.in_proj_'


def _as_dict(config):
  return config if isinstance(config, dict) else config.to_dict()


def _act(name, where):
  if name not in ACTS:
    raise ValueError(f'{where}.hidden_act={name!r} has no zoo equivalent; allowed: {sorted(ACTS)}')
  return ACTS[name]


def _vision_kwargs(cfg, where):
  return dict(image_size=cfg.get('image_size', 224), patch_size=cfg.get('patch_size', 32),
              in_channels=cfg.get('num_channels', 3), width=cfg['hidden_size'],
              depth=cfg['num_hidden_layers'], num_heads=cfg['num_attention_heads'],
              mlp_dim=cfg['intermediate_size'], act=_act(cfg.get('hidden_act'), where),
              norm_eps=cfg.get('layer_norm_eps'))


def _text_kwargs(cfg, where):
  return dict(vocab_size=cfg['vocab_size'], max_len=cfg['max_position_embeddings'],
              width=cfg['hidden_size'], depth=cfg['num_hidden_layers'],
              num_heads=cfg['num_attention_heads'], mlp_dim=cfg['intermediate_size'],
              act=_act(cfg.get('hidden_act'), where), norm_eps=cfg.get('layer_norm_eps'),
              projection_dim=0)


def clip_config(hf_config, image_norm='clip') -> dict:
  """zoo DualEncoder kwargs for an HF `CLIPConfig` (object or config.json dict).

  `image_norm='clip'`: the OpenAI mean/std the checkpoint was trained with ('none' when the
  caller normalises pixels itself). Text pooling follows HF: eos_token_id 2 (legacy OpenAI
  configs) pools the largest id, any other the first EOS.
  """
  cfg = _as_dict(hf_config)
  vision = _as_dict(cfg['vision_config'])
  image = vit.STYLES['clip'] | _vision_kwargs(vision, 'vision_config') | {
      'image_norm': image_norm}
  text = clip_text_config(cfg['text_config'], 'text_config')
  return dict(kind='clip', image=image, text=text, embed_dim=cfg.get('projection_dim', 512),
              logit_scale_init=float(cfg.get('logit_scale_init_value', 2.6592)),
              logit_bias_init=0.0)


def clip_text_config(hf_config, where='CLIPTextConfig') -> dict:
  """zoo TextTransformer kwargs for an HF `CLIPTextConfig` (Stable Diffusion's text_encoder/)."""
  txt = _as_dict(hf_config)
  eos = txt.get('eos_token_id', 2)
  return _text_kwargs(txt, where) | dict(
      causal=True, pool='argmax' if eos == 2 else 'eos', eos_token_id=eos, head_dim=0,
      embed_init='clip')


def siglip_config(hf_config) -> dict:
  """zoo DualEncoder kwargs for an HF `SiglipConfig` (object or config.json dict).

  The logit init is the paper's (t = log 10, b = -10); HF's zeros are overwritten by any
  checkpoint anyway.
  """
  cfg = _as_dict(hf_config)
  vision, txt = _as_dict(cfg['vision_config']), _as_dict(cfg['text_config'])
  if not vision.get('vision_use_head', True):
    raise ValueError('vision_config.vision_use_head=False: a SigLIP dual encoder needs the MAP '
                     'head (its output is the image embedding)')
  image = vit.STYLES['siglip'] | _vision_kwargs(vision, 'vision_config') | {'image_norm': 'none'}
  text = _text_kwargs(txt, 'text_config') | dict(
      causal=False, pool='last', eos_token_id=txt.get('eos_token_id', 1),
      head_dim=txt.get('projection_size') or txt['hidden_size'], embed_init='siglip')
  return dict(kind='siglip', image=image, text=text, embed_dim=image['width'],
              logit_scale_init=dual_encoder.SIGLIP_LOGIT_SCALE,
              logit_bias_init=dual_encoder.SIGLIP_LOGIT_BIAS)


def _hf_tower(kw):
  acts = {}
  for hf, ours in ACTS.items():
    acts.setdefault(ours, hf)
  return dict(hidden_size=kw['width'], num_hidden_layers=kw['depth'],
              num_attention_heads=kw['num_heads'],
              intermediate_size=kw['mlp_dim'] or 4 * kw['width'],  # 0 = 4 x width.
              hidden_act=acts[kw['act']], layer_norm_eps=kw['norm_eps'])


def hf_text_config(txt) -> dict:
  """The HF text config of zoo TextTransformer kwargs (inverse of `clip_text_config`)."""
  return _hf_tower(txt) | dict(vocab_size=txt['vocab_size'], max_position_embeddings=txt['max_len'],
                               eos_token_id=txt['eos_token_id'])


def hf_config(kwargs) -> dict:
  """The HF config.json (`CLIPConfig` / `SiglipConfig`) of zoo DualEncoder kwargs: the inverse
  of `clip_config` / `siglip_config`, for `zoo export`."""
  image, txt, kind = kwargs['image'], kwargs['text'], kwargs['kind']
  if kind not in ('clip', 'siglip'):
    raise ValueError(f'a {kind!r} dual encoder has no transformers equivalent (clip, siglip)')
  vision = _hf_tower(image) | dict(image_size=image['image_size'],
                                   patch_size=image['patch_size'],
                                   num_channels=image['in_channels'])
  text_cfg = hf_text_config(txt)
  if kind == 'clip':
    return dict(model_type='clip', architectures=['CLIPModel'], projection_dim=kwargs['embed_dim'],
                logit_scale_init_value=kwargs['logit_scale_init'], vision_config=vision,
                text_config=text_cfg)
  text_cfg['projection_size'] = txt['head_dim']
  return dict(model_type='siglip', architectures=['SiglipModel'], vision_config=vision,
              text_config=text_cfg)


def hf_name(path) -> str:
  """The HF key of a zoo DualEncoder param path (`vision_model/encoder/layers_0/mlp/fc1/kernel`)."""
  *modules, leaf = path
  parts = [re.sub(r'_(\d+)$', r'.\1', m) for m in modules]
  leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(leaf, leaf)
  return '.'.join(parts + [leaf])


def _expected_shapes(model_kwargs):
  """{zoo path tuple: shape} of DualEncoder(**model_kwargs), without running it."""
  dual_encoder.check_config(model_kwargs, None)
  model = dual_encoder.DualEncoder(**model_kwargs)
  image = vit.ViT(**model.image)
  images = jax.ShapeDtypeStruct((1, image.image_size, image.image_size, image.in_channels),
                                np.float32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), images,
                         jax.ShapeDtypeStruct((1, 1), np.int32))['params']
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _check_tree(flat, model_kwargs):
  """Raises ValueError unless `flat` ({path: array}) fills DualEncoder(**model_kwargs) exactly."""
  expected = _expected_shapes(model_kwargs)
  for path, value in flat.items():
    if path not in expected:
      raise ValueError(f'checkpoint key {hf_name(path)!r} is not used by this DualEncoder '
                       f'(kind={model_kwargs.get("kind")!r})')
    if tuple(value.shape) != expected[path]:
      raise ValueError(f'checkpoint key {hf_name(path)!r} has shape {tuple(value.shape)} after '
                       f'conversion; the model wants {expected[path]} at {"/".join(path)}')
  missing = [hf_name(p) for p in expected if p not in flat]
  if missing:
    raise ValueError(f'checkpoint lacks keys {missing}')


def _convert_dual(key, value):
  """[(zoo path, value)] for one HF CLIPModel / SiglipModel parameter."""
  value = np.asarray(value)
  if key in SCALARS:
    return [((key,), value.reshape(()))]
  if key in TOP_LINEAR:
    return [((key.split('.')[0], 'kernel'), value.T)]
  if key.startswith(MAP_IN_PROJ):
    leaf = key.removeprefix(MAP_IN_PROJ)
    return [(('vision_model', 'head', 'attention', f'{n}_proj',
              'kernel' if leaf == 'weight' else 'bias'), part.T if part.ndim == 2 else part)
            for n, part in zip('qkv', np.split(value, 3, axis=0))]
  if key.startswith(TOWERS):
    return [diffusers.convert_key(key, value, embeddings=EMBEDDINGS)]
  raise ValueError(f'checkpoint key {key!r} is not a CLIPModel / SiglipModel parameter')


def from_hf_dual(state_dict, model_kwargs=None) -> dict:
  """Nested zoo DualEncoder params from an HF `CLIPModel` or `SiglipModel` state dict.

  With `model_kwargs` (e.g. from `clip_config` / `siglip_config`) the result is checked
  against that model's tree: an unused or missing key, or a wrong shape, raises ValueError.
  Buffers (`position_ids`) are skipped.
  """
  flat = {}
  for key, value in state_dict.items():
    if key.rsplit('.', 1)[-1] in BUFFERS:
      continue
    flat.update(_convert_dual(key, value))
  if model_kwargs is not None:
    _check_tree(flat, model_kwargs)
  return diffusers.nest(flat.items())


def to_hf_dual(params) -> dict:
  """HF `CLIPModel` / `SiglipModel` state dict (`{name: numpy array}`) from zoo params.

  The inverse of `from_hf_dual`; `logit_scale` / `logit_bias` get SigLIP's shape (1,) when
  a `logit_bias` exists, CLIP's () otherwise.
  """
  flat = {tuple(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]}
  if ('vision_model', 'embeddings', 'stem_conv', 'kernel') in flat:
    raise ValueError('this dual encoder has a convolutional stem (model.image.stem_channels); '
                     'HF CLIPModel / SiglipModel patchify with one conv and have no such layers: '
                     'only towers with model.image.stem_channels=() export')
  siglip = ('logit_bias',) in flat
  out, in_proj = {}, {}
  for path, value in flat.items():
    if path[:3] == ('vision_model', 'head', 'attention') and path[3] != 'out_proj':
      in_proj.setdefault(path[-1], {})[path[3][0]] = value
      continue
    if path[-1] == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    if path in (('logit_scale',), ('logit_bias',)):
      value = value.reshape((1,) if siglip else ())
    out[hf_name(path)] = np.asarray(value, order='C')
  for leaf, parts in in_proj.items():
    fused = np.concatenate([parts[n].T if leaf == 'kernel' else parts[n] for n in 'qkv'], axis=0)
    out[MAP_IN_PROJ + ('weight' if leaf == 'kernel' else 'bias')] = np.asarray(fused, order='C')
  return out


def to_hf_clip_text(params) -> dict:
  """HF `CLIPTextModel` state dict (`text_model.*`) of zoo TextTransformer params (the inverse
  of `from_hf_clip_text` for towers without `text_projection`)."""
  return to_hf_dual({'text_model': params})


# open_clip / OpenAI CLIP names -> HF CLIPModel names (NUMERICS.md Multimodal 4.3); '{}' is a
# block index. Matched as prefixes, first match wins.
OPEN_CLIP_PREFIXES = (
    ('visual.transformer.resblocks.{}.', 'vision_model.encoder.layers.{}.'),
    ('transformer.resblocks.{}.', 'text_model.encoder.layers.{}.'),
    ('visual.conv1.', 'vision_model.embeddings.patch_embedding.'),
    ('visual.ln_pre.', 'vision_model.pre_layrnorm.'),
    ('visual.ln_post.', 'vision_model.post_layernorm.'),
    ('token_embedding.', 'text_model.embeddings.token_embedding.'),
    ('ln_final.', 'text_model.final_layer_norm.'),
)
OPEN_CLIP_EXACT = {
    'visual.class_embedding': 'vision_model.embeddings.class_embedding',
    'visual.positional_embedding': 'vision_model.embeddings.position_embedding.weight',
    'positional_embedding': 'text_model.embeddings.position_embedding.weight',
    'logit_scale': 'logit_scale',
}
# Projections stored as [D, E] matrices (x @ proj): an HF Linear weight is their transpose.
OPEN_CLIP_PROJECTIONS = {'visual.proj': 'visual_projection.weight',
                         'text_projection': 'text_projection.weight'}
OPEN_CLIP_BLOCK = (('ln_1.', 'layer_norm1.'), ('ln_2.', 'layer_norm2.'),
                   ('mlp.c_fc.', 'mlp.fc1.'), ('mlp.c_proj.', 'mlp.fc2.'),
                   ('attn.out_proj.', 'self_attn.out_proj.'))
# Not parameters: the causal-mask buffer and the OpenAI JIT archive's metadata.
OPEN_CLIP_SKIP = ('attn_mask', 'input_resolution', 'context_length', 'vocab_size')


def _open_clip_block(rest, value, hf_prefix, key):
  if rest.startswith('attn.in_proj_'):
    leaf = rest.removeprefix('attn.in_proj_')
    return [(f'{hf_prefix}self_attn.{n}_proj.{leaf}', part)
            for n, part in zip('qkv', np.split(np.asarray(value), 3, axis=0))]
  for old, new in OPEN_CLIP_BLOCK:
    if rest.startswith(old):
      return [(hf_prefix + new + rest.removeprefix(old), value)]
  raise ValueError(f'open_clip key {key!r} is not a CLIP residual-block parameter')


def _open_clip_to_hf(key, value):
  """[(HF CLIPModel key, value)] for one open_clip / OpenAI parameter."""
  if key in OPEN_CLIP_EXACT:
    return [(OPEN_CLIP_EXACT[key], value)]
  if key in OPEN_CLIP_PROJECTIONS:
    return [(OPEN_CLIP_PROJECTIONS[key], np.asarray(value).T)]
  for old, new in OPEN_CLIP_PREFIXES:
    match = re.match(re.escape(old).replace(r'\{\}', r'(\d+)'), key)
    if not match:
      continue
    if match.groups():
      return _open_clip_block(key[match.end():], value, new.format(match.group(1)), key)
    return [(new + key[match.end():], value)]
  raise ValueError(f'open_clip key {key!r} is not an OpenAI-layout CLIP parameter (attention '
                   'pooling / CoCa / timm towers are not supported)')


def open_clip_to_hf(state_dict) -> dict:
  """An HF `CLIPModel` state dict from an open_clip / OpenAI CLIP one (`{name: array}`)."""
  out = {}
  for key, value in state_dict.items():
    if key.rsplit('.', 1)[-1] in OPEN_CLIP_SKIP:
      continue
    out.update(_open_clip_to_hf(key, value))
  return out


def from_open_clip(state_dict, model_kwargs=None) -> dict:
  """Nested zoo DualEncoder params from an open_clip / OpenAI CLIP state dict.

  Keys: `visual.conv1.weight`, `visual.transformer.resblocks.i.attn.in_proj_weight` (fused
  q/k/v), `ln_1`, `mlp.c_fc`, `visual.proj` and `text_projection` ([D, E], used as x @ W),
  `logit_scale`, ... (see OPEN_CLIP_*). `model_kwargs` as in `from_hf_dual`, e.g. from
  `open_clip_config`.
  """
  return from_hf_dual(open_clip_to_hf(state_dict), model_kwargs)


def _count_blocks(state_dict, prefix):
  pattern = re.compile(re.escape(prefix) + r'(\d+)\.')
  return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def open_clip_config(state_dict, *, act='quick_gelu', image_norm='clip', vision_heads=None,
                     text_heads=None) -> dict:
  """zoo DualEncoder kwargs read off an open_clip / OpenAI CLIP state dict's shapes.

  As OpenAI's `build_model`: heads default to width / 64, and text pooling takes the
  largest id (OpenAI's EOT, 49407, is the last of the vocabulary). `act`: 'quick_gelu' for
  OpenAI weights and open_clip `-quickgelu` configs, 'gelu' for the other open_clip ones.
  """
  conv_OxCxPxP = np.shape(state_dict['visual.conv1.weight'])
  width, patch = conv_OxCxPxP[0], conv_OxCxPxP[-1]
  grid = round((np.shape(state_dict['visual.positional_embedding'])[0] - 1) ** 0.5)
  text_width = np.shape(state_dict['ln_final.weight'])[0]
  vocab = np.shape(state_dict['token_embedding.weight'])[0]
  image = vit.STYLES['clip'] | dict(
      image_size=grid * patch, patch_size=patch, in_channels=conv_OxCxPxP[1], width=width,
      depth=_count_blocks(state_dict, 'visual.transformer.resblocks.'),
      num_heads=vision_heads or width // 64, act=act, image_norm=image_norm,
      mlp_dim=np.shape(state_dict['visual.transformer.resblocks.0.mlp.c_fc.weight'])[0])
  text = dict(vocab_size=vocab, max_len=np.shape(state_dict['positional_embedding'])[0],
              width=text_width, depth=_count_blocks(state_dict, 'transformer.resblocks.'),
              num_heads=text_heads or text_width // 64, act=act, causal=True, pool='argmax',
              eos_token_id=vocab - 1, projection_dim=0, head_dim=0, norm_eps=1e-5,
              mlp_dim=np.shape(state_dict['transformer.resblocks.0.mlp.c_fc.weight'])[0])
  return dict(kind='clip', image=image, text=text,
              embed_dim=np.shape(state_dict['text_projection'])[1],
              logit_scale_init=float(np.asarray(state_dict.get('logit_scale',
                                                               dual_encoder.CLIP_LOGIT_SCALE))),
              logit_bias_init=0.0)


def _read_safetensors(directory):
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = ['model.safetensors']
  state_dict = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found (an HF model directory holds config.json and '
                              'model.safetensors; pickled .bin weights are never read)')
    state_dict.update(safetensors.numpy.load_file(path))
  return state_dict


def load_hf_dual(directory, image_norm='clip') -> tuple[dict, dict]:
  """(DualEncoder kwargs, params) from an HF CLIP / SigLIP model directory (`save_pretrained`).

  Reads config.json and model.safetensors (or its sharded index); `image_norm` as in
  `clip_config` (SigLIP's [-1, 1] input is zoo's already).
  """
  config_path = os.path.join(directory, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} not found')
  with open(config_path) as f:
    hf_config = json.load(f)
  model_type = hf_config.get('model_type')
  if model_type == 'clip':
    kwargs = clip_config(hf_config, image_norm)
  elif model_type == 'siglip':
    kwargs = siglip_config(hf_config)
  else:
    raise ValueError(f'{config_path}: model_type={model_type!r}; allowed: clip, siglip')
  return kwargs, from_hf_dual(_read_safetensors(directory), kwargs)
