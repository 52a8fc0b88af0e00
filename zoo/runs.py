"""A finished (or running) workdir as a user sees it: its config, its latest state, its outputs."""

import os

import jax
import numpy as np

import data as data_lib
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import diffusion
from zoo import evals
from zoo import metrics
from zoo import sharding
from zoo import train


def load(workdir, step=None):
  """(config, setup, weights) of the checkpoint at `step` (default latest) in `workdir`.

  The weights are the state's {step, params, ema_params} (no optimizer state: see
  `checkpoint.load_weights`), laid out over this machine's devices (all on the data axis),
  whatever mesh the run trained on.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a zoo workdir?')
  with open(path) as f:
    config = zoo_config.from_json(f.read())
  config.mesh = zoo_config.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  if config.get('distributed', None) is not None:
    config.distributed.coordinator_address = ''
  zoo_config.validate(config)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint in {directory}')
  key = zoo_config.to_json(config)
  if key not in _SETUPS:
    spec = data_lib.get_dataset(config.data, split=config.data.train_split, seed=0,
                                global_batch_size=config.train.batch_size).spec()
    _SETUPS[key] = train.setup(config, spec)
  s = _SETUPS[key]
  return config, s, checkpoint.load_weights(directory, s.abstract_state, step)


# One Setup per config in a process: a notebook sampling a run again and again reuses the same
# task object, so the jitted samplers (keyed on it) compile once per setting.
_SETUPS = {}
CONTROL_TASKS = ('controlnet', 'text_controlnet')


def evaluate(workdir, step=None, overrides=()):
  """Runs the run's evaluators on its checkpoint; writes `workdir/eval_metrics.jsonl`.

  `overrides` ('--config.evals.NAME.KEY=VALUE', as `zoo train` takes them) change the
  evaluators only (another split, more samples); results measured under overrides are returned
  but not appended to eval_metrics.jsonl, which keeps the experiment's own evaluations, and
  their PNGs go under `workdir/eval_overrides/` instead of beside the training ones.
  """
  config, s, state = load(workdir, step)
  for item in overrides:
    key, sep, value = item.removeprefix('--').removeprefix('config.').partition('=')
    if not sep or not key.startswith('evals.'):
      raise ValueError(f'zoo eval takes --config.evals.NAME.KEY=VALUE overrides only (the model '
                       f'and data are the run\'s), not {item!r}')
    zoo_config.override(config, key, value)
  if overrides:
    zoo_config.validate(config)
  step = int(np.asarray(state['step']))
  results = {}
  outputs = os.path.join(workdir, 'eval_overrides') if overrides else workdir
  for name, evaluator in evals.build(config, s.task, outputs).items():
    results |= {f'{name}/{k}': v for k, v in evaluator.run(state, step).items()}
  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0 and not overrides,
                                filename='eval_metrics.jsonl')
  writer.write(step, results)
  writer.close()
  return results


def sample(workdir, out, *, num=16, labels=None, sampler=None, steps=None,
           guidance_scale=None, seed=0, use_ema=True, upscale=4, prompts=None,
           negative_prompt=None, lora=None):
  """Generates `num` images from a run and writes a PNG grid to `out`.

  Class-conditional runs cycle through `labels` (default: every class), one column per
  class; text-to-image runs draw `num` images per prompt, one row per prompt. `lora`: a LoRA
  .safetensors file (`zoo export --lora`, or a diffusers U-Net LoRA) merged into the params.
  """
  config, s, state = load(workdir)
  params = state['ema_params' if use_ema else 'params']
  if lora:
    from zoo.nn import lora as lora_lib  # Only for runs sampled with adapters.
    adapters, rank, alpha = lora_lib.load(lora, params)
    params = lora_lib.merge(params, adapters, alpha / rank)
  rng = jax.random.PRNGKey(seed)
  kwargs = dict(sampler=sampler, steps=steps, guidance_scale=guidance_scale)
  if 'sample' not in s.task.predict:
    raise ValueError(f'the {config.task.name!r} run in {workdir} does not generate images')
  conditioning = s.task.conditioning
  if conditioning == 'control':
    raise ValueError(f'{workdir} is a ControlNet run: pass --control {s.task.control}:HINT.png')
  if conditioning != 'text' and (prompts or negative_prompt is not None):
    raise ValueError(f'this model is not text-conditional ({conditioning}): --prompt and '
                     '--negative-prompt do not apply')
  if conditioning == 'text':
    if labels:
      raise ValueError('this model is text-conditional: use --prompt, not --label')
    if not prompts:
      raise ValueError('this model is text-conditional: pass --prompt "..." (repeatable)')
    batch = [p for p in prompts for _ in range(num)]
    negatives = None if negative_prompt is None else [negative_prompt] * len(batch)
    images = s.task.predict['sample'](params, rng, prompts=batch, negative_prompts=negatives,
                                      **kwargs)
    ncols = num
  elif conditioning == 'class':
    classes = labels if labels else list(range(config.model.num_classes))
    label_ids = np.resize(np.asarray(classes, np.int32), num)
    images = s.task.predict['sample'](params, rng, label_ids, **kwargs)
    ncols = min(len(classes), num)  # One column per requested class.
  else:
    if labels:
      raise ValueError('this model is unconditional: --label does not apply')
    images = s.task.predict['sample'](params, rng, num=num, **kwargs)
    ncols = None
  images = sharding.host_gather(images)
  if jax.process_index() == 0:
    metrics.save_image_grid(images, out, ncols=ncols, upscale=upscale)
  return images


def read_png(path, channels, what):
  """A PNG (or JPEG) as HxWxC float32 in [0, 1] with the run's channel count."""
  from PIL import Image
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} {path!r} not found')
  with Image.open(path) as img:
    return np.asarray(img.convert('RGB' if channels == 3 else 'L'), np.float32).reshape(
        img.size[1], img.size[0], channels) / 255.0


def inpaint(workdir, out, image, *, mask=None, pad=0, mode='inpaint', num=4, labels=None,
            prompts=None, negative_prompt=None, method=None, sampler=None, steps=None,
            guidance_scale=None, seed=0, use_ema=True, upscale=4, jump_length=10,
            jump_n_sample=10):
  """Inpaints `image` (a PNG) where `mask` (a PNG, white = generate) is set, or outpaints it
  (mode='outpaint': the image grows by `pad` pixels per side to the model's resolution).

  Writes one row to `out`: the known pixels (the rest mid-grey), then `num` results that keep
  them exactly. Class-conditional runs take one label per result (`labels` cycle), text runs
  one prompt per result (`prompts` cycle). `method`: 'repaint' (the default) or 'blend' for
  plain diffusion runs; an inpainting-trained run (experiments/inpaint_shapes.py) uses its own
  mask input ('model').
  """
  if mode not in ('inpaint', 'outpaint'):
    raise ValueError(f"mode={mode!r} must be 'inpaint' or 'outpaint'")
  config, s, state = load(workdir)
  if 'inpaint' not in s.task.predict:
    raise ValueError(f'the {config.task.name!r} run in {workdir} does not generate images')
  h, w, c = s.task.pixel_shape
  known = read_png(image, c, '--image')
  if mode == 'outpaint':
    if mask is not None:
      raise ValueError('--mode outpaint makes its own mask from --pad: drop --mask')
    known, mask_HxWx1 = (np.asarray(a) for a in diffusion.outpaint_canvas(known, pad, h))
  else:
    if mask is None:
      raise ValueError('--mode inpaint needs --mask MASK.png (white = generate, black = keep)')
    if known.shape != (h, w, c):
      raise ValueError(f'--image is {known.shape[1]}x{known.shape[0]}; the model generates '
                       f'{w}x{h}')
    mask_HxWx1 = diffusion.check_mask(read_png(mask, 1, '--mask'), (h, w, c))
  label_ids, text = None, {}
  if s.task.conditioning == 'class':
    if not labels:
      raise ValueError('this model is class-conditional: pass --label N (repeatable)')
    label_ids = np.resize(np.asarray(labels, np.int32), num)
  elif labels:
    raise ValueError(f'this model is not class-conditional ({s.task.conditioning}): '
                     '--label does not apply')
  if s.task.conditioning == 'text':
    if not prompts:
      raise ValueError('this model is text-conditional: pass --prompt "..." (repeatable)')
    text['prompts'] = [prompts[i % len(prompts)] for i in range(num)]
    if negative_prompt is not None:
      text['negative_prompts'] = [negative_prompt] * num
  elif prompts or negative_prompt is not None:
    raise ValueError(f'this model is not text-conditional ({s.task.conditioning}): --prompt and '
                     '--negative-prompt do not apply')
  params = state['ema_params' if use_ema else 'params']
  results = s.task.predict['inpaint'](
      params, jax.random.PRNGKey(seed), np.repeat(known[None], num, 0), mask_HxWx1, label_ids,
      **text, **({} if method is None else {'mode': method}), sampler=sampler, steps=steps,
      guidance_scale=guidance_scale,
      jump_length=jump_length, jump_n_sample=jump_n_sample)
  shown = np.where(mask_HxWx1 > 0, 0.5, known)[None]
  if jax.process_index() == 0:
    metrics.save_image_grid(np.concatenate([shown, results]), out, ncols=num + 1,
                            upscale=upscale)
  return results


def parse_control(spec):
  """'KIND:PATH.png' or 'KIND:PATH.png@WORKDIR' -> (kind, path, workdir or None)."""
  kind, sep, rest = spec.partition(':')
  if not sep or not kind or not rest:
    raise ValueError(f'--control {spec!r} must be KIND:PATH.png[@WORKDIR], e.g. depth:depth.png')
  path, _, workdir = rest.partition('@')
  return kind, path, workdir or None


def control(workdir, out, controls, *, scales=(), num=4, labels=None, prompts=None,
            negative_prompt=None, sampler=None, steps=None, guidance_scale=None, seed=0,
            use_ema=True, upscale=4):
  """Samples a ControlNet run under control images; writes one row: the hints, then `num`
  results (text ControlNets: one per prompt, or `num` of a single prompt).

  `controls`: (kind, PNG path, workdir or None) each; None means `workdir`, whose own control
  kind it must be; other kinds name their own ControlNet run over the same base, and every
  control's residuals add up. `scales`: one conditioning scale for all, or one per control
  (default: each run's `conditioning_scale`).
  """
  from data import conditions
  if not controls:
    raise ValueError('pass at least one --control KIND:PATH.png')
  if len(scales) not in (0, 1, len(controls)):
    raise ValueError(f'{len(scales)} --control-scale values for {len(controls)} controls: give '
                     'one for all or one per control')
  text = getattr(load(workdir)[1].task, 'conditioning', None) == 'text'
  if text:
    if not prompts or labels:
      raise ValueError('this ControlNet steers a text-to-image model: pass --prompt (no --label)')
    num = num if len(prompts) == 1 else len(prompts)
    prompts = list(prompts) * num if len(prompts) == 1 else list(prompts)
  elif prompts:
    raise ValueError('--prompt applies to text ControlNets (experiments/control_t2i_shapes.py)')
  runs, hints = {}, []
  for kind, path, where in controls:
    where = where or workdir
    if where not in runs:
      runs[where] = load(where)
    config, s, _ = runs[where]
    if config.task.name not in CONTROL_TASKS:
      raise ValueError(f'{where} is a {config.task.name!r} run; --control needs ControlNet runs '
                       '(experiments/control_shapes.py, control_t2i_shapes.py)')
    conditions.get(kind)
    if kind != s.task.control:
      raise ValueError(f'--control {kind}:{path}: the run {where} was trained on '
                       f'{s.task.control!r} hints; name the {kind!r} run as {kind}:{path}@WORKDIR')
    hint = conditions.check(kind, read_png(path, conditions.get(kind).channels, '--control'),
                            s.task.hint_shape[0])
    hints.append(np.repeat(hint[None], num, 0))
  key = 'ema_params' if use_ema else 'params'
  scales = list(scales) * len(controls) if len(scales) == 1 else list(scales)
  branches = []
  for (_, _, where), hint, scale in zip(controls, hints, scales or [None] * len(controls)):
    _, s, state = runs[where or workdir]
    branches.append((s.task, state[key], hint,
                     s.task.cfg.conditioning_scale if scale is None else scale))
  (task, params, first_hints, first_scale), *others = branches
  label_ids, extra = None, {}
  if text:
    extra = dict(prompts=prompts, negative_prompts=None if negative_prompt is None else
                 [negative_prompt] * num)
  elif task.num_classes:
    if not labels:
      raise ValueError('this model is class-conditional: pass --label N (repeatable)')
    label_ids = np.resize(np.asarray(labels, np.int32), num)
  elif labels:
    raise ValueError('this model is unconditional: --label does not apply')
  images = task.predict['sample'](
      params, jax.random.PRNGKey(seed), label_ids, hints=first_hints,
      conditioning_scale=first_scale, others=tuple(others), sampler=sampler, steps=steps,
      guidance_scale=guidance_scale, **extra)
  images = np.asarray(sharding.host_gather(images))
  shown = [conditions.to_uint8(h[0]) / 255.0 for h in hints]
  if jax.process_index() == 0:
    metrics.save_image_grid(np.concatenate([np.stack(shown), images]), out,
                            ncols=len(shown) + num, upscale=upscale)
  return images
