"""`zoo models`: every architecture preset and experiment model, with params and FLOPs.

Parameter counts come from `jax.eval_shape` of the init (nothing is allocated, so SD-sized
presets cost nothing); FLOPs per example are XLA's cost analysis of the lowered forward at
batch 1 (`--flops`: a trace per row, a few seconds for the large presets). Inputs: images at
the model's own size (`image_size` / `input_size`) or at the resolution below for
convolutional models, text at the model's full context.

  zoo models [--model NAME ...] [--flops] [--json OUT.json]
"""

import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import config as zoo_config
from zoo import models
from zoo.nn import layers
from zoo.nn import stack

# Resolution of the convolutional models' example input, by preset ('' = every other).
RESOLUTION = {('unet', 'sd15'): 64, ('unet', 'tiny-t2i'): 8, ('unet', 'ddpm-cifar10'): 32,
              ('unet', 'digits'): 16, ('vae', ''): 256, ('vae', 'tiny'): 64,
              ('classifier', ''): 32, ('unet', ''): 32}
CONTEXT_LEN = 77  # Cross-attention context tokens for text-conditional denoisers (SD's).
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'experiments')


def _f32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _i32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def example_call(name, kw, resolution):
  """(args, kwargs) of a batch-1 forward of model `name` with fields `kw`."""
  if name in ('unet', 'controlnet', 'dit', 'dit_controlnet'):
    res = kw.get('input_size') or resolution
    x, t = _f32(1, res, res, kw['in_channels']), _f32(1)
    extra = {}
    if kw.get('num_classes'):
      extra['labels_B'] = _i32(1)
    if kw.get('context_dim'):
      extra['context_BxLxD'] = _f32(1, CONTEXT_LEN, kw['context_dim'])
    if kw.get('pooled_dim'):
      extra['pooled_BxD'] = _f32(1, kw['pooled_dim'])
    if name == 'controlnet':
      f = 2 ** (len(kw['conditioning_embedding_out_channels']) - 1)
      return (x, t, _f32(1, res * f, res * f, kw['conditioning_channels'])), extra
    if name == 'dit_controlnet':
      return (x, t, _f32(1, res, res, kw['conditioning_channels'])), extra
    return (x, t), extra
  if name in ('vae', 'classifier'):
    return (_f32(1, resolution, resolution, kw['in_channels']),), {}
  if name == 'vit':
    return (_f32(1, kw['image_size'], kw['image_size'], kw['in_channels']),), {}
  if name == 'text':
    return (_i32(1, kw['max_len']), jax.ShapeDtypeStruct((1, kw['max_len']), jnp.bool_)), {}
  if name == 'dual_encoder':
    image, text = kw['image'], kw['text']
    return (_f32(1, image['image_size'], image['image_size'], image['in_channels']),
            _i32(1, text['max_len'])), {}
  if name == 'vlm':
    return (_f32(1, kw['image_size'], kw['image_size'], 3), _i32(1, kw['max_len'])), {}
  raise ValueError(f'no example input for model {name!r}')


def measure(name, kw, resolution=None, flops=False):
  """{'params', 'gflops'} of model `name` with fields `kw` (gflops None unless `flops`)."""
  model_config = models.config(name, **kw)
  kw = models.kwargs(model_config)
  preset_res = resolution or RESOLUTION.get((name, ''), 32)
  args, extra = example_call(name, kw, preset_res)
  module = models.build(model_config)
  shapes = jax.eval_shape(lambda a, e: module.init(jax.random.key(0), *a, **e), args, extra)
  params = nn.unbox(shapes)['params']
  out = {'params': layers.param_count(params), 'gflops': None}
  if flops:
    with stack.unrolled():  # XLA's analysis counts a scanned stack's loop body once.
      lowered = jax.jit(lambda p, a, e: module.apply({'params': p}, *a, **e)).lower(
          params, args, extra)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['gflops'] = round(float(cost.get('flops', 0.0)) / 1e9, 4)
  return out


def _experiment_models():
  """{experiment file: (model name, fields, input resolution)} of each experiment's default."""
  found = {}
  for path in sorted(glob.glob(os.path.join(EXPERIMENTS, '*.py'))):
    try:
      config = zoo_config.load(path, validate_config=False)
    except (ValueError, FileNotFoundError, KeyError):
      continue  # An experiment that needs another run to exist (its base) to build.
    resolution, kw = config.data.resolution, models.kwargs(config.model)
    if config.task.name == 'text_to_image':  # A latent denoiser runs at the latents' size.
      from zoo.tasks import text_to_image  # pylint: disable=import-outside-toplevel
      resolution = text_to_image.denoiser_resolution(config)
    if config.model.name == 'controlnet':  # Pixel hints, encoded down to the denoiser's size.
      resolution //= 2 ** (len(kw['conditioning_embedding_out_channels']) - 1)
    found[os.path.basename(path)] = (config.model.name, kw, resolution)
  return found


def rows(flops=False, names=()):
  """One dict per (model, preset), then one per experiment whose model is no preset; only
  the models `names` when given."""
  unknown = sorted(set(names) - set(models.MODELS))
  if unknown:
    raise ValueError(f'--model {unknown}: allowed: {sorted(models.MODELS)}')
  experiments = {e: v for e, v in _experiment_models().items() if not names or v[0] in names}
  out = []
  for name in sorted(names or models.MODELS):
    for preset in _preset_names(name):
      fields = models.kwargs(models.config(name, preset))
      using = sorted(e for e, (n, kw, _) in experiments.items() if n == name and kw == fields)
      res = RESOLUTION.get((name, preset), RESOLUTION.get((name, ''), 32))
      out.append({'model': name, 'preset': preset, 'experiments': using,
                  **measure(name, fields, res, flops)})
  claimed = {e for r in out for e in r['experiments']}
  for exp, (name, fields, res) in sorted(experiments.items()):
    if exp not in claimed:
      out.append({'model': name, 'preset': '', 'experiments': [exp],
                  **measure(name, fields, res, flops)})
  return out


def _preset_names(name):
  """The preset names of model `name` (ControlNets copy their base's fields: none of their own)."""
  if name in ('controlnet', 'dit_controlnet'):
    return []
  return sorted(getattr(models, name).PRESETS)


def markdown(table):
  """The table as Markdown (FLOPs column only when measured)."""
  with_flops = any(r['gflops'] is not None for r in table)
  head = '| model | preset | params | ' + ('GFLOPs / example | ' if with_flops else '') + \
      'experiments |'
  lines = [head, '|---|---|---|' + ('---|' if with_flops else '') + '---|']
  for r in table:
    cells = [r['model'], r['preset'] or '—', f"{r['params']:,}"]
    if with_flops:
      cells.append('—' if r['gflops'] is None else f"{r['gflops']:g}")
    cells.append(', '.join(f'`{e}`' for e in r['experiments']) or '—')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
