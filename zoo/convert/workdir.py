"""`zoo convert` / `zoo export`: public checkpoints <-> zoo workdirs.

A converted workdir is an ordinary zoo run at step 0: `config.json` (an experiment whose
`config.model` is the checkpoint's), `checkpoints/0` (params, EMA params = params, a fresh
optimizer state) and `convert.json` (kind, source, file format). `zoo sample`, `zoo eval`,
`zoo index` / `zoo search` read it like any run; `zoo train --config W/config.json
--config.init_from=W --workdir NEW` fine-tunes it. `export` writes a run's params (EMA by
default) back in the source's naming, so the reference library loads them.
"""

import json
import logging
import os

import jax
import numpy as np

import data as data_lib
from data import text_tokenizers
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import models
from zoo import train
from zoo.convert import hub
from zoo.convert import pipeline
from zoo.nn import lora
from zoo import files

log = logging.getLogger('zoo')

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'experiments')
# The experiment a kind's run is written as, unless `--config` names another.
TEMPLATES = {
    'diffusers-vae': 'vae_shapes.py', 'diffusers-unet': 'shapes_diffusion.py',
    'diffusers-controlnet': 'control_shapes.py', 'dit': 'shapes_diffusion.py:model=dit',
    'clip': 'clip_shapes.py', 'siglip': 'siglip_shapes.py',
}
# task name -> (kinds it holds, where the converted params go in the task's params)
TASKS = {'diffusion': (('diffusers-unet', 'dit'), ''), 'vae': (('diffusers-vae',), 'vae'),
         'controlnet': (('diffusers-controlnet',), 'controlnet'),
         'text_controlnet': (('diffusers-controlnet',), 'controlnet'),
         'contrastive': (('clip', 'siglip'), ''), 'text_to_image': (('diffusers-unet', 'dit'),
                                                                    'denoiser')}
# A ControlNet over a text_to_image run (an SD pipeline converted with --from diffusers-sd).
TEXT_CONTROL_TEMPLATE = 'control_t2i_shapes.py'
TOKENIZER_FILES = {'clip': ('tokenizer.json', 'merges.txt'), 'siglip': ('spiece.model',)}


def _experiment(kind, experiment, base=None, converted=None):
  template = TEMPLATES[kind]
  if kind == 'diffusers-controlnet' and base and not experiment:
    from zoo.tasks import diffusion  # A task module; convert needs it for ControlNets only.
    if diffusion.base_run_config(base).task.name == 'text_to_image':
      # A 3-channel hint is an image (SD's canny / depth / seg ControlNets): 'seg' here.
      control = 'seg' if converted.kwargs.get('conditioning_channels', 3) == 3 else 'depth'
      template = (f'{TEXT_CONTROL_TEMPLATE}:smoke=True,base={os.path.abspath(base)},'
                  f'control={control}')
  spec = experiment or os.path.join(EXPERIMENTS, template)
  return spec, zoo_config.load(spec, validate_config=False)


def run_config(kind, converted, experiment=None, overrides=(), base=None, source=None):
  """The validated experiment config of a converted checkpoint (before anything is written)."""
  spec, config = _experiment(kind, experiment, base, converted)
  task = config.task.name
  if task not in TASKS or kind not in TASKS[task][0]:
    allowed = sorted(t for t, (kinds, _) in TASKS.items() if kind in kinds)
    raise ValueError(f'{spec} is a {task!r} experiment; --from {kind} needs one of task '
                     f'{allowed}')
  config.model = models.config(converted.model, **converted.kwargs)
  config.init_from = ''
  if kind == 'diffusers-controlnet':
    if not base:
      raise ValueError('--from diffusers-controlnet needs --base WORKDIR: the diffusion run '
                       '(converted or trained) whose UNet the ControlNet steers')
    config.task.base_from = base
    config.model = models.config('controlnet', **_on_base(converted.kwargs, base))
  if kind in TOKENIZER_FILES:
    config.data.resolution = converted.kwargs['image']['image_size']
    _tokenizer(config, kind, source)
  for item in overrides:
    key, _, value = item.partition('=')
    zoo_config.override(config, key.removeprefix('--').removeprefix('config.'), value)
  zoo_config.validate(config)
  return config


# ControlNetModel config fields that must equal the base UNet's (the rest it does not store).
_SHARED = ('in_channels', 'block_out_channels', 'layers_per_block', 'down_block_types',
           'norm_num_groups', 'norm_eps', 'flip_sin_to_cos', 'freq_shift', 'downsample_padding',
           'num_classes', 'context_dim', 'mid_block_type', 'mid_block_layers',
           'attention_head_dim')


def _on_base(kwargs, base):
  """A converted ControlNet's fields: the base run's UNet fields plus its own two."""
  from zoo.tasks import diffusion  # A task module; convert needs it for ControlNets only.
  base_config = diffusion.base_run_config(base)
  if base_config.model.name != 'unet':
    raise ValueError(f'--base {base} trained a {base_config.model.name!r}; a diffusers '
                     'ControlNet steers a unet')
  theirs = models.fields('unet') | models.kwargs(base_config.model)
  differ = [f'{k}: controlnet {kwargs[k]!r} vs base {theirs[k]!r}' for k in _SHARED
            if k in kwargs and kwargs[k] != theirs[k]]
  if differ:
    raise ValueError(f'the ControlNet does not mirror the UNet of --base {base}:\n  '
                     + '\n  '.join(differ))
  return theirs | {k: kwargs[k] for k in ('conditioning_channels',
                                          'conditioning_embedding_out_channels')}


def _tokenizer(config, kind, source):
  """Point `data.text` at the tokenizer files beside the weights, when there are any."""
  if source and os.path.isdir(source) and any(
      os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES[kind]):
    config.data.text.tokenizer = kind
    config.data.text.tokenizer_path = os.path.abspath(source)
    config.data.text.max_len = config.model.text.max_len
  else:
    log.warning('%s holds no tokenizer (%s); the run keeps its experiment\'s %r', source,
                ', '.join(TOKENIZER_FILES[kind]), config.data.text.tokenizer)


def convert(kind, source, workdir, *, experiment=None, overrides=(), base=None, num_heads=None):
  """Writes the checkpoint at `source` as a zoo run into `workdir`; returns its config."""
  if kind == 'diffusers-sd':
    if experiment or base or num_heads:
      raise ValueError('--from diffusers-sd writes its own text_to_image run from the pipeline '
                       'folder: --config / --base / --num-heads do not apply (change fields '
                       'with --config.KEY=VALUE)')
    return pipeline.convert(source, workdir, overrides)
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileExistsError(f'{workdir} already holds checkpoints; convert into a new directory')
  converted = hub.read(kind, source, num_heads=num_heads)
  config = run_config(kind, converted, experiment, overrides, base, source)
  s = _setup(config)
  where = TASKS[config.task.name][1]
  abstract = s.abstract_state['params']
  checkpoint.check_compatible(converted.params, abstract[where] if where else abstract,
                              f'{source} (as {kind})')
  pretrained = getattr(s.task, 'pretrained', {})
  # Parts neither converted nor pretrained (a VAE run's discriminator) start from the init.
  if where and set(abstract) - {where} - set(pretrained):
    params = jax.device_get(s.init(jax.random.PRNGKey(config.seed))['params'])
  else:
    params = {}
  for key, src in pretrained.items():
    params = {**params, key: jax.device_get(checkpoint.load_params(
        os.path.join(src.workdir, 'checkpoints'), abstract[key], use_ema=src.use_ema,
        subtree=src.subtree, ignore=src.ignore))}
  params = {**params, where: converted.params} if where else converted.params
  write_run(config, params, workdir, s, f'{source} (as {kind})')
  with files.atomic_open(os.path.join(workdir, 'convert.json')) as f:
    json.dump({'kind': kind, 'format': converted.format, 'source': os.path.abspath(source)}, f,
              indent=2)
  return config


def _setup(config):
  spec = data_lib.get_dataset(config.data, split=config.data.train_split, seed=0,
                              global_batch_size=config.train.batch_size).spec()
  return train.setup(config, spec)


def write_run(config, params, workdir, s=None, what='the converted params'):
  """Writes `params` (all of the task's) as a run at step 0: config.json, tokenizer, checkpoint.

  EMA params = params, and a fresh optimizer state.
  """
  s = s or _setup(config)
  abstract = s.abstract_state['params']
  checkpoint.check_compatible(params, abstract, what)
  # Saved from host memory: Orbax lays the arrays out on restore, and writing numpy arrays
  # compiles nothing (sharded device arrays cost a program per shape on a many-device host).
  params = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, abstract)
  opt_state = jax.device_get(jax.jit(s.tx.init)(params))
  state = {'step': np.zeros((), np.int32), 'params': params, 'opt_state': opt_state,
           'ema_params': params}
  os.makedirs(workdir, exist_ok=True)
  files.write_text(os.path.join(workdir, 'config.json'), zoo_config.to_json(config))
  if 'text' in config.data:
    text_tokenizers.save_to_workdir(workdir, config.data.text)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  ckpt.save(0, state, {'next_batch': 0})
  ckpt.close()


def kind_of(config, workdir):
  """(kind, default file format) of a run: from its convert.json, else from its model."""
  path = os.path.join(workdir, 'convert.json')
  if os.path.isfile(path):
    with open(path) as f:
      record = json.load(f)
    return record['kind'], record['format']
  name = config.model.name
  if name == 'dual_encoder':
    kind = config.model.kind
  else:
    kind = {'vae': 'diffusers-vae', 'unet': 'diffusers-unet', 'dit': 'dit',
            'controlnet': 'diffusers-controlnet'}.get(name)
  if kind not in hub.KINDS:
    raise ValueError(f'{workdir} is a {name!r} run ({config.task.name}); zoo export writes '
                     f'{sorted(hub.KINDS)}')
  return kind, hub.KINDS[kind][1]


def export(workdir, out, *, fmt=None, use_ema=True, step=None, lora_only=False):
  """Writes a run's params as safetensors (+ config.json) in its kind's public naming.

  A LoRA run exports its merged model, or with `lora_only` its adapters alone (one
  .safetensors file; the diffusers / PEFT naming for U-Nets, see zoo/nn/lora.py).
  """
  from zoo import runs  # A run's loader builds on train / data; imported when needed.
  config, s, state = runs.load(workdir, step)
  params = jax.device_get(state['ema_params' if use_ema else 'params'])
  if lora_only:
    if 'lora' not in config:
      raise ValueError(f'--lora: {workdir} is not a LoRA run (no config.lora)')
    if not out.endswith('.safetensors'):
      raise ValueError(f'--out {out}: LoRA adapters go into one .safetensors file')
    lora.save(out, params['lora'], rank=config.lora.rank, alpha=config.lora.alpha,
              naming='diffusers' if config.model.name == 'unet' else 'zoo')
    return [out]
  if 'lora' in config:
    params = s.task.merged_params(params)
  kind, default_fmt = kind_of(config, workdir)
  if kind == 'diffusers-sd':
    if fmt not in (None, 'diffusers'):
      raise ValueError(f'--format {fmt!r}: a diffusers-sd run exports as a diffusers pipeline')
    return pipeline.export(config, params, workdir, out)
  fmt = fmt or default_fmt
  allowed = {'dit': ('facebook', 'diffusers')}.get(kind, (hub.KINDS[kind][1],))
  if fmt not in allowed:
    raise ValueError(f'--format {fmt!r}: a {kind} run exports as {" or ".join(allowed)}')
  where = TASKS.get(config.task.name, ((), ''))[1]
  params = params[where] if where else params
  paths = hub.write(kind, models.kwargs(config.model), params, out, fmt)
  if kind in TOKENIZER_FILES and os.path.isdir(os.path.join(workdir, 'tokenizer')):
    for name in os.listdir(os.path.join(workdir, 'tokenizer')):
      with open(os.path.join(workdir, 'tokenizer', name), 'rb') as src:
        blob = src.read()
      with files.atomic_open(os.path.join(out, name), 'wb') as dst:
        dst.write(blob)
      paths.append(os.path.join(out, name))
  return paths
