"""Vision Transformer: the CLIP and SigLIP image towers, and a ViT classifier trained from scratch.

Legend: B batch, H/W image height/width (image_size), C channels, G patch-grid side
(image_size / patch_size), N tokens (G*G, plus 1 with the class token), D width, K classes.

Parameter paths follow HF `CLIPVisionModel` / `SiglipVisionModel` (zoo/convert/transformers.py):
  embeddings/{stem_conv, stem_blocks_i, stem_norm (with stem_channels), patch_embedding/{kernel,
  bias}, class_embedding, position_embedding/embedding},
  pre_layrnorm (sic: HF's spelling), encoder/layers_i/... (the text tower's encoder, same names),
  post_layernorm, head/{probe, attention/{q_proj, k_proj, v_proj, out_proj}, layernorm,
  mlp/{fc1, fc2}} (pool 'map'), classifier (num_classes > 0; HF `*ForImageClassification`'s
  name, because `head` is the MAP head's).
CLIP (`STYLES['clip']`): patch conv without bias, a class token, `pre_layrnorm`, QuickGELU, eps
1e-5, `post_layernorm` on the class token. SigLIP (`STYLES['siglip']`): patch conv with bias,
no class token, no pre-LN, tanh-GELU, eps 1e-6, `post_layernorm` on every token, then the MAP
head (NUMERICS.md Multimodal 4.1, 4.2). `post_layernorm` is applied to all tokens in every
style: LayerNorm is per token, so this equals CLIP's norm of the class token alone.

Images arrive in [-1, 1] (zoo's pipeline range). `image_norm='clip'` maps them to the OpenAI
mean/std normalisation that converted CLIP weights expect; SigLIP's [-1, 1] is zoo's already.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.models import classifier
from zoo.models import text
from zoo.nn import dit_layers as dl
from zoo.nn import layers

ACT_AXES = text.ACT_AXES
POOLS = ('cls', 'map', 'gap')
STEM_GROUPS = 8  # GroupNorm groups in the convolutional stem (stem_channels).
IMAGE_NORMS = ('none', 'clip')
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# big_vision `vit.decode_variant`: (width, depth, mlp_dim, num_heads).
SIZES = {'Ti': (192, 12, 768, 3), 'S': (384, 12, 1536, 6), 'B': (768, 12, 3072, 12),
         'L': (1024, 24, 4096, 16)}
PRESETS: dict[str, dict[str, Any]] = {
    f'{size}/{patch}': dict(zip(('width', 'depth', 'mlp_dim', 'num_heads'), SIZES[size]),
                            patch_size=patch)
    for size, patch in (('Ti', 16), ('S', 16), ('S', 32), ('B', 16), ('B', 32), ('L', 14),
                        ('L', 16))
}
# CPU-sized: 32x32 images, 16 patches of 8x8, two blocks of width 32.
PRESETS['tiny'] = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)
# The fields that make a tower CLIP-like or SigLIP-like, whatever its size.
STYLES: dict[str, dict[str, Any]] = {
    'clip': dict(pool='cls', pre_norm=True, patch_bias=False, act='quick_gelu', norm_eps=1e-5),
    'siglip': dict(pool='map', pre_norm=False, patch_bias=True, act='gelu_tanh', norm_eps=1e-6),
}


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of the named preset's ViT keyword arguments (sizes only; see STYLES)."""
  if name not in PRESETS:
    raise ValueError(f'unknown ViT preset {name!r}; allowed: {sorted(PRESETS)}')
  return dict(PRESETS[name])


def normalize_images(x_BxHxWxC, image_norm):
  """Images in [-1, 1], float32, as the tower of `image_norm` ('none' or 'clip') reads them."""
  x_BxHxWxC = jnp.asarray(x_BxHxWxC, jnp.float32)
  if image_norm == 'none':
    return x_BxHxWxC
  mean_C, std_C = jnp.array(CLIP_MEAN), jnp.array(CLIP_STD)
  return ((x_BxHxWxC + 1) / 2 - mean_C.reshape(1, 1, 1, -1)) / std_C.reshape(1, 1, 1, -1)


class Embeddings(nn.Module):
  """Patchify conv, optional class token, learned positions (std 1/sqrt(D), as both towers).

  With `stem_channels` (c_1, ..., c_k) the patchify conv is replaced by a convolutional stem, as
  the hybrid ViTs (Dosovitskiy et al. 2021) and "Early convolutions help transformers see
  better" (Xiao et al. 2021): a 3x3 conv to c_1 at full resolution, then per width a 2x2
  max-pool and a pre-activation residual block (the classifier's `ResBlock`, GroupNorm), then
  GroupNorm-SiLU and a 1x1 `patch_embedding` to D; 2^k must equal the patch size. Small
  objects in small images (shapes at 32x32) train several times faster through it.
  """
  patch_size: int
  width: int
  patch_bias: bool
  class_token: bool
  dtype: Any
  stem_channels: tuple[int, ...] = ()

  def _stem(self, x_BxHxWxC):
    h = layers.conv(self.stem_channels[0], 3, axes=(None, None, None, 'conv_out'),
                    name='stem_conv')(x_BxHxWxC.astype(jnp.float32))
    for i, channels in enumerate(self.stem_channels):
      h = nn.max_pool(h, (2, 2), (2, 2))
      h = classifier.ResBlock(channels, STEM_GROUPS, 0.0, name=f'stem_blocks_{i}')(h, False)
    return nn.silu(layers.GroupNorm(STEM_GROUPS, name='stem_norm')(h))

  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = self._stem(x_BxHxWxC) if self.stem_channels else x_BxHxWxC
    p = 1 if self.stem_channels else self.patch_size
    x_BxGxGxD = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID',
                        use_bias=self.patch_bias, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=dl.with_axes(nn.initializers.lecun_normal(),
                                                 (None, None, None, 'embed')),
                        bias_init=dl.with_axes(nn.initializers.zeros_init(), ('embed',)),
                        name='patch_embedding')(x.astype(self.dtype))
    batch = x_BxGxGxD.shape[0]
    x_BxNxD = x_BxGxGxD.reshape(batch, -1, self.width).astype(jnp.float32)
    std = self.width ** -0.5
    if self.class_token:
      cls_D = self.param('class_embedding', dl.with_axes(nn.initializers.normal(std), ('embed',)),
                         (self.width,), jnp.float32)
      x_BxNxD = jnp.concatenate(
          [jnp.broadcast_to(cls_D[None, None], (batch, 1, self.width)), x_BxNxD], axis=1)
    pos = nn.Embed(x_BxNxD.shape[1], self.width, param_dtype=jnp.float32,
                   embedding_init=dl.with_axes(nn.initializers.normal(std), (None, 'embed')),
                   name='position_embedding')
    return x_BxNxD + pos(jnp.arange(x_BxNxD.shape[1]))[None]


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision `MAPHead`, HF `SiglipMultiheadAttentionPoolingHead`).

  A learned probe attends to the tokens (no LayerNorm before it and no residual around the
  attention), then y = x + MLP(LN(x)); the output is the probe's row.
  """
  num_heads: int
  mlp_dim: int
  act: str
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxNxD):
    batch, _, width = x_BxNxD.shape
    probe_1x1xD = self.param(
        'probe', dl.with_axes(nn.initializers.xavier_uniform(), (None, None, 'embed')),
        (1, 1, width), jnp.float32)
    probe_Bx1xD = jnp.broadcast_to(probe_1x1xD, (batch, 1, width)).astype(self.dtype)
    x_Bx1xD = text.SelfAttention(self.num_heads, 1, self.dtype, name='attention')(
        probe_Bx1xD, None, x_BxNxD.astype(self.dtype)).astype(jnp.float32)
    y_Bx1xD = text.layer_norm(self.norm_eps, 'layernorm')(x_Bx1xD).astype(self.dtype)
    x_Bx1xD = x_Bx1xD + text.Mlp(self.mlp_dim, self.act, 1, self.dtype, name='mlp')(
        y_Bx1xD).astype(jnp.float32)
    return x_Bx1xD[:, 0]


class ViT(nn.Module):
  """`__call__(x_BxHxWxC, train=False, features=False)` -> pooled BxD, or logits BxK.

  Returns the pooled features when num_classes is 0, else the `classifier` logits; with
  `features=True`, (that output, pooled BxD). `mlp_dim` 0 means 4 * width. The post-LN tokens
  BxNxD are sown as `intermediates/tokens` (apply with `mutable=['intermediates']`). Params
  are float32, `dtype` is the compute dtype, outputs are float32. `train` is accepted for the
  task interface: there is no dropout.
  """
  image_size: int = 224
  patch_size: int = 16
  in_channels: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 0
  pool: str = 'cls'
  pre_norm: bool = True
  patch_bias: bool = False
  act: str = 'quick_gelu'
  norm_eps: float = 1e-5
  image_norm: str = 'none'
  num_classes: int = 0
  stem_channels: tuple[int, ...] = ()
  dtype: str = 'float32'
  remat: bool = False

  def _check_inputs(self, x_BxHxWxC):
    check_config(_fields(self), resolution=None)
    want = (self.image_size, self.image_size, self.in_channels)
    if x_BxHxWxC.ndim != 4 or tuple(x_BxHxWxC.shape[1:]) != want:
      raise ValueError(f'ViT: images must be Bx{want[0]}x{want[1]}x{want[2]} (model.image_size, '
                       f'model.in_channels), got shape {tuple(x_BxHxWxC.shape)}')

  def _pool(self, x_BxNxD, dtype):
    if self.pool == 'cls':
      return x_BxNxD[:, 0]
    if self.pool == 'gap':
      return x_BxNxD.mean(axis=1)
    return MAPHead(self.num_heads, self.mlp_dim or 4 * self.width, self.act, self.norm_eps,
                   dtype, name='head')(x_BxNxD)

  @nn.compact
  def __call__(self, x_BxHxWxC, train=False, features=False):
    del train
    self._check_inputs(x_BxHxWxC)
    dtype = layers.to_dtype(self.dtype)
    x_BxNxD = Embeddings(self.patch_size, self.width, self.patch_bias, self.pool == 'cls', dtype,
                         tuple(self.stem_channels), name='embeddings')(
                             normalize_images(x_BxHxWxC, self.image_norm))
    if self.pre_norm:
      x_BxNxD = text.layer_norm(self.norm_eps, 'pre_layrnorm')(x_BxNxD)
    x_BxNxD = nn.with_logical_constraint(x_BxNxD, ACT_AXES)
    x_BxNxD = text.Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.act,
                           self.norm_eps, dtype, self.remat, name='encoder')(x_BxNxD)
    x_BxNxD = text.layer_norm(self.norm_eps, 'post_layernorm')(x_BxNxD)
    self.sow('intermediates', 'tokens', x_BxNxD)
    pooled_BxD = self._pool(x_BxNxD, dtype).astype(jnp.float32)
    out = pooled_BxD
    if self.num_classes:
      # Zero-initialised, as big_vision's `head_zeroinit`: the initial loss is exactly log K.
      out = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32,
                     kernel_init=dl.with_axes(nn.initializers.zeros_init(), ('embed', None)),
                     bias_init=dl.with_axes(nn.initializers.zeros_init(), (None,)),
                     name='classifier')(pooled_BxD).astype(jnp.float32)
    return (out, pooled_BxD) if features else out


FIELDS = tuple(f.name for f in dataclasses.fields(ViT) if f.name not in ('parent', 'name'))


def _fields(module: ViT) -> dict[str, Any]:
  return {f: getattr(module, f) for f in FIELDS}


def _check_choices(kw, where):
  for key, allowed in (('pool', POOLS), ('act', text.ACTS), ('image_norm', IMAGE_NORMS),
                       ('dtype', tuple(layers.DTYPES))):
    if kw[key] not in allowed:
      raise ValueError(f'{where}.{key}={kw[key]!r}; allowed: {list(allowed)}')
  if kw['image_norm'] == 'clip' and kw['in_channels'] != 3:
    raise ValueError(f"{where}.image_norm='clip' needs RGB images: {where}.in_channels="
                     f"{kw['in_channels']} must be 3")


def _check_values(kw, where):
  for key in ('image_size', 'patch_size', 'in_channels', 'width', 'depth', 'num_heads'):
    if kw[key] < 1:
      raise ValueError(f'{where}.{key}={kw[key]} must be >= 1')
  for key in ('mlp_dim', 'num_classes'):
    if kw[key] < 0:
      raise ValueError(f'{where}.{key}={kw[key]} must be >= 0')
  if kw['width'] % kw['num_heads']:
    raise ValueError(f"{where}.width={kw['width']} must be divisible by "
                     f"{where}.num_heads={kw['num_heads']}")
  if kw['image_size'] % kw['patch_size']:
    raise ValueError(f"{where}.image_size={kw['image_size']} must be divisible by "
                     f"{where}.patch_size={kw['patch_size']}")
  if kw['norm_eps'] <= 0:
    raise ValueError(f"{where}.norm_eps={kw['norm_eps']} must be > 0")
  stem = tuple(kw['stem_channels'])
  if stem and (any(int(c) % STEM_GROUPS or c < 1 for c in stem)
               or 2 ** len(stem) != kw['patch_size']):
    raise ValueError(f"{where}.stem_channels={list(stem)}: one width per 2x2 downsampling, "
                     f"each a positive multiple of {STEM_GROUPS}, and 2^len must equal "
                     f"{where}.patch_size={kw['patch_size']}")


def check_config(model_kwargs: dict[str, Any], resolution: int | None, *,
                 where: str = 'model') -> None:
  """Raises ValueError naming the offending `model.*` key for impossible ViT shapes.

  `resolution` (config.data.resolution; None skips) must equal image_size: the position table
  has one row per patch. `where` names the section, e.g. 'model.image' in a dual encoder.
  """
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown ViT config keys {unknown} in {where}; allowed: {list(FIELDS)}')
  kw = {f: getattr(ViT, f) for f in FIELDS} | dict(model_kwargs)
  _check_choices(kw, where)
  _check_values(kw, where)
  if resolution is not None and resolution != kw['image_size']:
    raise ValueError(f'config.data.resolution={resolution} must equal '
                     f"{where}.image_size={kw['image_size']} (one position per patch)")
