"""The speed benchmark's cases: one model per family at bench size and at its smoke size, the
inputs they take (numpy, shared by zoo and the peers) and the loss each trains.

Every family trains the same loss in zoo and in its peers, so that one step is the same work:
  diffusion (unet, unet_t2i, dit)  ε-MSE at x_t = √ᾱ x0 + √(1-ᾱ) ε (linear β, T = 1000)
  vae                              MSE(decode(mean + σ·e), x) + 1e-6·KL
  vit, text                        mean(pooled features · r), r fixed (the tower alone)
  clip / siglip                    softmax cross-entropy both ways / sigmoid loss on the logits
  vlm                              next-token cross-entropy (teacher-forced)
"""

import dataclasses
from typing import Any

import numpy as np

from zoo import config as zoo_config
from zoo import models
from zoo.bench import memory
from zoo.models import dual_encoder

FAMILIES = ('unet', 'unet_t2i', 'vae', 'dit', 'vit', 'text', 'clip', 'siglip', 'vlm')
OBJECTIVE = {'unet': 'diffusion', 'unet_t2i': 'diffusion', 'dit': 'diffusion', 'vae': 'vae',
             'vit': 'features', 'text': 'features', 'clip': 'contrastive',
             'siglip': 'contrastive', 'vlm': 'lm'}
TRANSFORMERS = ('dit', 'vit', 'text', 'clip', 'siglip', 'vlm')  # The ≥ 50% MFU families.
CONTEXT_LEN = 77
# The VLM at bench size: a ViT-B/16 tower on 128x128 images (64 visual tokens) and a 12-layer,
# 768-wide language model with gated cross-attention every second layer (mid fusion).
VLM_BENCH = dict(fusion='mid', image_size=128, patch_size=16, vision_width=768, vision_depth=12,
                 vision_heads=12, vocab_size=32000, max_len=64, width=768, depth=12,
                 num_heads=12, cross_every=2)


@dataclasses.dataclass(frozen=True)
class Case:
  """One family's model (complete zoo kwargs) at one size, and its batch."""
  family: str
  size: str  # 'bench' | 'smoke' | a sweep label
  model: str
  kwargs: dict
  batch: int
  resolution: int = 0  # Convolutional models' input side (others take it from kwargs).

  @property
  def objective(self) -> str:
    return OBJECTIVE[self.family]

  def with_batch(self, batch):
    return dataclasses.replace(self, batch=batch)


def complete(model: str, kw: dict) -> dict:
  """Every field of the model, defaults filled in (what the converters expect)."""
  cfg = models.config(model, **{k: v for k, v in kw.items() if k not in ('image', 'text')})
  out = models.kwargs(cfg)
  if model == 'dual_encoder':
    out['image'], out['text'] = kw['image'], kw['text']
  return out


def bench_cases() -> dict[str, Case]:
  """The fixed bench size of every family (sized for a few seconds a step on 2 CPU cores)."""
  unet = models.unet.preset
  clip_b16, clip_b32 = dual_encoder.preset('clip-vit-b16'), dual_encoder.preset('clip-vit-b32')
  raw = {
      'unet': ('unet', unet('ddpm-cifar10'), 8, 32),
      'unet_t2i': ('unet', memory.SD_LIKE | dict(in_channels=4, out_channels=4), 4, 32),
      'vae': ('vae', models.vae.preset('sd') | dict(block_out_channels=(64, 128, 256, 256)), 2,
              128),
      'dit': ('dit', models.dit.preset('DiT-S/2') | dict(input_size=32, in_channels=4,
                                                         num_classes=1000), 8, 0),
      'vit': ('dual_encoder', clip_b16, 8, 0),
      'text': ('dual_encoder', clip_b16, 8, 0),
      'clip': ('dual_encoder', clip_b32, 8, 0),
      'siglip': ('dual_encoder', dual_encoder.preset('siglip-b16-224'), 4, 0),
      'vlm': ('vlm', VLM_BENCH, 4, 0),
  }
  return {f: Case(f, 'bench', m, complete(m, kw), b, r) for f, (m, kw, b, r) in raw.items()}


SMOKE_EXPERIMENTS = {'unet': 'shapes_diffusion', 'unet_t2i': 'ldm_t2i_shapes',
                     'vae': 'vae_shapes', 'dit': 'dit_shapes', 'vit': 'clip_shapes',
                     'text': 'clip_shapes', 'clip': 'clip_shapes', 'siglip': 'siglip_shapes',
                     'vlm': 'vlm_mid_shapes'}


def smoke_case(family: str, experiments_dir: str) -> Case:
  """The family's model and batch in its shapes experiment with `smoke=True`."""
  config = zoo_config.load(f'{experiments_dir}/{SMOKE_EXPERIMENTS[family]}.py:smoke=True')
  model = config.model.name
  kw = complete(model, models.kwargs(config.model))
  resolution = config.data.get('resolution', 0)
  if family == 'unet_t2i':  # The denoiser sees the VAE's latents.
    resolution //= 2 ** (len(config.task.vae.block_out_channels) - 1)
  return Case(family, 'smoke', model, kw, int(config.train.batch_size), resolution)


def image_shape(case: Case) -> tuple[int, ...]:
  """HxWxC of the case's image input."""
  kw = case.kwargs
  if case.model == 'dual_encoder':
    side, channels = kw['image']['image_size'], kw['image']['in_channels']
  elif case.model == 'dit':
    side, channels = kw['input_size'], kw['in_channels']
  else:
    side, channels = kw.get('image_size') or case.resolution, kw['in_channels']
  return side, side, channels


def latent_shape(case: Case) -> tuple[int, ...]:
  """The VAE's latent hxwxZ for the case's image."""
  h, w, _ = image_shape(case)
  f = 2 ** (len(case.kwargs['block_out_channels']) - 1)
  return h // f, w // f, case.kwargs['latent_channels']


def token_count(case: Case) -> int:
  if case.model == 'dual_encoder':
    return case.kwargs['text']['max_len']
  return case.kwargs['max_len']


def vocab(case: Case) -> int:
  kw = case.kwargs['text'] if case.model == 'dual_encoder' else case.kwargs
  return kw['vocab_size']


def feature_width(case: Case) -> int:
  """The pooled width of the tower a 'features' case trains."""
  tower = case.kwargs['image' if case.family == 'vit' else 'text']
  return tower['width']


def inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  """Random inputs of the case's batch (the same arrays go to zoo and to every peer)."""
  rng = np.random.default_rng(seed)
  b, kw = case.batch, case.kwargs
  normal = lambda *shape: rng.standard_normal((b, *shape)).astype(np.float32)
  images = lambda: rng.uniform(-1, 1, (b, *image_shape(case))).astype(np.float32)
  tokens = lambda: rng.integers(1, vocab(case), (b, token_count(case))).astype(np.int32)
  objective = case.objective
  if objective == 'diffusion':
    out = {'x0': images(), 'noise': normal(*image_shape(case)),
           't': rng.integers(0, 1000, (b,)).astype(np.int32)}
    if kw.get('context_dim'):
      out['context'] = normal(CONTEXT_LEN, kw['context_dim'])
    if kw.get('num_classes'):
      out['labels'] = rng.integers(0, kw['num_classes'], (b,)).astype(np.int32)
    return out
  if objective == 'vae':
    return {'x': images(), 'e': normal(*latent_shape(case))}
  if case.family == 'vit':
    return {'images': images(), 'r': normal(feature_width(case))}
  if case.family == 'text':
    return {'tokens': tokens(), 'r': normal(feature_width(case))}
  return {'images': images(), 'tokens': tokens()}


def describe(case: Case) -> dict[str, Any]:
  """The case's inputs as text, for the report."""
  shapes = {k: list(v.shape) for k, v in inputs(case.with_batch(1)).items()}
  return {'family': case.family, 'size': case.size, 'model': case.model, 'batch': case.batch,
          'inputs (batch 1)': shapes}
