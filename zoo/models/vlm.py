"""Vision-language transformer: a ViT and a decoder-only language model, fused early, mid or late.

Legend: B batch, H/W image side, N visual tokens, R resampler latents, L text tokens, S slots
(visual prefix + text, early fusion), C cache slots, D language width, V vision width, A heads,
K head width, T vocabulary.

`fusion` picks how the image reaches the language model (Alayrac et al. 2022, "Flamingo";
the early / late baselines as the seed names them):
  'mid'   tanh-gated cross-attention blocks before every `cross_every`-th language layer (gates
          start at 0, so training starts from the text-only model), attending to the ViT's
          tokens or, with `resampler_latents` R > 0, to R latents of a Perceiver resampler;
  'early' the visual tokens, projected to D, are a prefix of the language sequence; a prefix-LM
          mask gives full attention over image and prompt (`prefix_B` slots) and causal
          attention over the answer;
  'late'  the language model reads the text alone; the pooled image feature, projected to D, is
          added to the final hidden state before the output head (merged at the decision);
  'none'  the text-only language model (what 'mid' equals with its gates at 0).

The vision tower keeps the ViT's parameter layout (`vision/{embeddings, pre_layrnorm, encoder/
layers_i, post_layernorm}`, zoo/models/vit.py) so a dual encoder's image tower initialises it
(`task.vision_from`); the `vision_*` fields (activation, patch bias, class token, pre-LN, image
normalisation, eps) describe a CLIP or SigLIP tower as well as the default one (`vision_fields`);
its attention and token reduction (pruning, ToMe merging, sparse and low-rank attention) come
from zoo/nn/mitigations.py. Language layers (zoo/nn/vlm_layers.py) are pre-LN with rotary (or
learned) positions.

With `decode=True` the self-attention keeps a key/value cache (Flax collection 'cache', C =
`cache_slots` slots): a call with L tokens writes slots i..i+L-1 (i the cache's index) and
attends to the slots written so far, so a prefill and one token at a time give the same logits
as one full call (tests/test_vlm.py). Positions are explicit (`positions_BxL`), so left-padded
prompts decode in a batch.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.models import text
from zoo.models import vit
from zoo.nn import layers
from zoo.nn import mitigations
from zoo.nn import stack
from zoo.nn import vlm_layers

FUSIONS = ('mid', 'early', 'late', 'none')
POSITIONS = ('rope', 'learned')
ACT_AXES = text.ACT_AXES

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized for the 32x32 shapes and the word-level 'shapes' tokenizer.
    'tiny': dict(image_size=32, patch_size=4, vision_width=64, vision_depth=2, vision_heads=4,
                 vision_stem=(32, 64), vocab_size=113, max_len=40, width=96, depth=4,
                 num_heads=4, cross_every=2),
    'small': dict(image_size=64, patch_size=8, vision_width=256, vision_depth=6,
                  vision_heads=4, width=384, depth=8, num_heads=6, cross_every=2),
}


def preset(name: str) -> dict[str, Any]:
  """The fields of a named preset ('tiny', 'small')."""
  if name not in PRESETS:
    raise ValueError(f'unknown vlm preset {name!r}; allowed: {sorted(PRESETS)}')
  return dict(PRESETS[name])


class VisionTower(nn.Module):
  """The ViT's embeddings and encoder (zoo/models/vit.py names), with token reduction.

  With `class_token` the class token leads the tokens and is never pruned or merged away.
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  stem_channels: tuple[int, ...]
  act: str
  patch_bias: bool
  class_token: bool
  pre_norm: bool
  image_norm: str
  norm_eps: float
  attention: str
  window: int
  block: int
  rank: int
  reduce: str
  reduce_from: int
  prune_keep: float
  merge_r: int
  dtype: Any
  remat: bool

  @nn.compact
  def __call__(self, images_BxHxWxC):
    """(tokens BxNxV after post_layernorm, sizes BxN: patches each token stands for)."""
    x_BxNxV = vit.Embeddings(self.patch_size, self.width, self.patch_bias, self.class_token,
                             self.dtype, tuple(self.stem_channels), name='embeddings')(
                                 vit.normalize_images(images_BxHxWxC, self.image_norm))
    if self.pre_norm:
      x_BxNxV = text.layer_norm(self.norm_eps, 'pre_layrnorm')(x_BxNxV)
    x_BxNxV, size_BxN = mitigations.ReducingEncoder(
        depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act,
        norm_eps=self.norm_eps, dtype=self.dtype, remat=self.remat, attention=self.attention,
        window=self.window, block=self.block, rank=self.rank, reduce=self.reduce,
        reduce_from=self.reduce_from, prune_keep=self.prune_keep, merge_r=self.merge_r,
        protect=int(self.class_token), name='encoder')(x_BxNxV)
    return text.layer_norm(self.norm_eps, 'post_layernorm')(x_BxNxV), size_BxN


class VLM(nn.Module):
  """Images BxHxWxC in [-1, 1] and tokens BxL -> next-token logits BxLxT (float32).

  `mlp_dim` 0 means 4 * width. `prompt_len_B` (early fusion) is how many leading text tokens
  belong to the bidirectional prefix with the image; default 0 (image prefix only).
  """
  fusion: str = 'mid'
  image_size: int = 32
  patch_size: int = 4
  in_channels: int = 3
  vision_width: int = 64
  vision_depth: int = 2
  vision_heads: int = 4
  vision_stem: tuple[int, ...] = ()
  vision_mlp_dim: int = 0
  vision_act: str = 'gelu'
  vision_patch_bias: bool = True
  vision_class_token: bool = False
  vision_pre_norm: bool = True
  vision_image_norm: str = 'none'
  vision_norm_eps: float = 1e-5
  attention: str = 'full'
  window: int = 1
  block: int = 16
  rank: int = 16
  reduce: str = 'none'
  reduce_from: int = 1
  prune_keep: float = 0.5
  merge_r: int = 0
  vocab_size: int = 113
  max_len: int = 40
  width: int = 96
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 0
  positions: str = 'rope'
  cross_every: int = 2
  resampler_latents: int = 0
  resampler_depth: int = 2
  norm_eps: float = 1e-5
  dtype: str = 'float32'
  remat: bool = False

  @property
  def visual_tokens(self) -> int:
    """Visual tokens after the vision tower's reduction (and the resampler, for 'mid')."""
    if self.fusion == 'mid' and self.resampler_latents:
      return self.resampler_latents
    return mitigations.output_tokens(_patch_tokens(_fields(self)), self.vision_depth,
                                     self.reduce, self.reduce_from, self.prune_keep,
                                     self.merge_r, int(self.vision_class_token))

  @property
  def cache_slots(self) -> int:
    """Key/value slots of the decoding cache: the visual prefix (early fusion), then text."""
    return self.max_len + (self.visual_tokens if self.fusion == 'early' else 0)

  @property
  def cross_layers(self) -> tuple[int, ...]:
    """Language layers preceded by a gated cross-attention block ('mid')."""
    return tuple(range(0, self.depth, self.cross_every)) if self.fusion == 'mid' else ()

  def setup(self):
    check_config(_fields(self), None)
    dtype = layers.to_dtype(self.dtype)
    mlp_dim = self.mlp_dim or 4 * self.width
    if self.fusion != 'none':
      self.vision = VisionTower(
          image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width,
          depth=self.vision_depth, num_heads=self.vision_heads,
          mlp_dim=self.vision_mlp_dim or 4 * self.vision_width,
          stem_channels=tuple(self.vision_stem), act=self.vision_act,
          patch_bias=self.vision_patch_bias, class_token=self.vision_class_token,
          pre_norm=self.vision_pre_norm, image_norm=self.vision_image_norm,
          norm_eps=self.vision_norm_eps, attention=self.attention, window=self.window,
          block=self.block, rank=self.rank, reduce=self.reduce, reduce_from=self.reduce_from,
          prune_keep=self.prune_keep, merge_r=self.merge_r, dtype=dtype, remat=self.remat)
      self.vision_proj = text._dense(self.width, (None, 'embed'), self.vision_width ** -0.5,
                                     dtype, 'vision_proj')
    if self.fusion == 'mid' and self.resampler_latents:
      self.resampler = vlm_layers.PerceiverResampler(
          self.resampler_latents, self.resampler_depth, self.num_heads, self.norm_eps, dtype)
    self.token_embedding = nn.Embed(
        self.vocab_size, self.width, param_dtype=jnp.float32,
        embedding_init=text._init(nn.initializers.normal(0.02), ('vocab', 'embed')))
    if self.positions == 'learned':
      self.position_embedding = nn.Embed(
          self.cache_slots, self.width, param_dtype=jnp.float32,
          embedding_init=text._init(nn.initializers.normal(0.01), (None, 'embed')))
    self.layers = [vlm_layers.DecoderLayer(*self._layer_fields()) for _ in range(self.depth)]
    self.xattn = [vlm_layers.GatedCrossAttention(self.num_heads, mlp_dim, self.depth,
                                                 self.norm_eps, dtype)
                  for _ in self.cross_layers]
    self.final_norm = text.layer_norm(self.norm_eps, 'final_norm')
    self.head = text._dense(self.vocab_size, ('embed', 'vocab'), self.width ** -0.5, dtype,
                            'head')

  def _layer_fields(self):
    """DecoderLayer's fields (GatedCrossAttention takes the same but rope / cache_slots)."""
    return (self.num_heads, self.mlp_dim or 4 * self.width, self.depth,
            self.positions == 'rope', self.cache_slots, self.norm_eps, layers.to_dtype(self.dtype))

  def _group_names(self, groups, size):
    """Per scan step, LanguageGroup's children -> this module's: xattn_k, layers_{k size + j}."""
    names = []
    for k in range(groups):
      entry = {f'layer_{j}': f'layers_{k * size + j}' for j in range(size)}
      names.append(entry | ({'xattn': f'xattn_{k}'} if self.cross_layers else {}))
    return names

  def encode_image(self, images_BxHxWxC):
    """What the language model reads of the image, in its width: BxMxD visual tokens ('mid':
    the resampler's latents with one; 'early': the prefix) or Bx1xD ('late': the pooled image).
    """
    self._check_images(images_BxHxWxC)
    tokens_BxNxV, size_BxN = self.vision(jnp.asarray(images_BxHxWxC, jnp.float32))
    if self.fusion == 'late':
      # Size-weighted: a merged token stands for `size` patches.
      weights_BxN = size_BxN / size_BxN.sum(axis=1, keepdims=True)
      tokens_BxNxV = jnp.einsum('bn,bnv->bv', weights_BxN, tokens_BxNxV)[:, None]
    visual_BxMxD = self.vision_proj(tokens_BxNxV).astype(jnp.float32)
    if self.fusion == 'mid' and self.resampler_latents:
      visual_BxMxD = self.resampler(visual_BxMxD)
    return visual_BxMxD

  def language(self, tokens_BxL, visual_BxMxD, positions_BxL, mask_BxL, prefix_B,
               decode=False):
    """Logits BxLxT of the text tokens. 'early': `visual_BxMxD` (the prefix) is prepended,
    and `positions_BxL` / `mask_BxL` / `prefix_B` count its slots; pass None after the
    prefill when decoding."""
    x_BxSxD = self.token_embedding(jnp.asarray(tokens_BxL, jnp.int32))
    length = tokens_BxL.shape[1]
    if self.fusion == 'early' and visual_BxMxD is not None:
      x_BxSxD = jnp.concatenate([visual_BxMxD, x_BxSxD], axis=1)
    # Gradients with respect to 'perturbations' are gradients with respect to the inputs.
    x_BxSxD = self.perturb('embeddings', x_BxSxD)
    if self.positions == 'learned':
      x_BxSxD = x_BxSxD + self.position_embedding(positions_BxL)
    x_BxSxD = nn.with_logical_constraint(x_BxSxD, ACT_AXES)
    xattn = dict(zip(self.cross_layers, self.xattn))
    # Whole groups (a cross-attention block and the layers up to the next) run as one scan
    # (zoo/nn/stack.py), the rest unrolled; decoding (a key/value cache per layer) unrolled.
    group = self.cross_every if self.fusion == 'mid' else 1
    first = self.depth // group * group
    if not decode and stack.use_scan(self) and first > group:
      group_layer = vlm_layers.LanguageGroup(self._layer_fields(), bool(xattn), group,
                                             parent=None)
      x_BxSxD = stack.scan(self, group_layer, self._group_names(first // group, group),
                           x_BxSxD, visual_BxMxD, positions_BxL, mask_BxL, prefix_B,
                           axes=ACT_AXES)
    else:
      first = 0
    for i in range(first, self.depth):
      if i in xattn:
        x_BxSxD = xattn[i](x_BxSxD, visual_BxMxD)
      x_BxSxD = self.layers[i](x_BxSxD, positions_BxL, mask_BxL, prefix_B, decode)
      x_BxSxD = nn.with_logical_constraint(x_BxSxD, ACT_AXES)
    h_BxLxD = self.final_norm(x_BxSxD[:, -length:])
    if self.fusion == 'late':
      h_BxLxD = h_BxLxD + visual_BxMxD
    return self.head(h_BxLxD.astype(layers.to_dtype(self.dtype))).astype(jnp.float32)

  def __call__(self, images_BxHxWxC, tokens_BxL, mask_BxL=None, prompt_len_B=None, *,
               train=False):
    """Teacher-forced logits BxLxT: position t predicts token t + 1."""
    del train  # No dropout.
    self._check_tokens(tokens_BxL)
    batch, length = tokens_BxL.shape
    mask_BxL = jnp.ones((batch, length), bool) if mask_BxL is None else jnp.asarray(mask_BxL)
    prompt_len_B = (jnp.zeros((batch,), jnp.int32) if prompt_len_B is None
                    else jnp.asarray(prompt_len_B, jnp.int32))
    visual = None if self.fusion == 'none' else self.encode_image(images_BxHxWxC)
    prefix_B = jnp.zeros((batch,), jnp.int32)
    if self.fusion == 'early':
      n = visual.shape[1]
      mask_BxL = jnp.concatenate([jnp.ones((batch, n), bool), mask_BxL], axis=1)
      prefix_B = n + prompt_len_B
      length += n
    positions_BxL = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    return self.language(tokens_BxL, visual, positions_BxL, mask_BxL, prefix_B)

  def _check_images(self, images_BxHxWxC):
    want = (self.image_size, self.image_size, self.in_channels)
    if images_BxHxWxC.ndim != 4 or tuple(images_BxHxWxC.shape[1:]) != want:
      raise ValueError(f'images must be Bx{want[0]}x{want[1]}x{want[2]} (model.image_size, '
                       f'model.in_channels), got shape {tuple(images_BxHxWxC.shape)}')

  def _check_tokens(self, tokens_BxL):
    if tokens_BxL.ndim != 2 or not 1 <= tokens_BxL.shape[1] <= self.max_len:
      raise ValueError(f'tokens must be BxL with 1 <= L <= model.max_len={self.max_len} (the '
                       f'context), got shape {tuple(tokens_BxL.shape)}')


FIELDS = tuple(f.name for f in dataclasses.fields(VLM) if f.name not in ('parent', 'name'))


def _fields(module: VLM) -> dict[str, Any]:
  return {f: getattr(module, f) for f in FIELDS}


def check_config(model_kwargs: dict[str, Any], resolution: int | None, *,
                 where: str = 'model') -> None:
  """Raises ValueError naming the offending `model.*` key, before anything is built."""
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown vlm config keys {unknown} in {where}; allowed: {list(FIELDS)}')
  kw = {f: getattr(VLM, f) for f in FIELDS} | dict(model_kwargs)
  for key, allowed in (('fusion', FUSIONS), ('positions', POSITIONS),
                       ('dtype', tuple(layers.DTYPES)), ('vision_act', text.ACTS),
                       ('vision_image_norm', vit.IMAGE_NORMS)):
    if kw[key] not in allowed:
      raise ValueError(f'{where}.{key}={kw[key]!r}; allowed: {list(allowed)}')
  for key in ('image_size', 'patch_size', 'in_channels', 'vision_width', 'vision_depth',
              'vision_heads', 'vocab_size', 'max_len', 'width', 'depth', 'num_heads',
              'cross_every', 'resampler_depth'):
    if kw[key] < 1:
      raise ValueError(f'{where}.{key}={kw[key]} must be >= 1')
  if resolution is not None and resolution != kw['image_size']:
    raise ValueError(f"{where}.image_size={kw['image_size']} != data.resolution={resolution}")
  if kw['image_size'] % kw['patch_size']:
    raise ValueError(f"{where}.image_size={kw['image_size']} must be divisible by "
                     f"{where}.patch_size={kw['patch_size']}")
  if kw['vision_stem'] and 2 ** len(kw['vision_stem']) != kw['patch_size']:
    raise ValueError(f"{where}.vision_stem={tuple(kw['vision_stem'])}: 2**len must equal "
                     f"{where}.patch_size={kw['patch_size']}")
  if kw['width'] % kw['num_heads'] or (kw['width'] // kw['num_heads']) % 2:
    raise ValueError(f"{where}.width={kw['width']} must be divisible by {where}.num_heads="
                     f"{kw['num_heads']} into an even head width (rotary positions)")
  if kw['vision_width'] % kw['vision_heads']:
    raise ValueError(f"{where}.vision_width={kw['vision_width']} must be divisible by "
                     f"{where}.vision_heads={kw['vision_heads']}")
  for key in ('resampler_latents', 'mlp_dim', 'vision_mlp_dim'):
    if kw[key] < 0:
      raise ValueError(f'{where}.{key}={kw[key]} must be >= 0')
  if kw['vision_norm_eps'] <= 0:
    raise ValueError(f"{where}.vision_norm_eps={kw['vision_norm_eps']} must be > 0")
  if kw['vision_image_norm'] == 'clip' and kw['in_channels'] != 3:
    raise ValueError(f"{where}.vision_image_norm='clip' needs RGB images: {where}.in_channels="
                     f"{kw['in_channels']} must be 3")
  mitigations.config_check(kw['attention'], kw['reduce'], kw['window'], kw['block'], kw['rank'],
                           kw['prune_keep'], kw['merge_r'], _patch_tokens(kw), where=where,
                           depth=kw['vision_depth'], reduce_from=kw['reduce_from'],
                           protect=int(kw['vision_class_token']))


def _patch_tokens(kw) -> int:
  """Tokens entering the vision encoder: the patch grid, and the class token."""
  return (kw['image_size'] // kw['patch_size']) ** 2 + int(kw['vision_class_token'])


# A ViT's fields (zoo/models/vit.py) -> the VLM fields of the same vision tower.
VISION_FROM_VIT = {
    'image_size': 'image_size', 'patch_size': 'patch_size', 'in_channels': 'in_channels',
    'width': 'vision_width', 'depth': 'vision_depth', 'num_heads': 'vision_heads',
    'stem_channels': 'vision_stem', 'act': 'vision_act', 'patch_bias': 'vision_patch_bias',
    'pre_norm': 'vision_pre_norm', 'image_norm': 'vision_image_norm',
    'norm_eps': 'vision_norm_eps'}


def vision_fields(vit_kwargs: dict[str, Any]) -> dict[str, Any]:
  """The VLM fields whose vision tower has the params and function of a ViT's (all its fields,
  as `models.fields('vit') | kwargs`): the tokens are the ViT's post-LN tokens; its pooling
  head or classifier has no place here. For `task.vision_from` (zoo/tasks/vlm.py)."""
  out = {ours: vit_kwargs[theirs] for theirs, ours in VISION_FROM_VIT.items()}
  out['vision_stem'] = tuple(out['vision_stem'])
  out['vision_mlp_dim'] = vit_kwargs['mlp_dim'] or 4 * vit_kwargs['width']
  out['vision_class_token'] = vit_kwargs['pool'] == 'cls'
  return out
