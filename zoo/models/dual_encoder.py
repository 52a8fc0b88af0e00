"""Dual encoder (CLIP, SigLIP): a ViT and a text transformer into one embedding space.

Legend: B image batch, T text batch, H/W/C image, L tokens, D tower width, E embed_dim.

Parameter tree, with HF `CLIPModel` / `SiglipModel` names (zoo/convert/transformers.py):
  CLIP:   vision_model (ViT), text_model (TextTransformer, projection_dim 0),
          visual_projection, text_projection (no bias, D -> E), logit_scale;
  SigLIP: vision_model (ViT with the MAP head: its output is the embedding, no projection),
          text_model (with `head`, D -> E), logit_scale, logit_bias.
`logit_scale` holds the log temperature: logits = exp(logit_scale) * img . txt + logit_bias
(NUMERICS.md Multimodal 4.1, 4.2); CLIP has no bias. `image` and `text` are the towers'
keyword arguments (plain dicts, or ConfigDicts from an experiment file).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.models import text as text_lib
from zoo.models import vit

KINDS = ('clip', 'siglip')
CLIP_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = math.log(10.0), -10.0


def _clip(image, text_preset, embed_dim, **image_overrides):
  return dict(kind='clip', image=vit.STYLES['clip'] | vit.preset(image) | image_overrides,
              text=text_lib.preset(text_preset) | {'projection_dim': 0}, embed_dim=embed_dim,
              logit_scale_init=CLIP_LOGIT_SCALE, logit_bias_init=0.0)


def _siglip(image, text_preset, embed_dim, **image_overrides):
  return dict(kind='siglip', image=vit.STYLES['siglip'] | vit.preset(image) | image_overrides,
              text=text_lib.preset(text_preset), embed_dim=embed_dim,
              logit_scale_init=SIGLIP_LOGIT_SCALE, logit_bias_init=SIGLIP_LOGIT_BIAS)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, 32x32 images and the data.text_tokenizers 'shapes' vocabulary.
    'clip-tiny': _clip('tiny', 'tiny', 32),
    'siglip-tiny': _siglip('tiny', 'tiny-siglip', 32),
    # The public checkpoints' shapes (HF openai/clip-vit-*, google/siglip-base-patch16-224).
    'clip-vit-b32': _clip('B/32', 'clip-vit-b32-text', 512, image_size=224, image_norm='clip'),
    'clip-vit-b16': _clip('B/16', 'clip-vit-b32-text', 512, image_size=224, image_norm='clip'),
    'clip-vit-l14': _clip('L/14', 'clip-vit-l14-text', 768, image_size=224, image_norm='clip'),
    'siglip-b16-224': _siglip('B/16', 'siglip-base-text', 768, image_size=224),
}


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of the named preset, `image` and `text` complete (every tower field named)."""
  if name not in PRESETS:
    raise ValueError(f'unknown dual_encoder preset {name!r}; allowed: {sorted(PRESETS)}')
  kw = dict(PRESETS[name])
  kw['image'] = _defaults(vit.ViT) | kw['image']
  kw['text'] = _defaults(text_lib.TextTransformer) | kw['text']
  return kw


def _defaults(cls):
  """{field: default} of a Linen dataclass (default factories called)."""
  return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
          for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')}


def _l2_normalize(x_BxE):
  x_BxE = x_BxE.astype(jnp.float32)
  # rsqrt of a clamped square norm: finite value and gradient even for an all-zero row.
  return x_BxE * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_BxE * x_BxE, -1, keepdims=True), 1e-12))


def _projection(features, width, name):
  # OpenAI init: proj std width^-1/2.
  return nn.Dense(features, use_bias=False, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.normal(width ** -0.5), ('embed', None)), name=name)


def _scalar(value):
  return nn.with_logical_partitioning(nn.initializers.constant(value), ())


class DualEncoder(nn.Module):
  """`__call__(images_BxHxWxC, tokens_TxL, mask_TxL=None, *, train=False)` -> embeddings dict.

  Returns {'image': BxE, 'text': TxE (both L2-normalised float32), 'scale': exp(logit_scale),
  'bias': logit_bias (0.0 for CLIP)}; `logits(outputs)` turns it into BxT logits. Images are
  in [-1, 1]. `encode_image` / `encode_text` give one side (`method='encode_image'`).
  """
  kind: str = 'clip'
  image: dict = dataclasses.field(default_factory=lambda: preset('clip-vit-b32')['image'])
  text: dict = dataclasses.field(default_factory=lambda: preset('clip-vit-b32')['text'])
  embed_dim: int = 512
  logit_scale_init: float = CLIP_LOGIT_SCALE
  logit_bias_init: float = 0.0

  def setup(self):
    check_config(_fields(self), resolution=None)
    image_kw, text_kw = dict(self.image), dict(self.text)
    self.vision_model = vit.ViT(**image_kw)
    self.text_model = text_lib.TextTransformer(**text_kw)
    if self.kind == 'clip':
      self.visual_projection = _projection(self.embed_dim, self.vision_model.width,
                                           'visual_projection')
      self.text_projection = _projection(self.embed_dim, self.text_model.width,
                                         'text_projection')
    self.logit_scale = self.param('logit_scale', _scalar(self.logit_scale_init), (), jnp.float32)
    if self.kind == 'siglip':
      self.logit_bias = self.param('logit_bias', _scalar(self.logit_bias_init), (), jnp.float32)

  def encode_image(self, images_BxHxWxC, *, train=False):
    """L2-normalised image embeddings BxE (float32) of images in [-1, 1]."""
    x_BxE = self.vision_model(images_BxHxWxC, train=train)
    if self.kind == 'clip':
      x_BxE = self.visual_projection(x_BxE)
    return _l2_normalize(x_BxE)

  def encode_text(self, tokens_TxL, mask_TxL=None, *, train=False):
    """L2-normalised text embeddings TxE (float32); mask True = real token."""
    _, x_TxE = self.text_model(tokens_TxL, mask_TxL, train=train)
    if self.kind == 'clip':
      x_TxE = self.text_projection(x_TxE)
    return _l2_normalize(x_TxE)

  def __call__(self, images_BxHxWxC, tokens_TxL, mask_TxL=None, *, train=False):
    bias = self.logit_bias if self.kind == 'siglip' else jnp.zeros((), jnp.float32)
    return {'image': self.encode_image(images_BxHxWxC, train=train),
            'text': self.encode_text(tokens_TxL, mask_TxL, train=train),
            'scale': jnp.exp(self.logit_scale), 'bias': bias}


def logits(outputs: dict[str, jax.Array]) -> jax.Array:
  """BxT logits scale * img . txt + bias (HF `logits_per_image`; its transpose is per text)."""
  sims_BxT = jnp.einsum('be,te->bt', outputs['image'], outputs['text'],
                        preferred_element_type=jnp.float32)
  return outputs['scale'] * sims_BxT + outputs['bias']


FIELDS = tuple(f.name for f in dataclasses.fields(DualEncoder) if f.name not in ('parent', 'name'))


def _fields(module: DualEncoder) -> dict[str, Any]:
  return {f: getattr(module, f) for f in FIELDS}


def _check_towers(kw, image_kw, text_kw, where):
  image = _defaults(vit.ViT) | image_kw
  txt = _defaults(text_lib.TextTransformer) | text_kw
  if image['num_classes']:
    raise ValueError(f"{where}.image.num_classes={image['num_classes']} must be 0 in a dual "
                     'encoder (the image embedding is the pooled feature)')
  if txt['projection_dim']:
    raise ValueError(f"{where}.text.projection_dim={txt['projection_dim']} must be 0 in a dual "
                     f"encoder: {kw['kind']!r} projects with its own layers")
  if kw['kind'] == 'clip':
    if txt['head_dim']:
      raise ValueError(f"{where}.text.head_dim={txt['head_dim']} must be 0 for kind='clip' "
                       f'(text_projection maps to {where}.embed_dim)')
    if kw['logit_bias_init']:
      raise ValueError(f"{where}.logit_bias_init={kw['logit_bias_init']} must be 0.0 for "
                       "kind='clip' (no bias; SigLIP has one)")
    return
  for key, value in (('image.width', image['width']), ('text.head_dim', txt['head_dim'])):
    if value != kw['embed_dim']:
      raise ValueError(f'{where}.{key}={value} must equal {where}.embed_dim={kw["embed_dim"]} '
                       "for kind='siglip' (no projections: the towers' outputs are the embeddings)")


def check_config(model_kwargs: dict[str, Any], resolution: int | None, *,
                 where: str = 'model') -> None:
  """Raises ValueError naming the offending key (e.g. `model.image.patch_size`).

  `resolution` (config.data.resolution; None skips) must equal `image.image_size`.
  """
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown dual_encoder config keys {unknown}; allowed: {list(FIELDS)}')
  kw = _defaults(DualEncoder) | dict(model_kwargs)
  if kw['kind'] not in KINDS:
    raise ValueError(f"{where}.kind={kw['kind']!r}; allowed: {list(KINDS)}")
  if kw['embed_dim'] < 1:
    raise ValueError(f"{where}.embed_dim={kw['embed_dim']} must be >= 1")
  image_kw, text_kw = dict(kw['image']), dict(kw['text'])
  vit.check_config(image_kw, resolution, where=f'{where}.image')
  text_lib.check_config(text_kw, None, where=f'{where}.text')
  _check_towers(kw, image_kw, text_kw, where)
