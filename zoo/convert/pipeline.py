"""Stable Diffusion pipelines <-> zoo text-to-image runs (`zoo convert --from diffusers-sd`).

A `StableDiffusionPipeline.save_pretrained` folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) becomes one latent `text_to_image` run: params
{'denoiser' (UNet2DConditionModel), 'text_encoder' (CLIPTextModel), 'vae' (AutoencoderKL)}, the
tokenizer in the workdir, and the pipeline's conventions in the config: prompts padded to the
tokenizer's model_max_length with its pad token and attended in full (`task.attend_padding`),
the scheduler's β schedule, prediction type and DDIM grid (`timestep_spacing`, `steps_offset`,
`set_alpha_to_one`), and the pipeline's defaults (DDIM, 50 steps, guidance 7.5). `zoo sample
--prompt` then draws what `StableDiffusionPipeline` with a DDIMScheduler draws from the same
initial latents; `export` writes the folder back (scheduler as a DDIMScheduler).

Refused by name: other pipelines (SDXL's second text encoder, img2img-only classes), scheduler
β schedules other than SD's scaled_linear from 0.00085 to 0.012, thresholding, zero-SNR
rescaling.
"""

import json
import os

import numpy as np
import safetensors.numpy

from zoo import config as zoo_config
from zoo import models
from zoo.convert import hub
from zoo.convert import transformers as hf_convert
from zoo import files

TEMPLATE = 'ldm_t2i_shapes.py:smoke=True'
PIPELINES = ('StableDiffusionPipeline',)
# The β schedules the zoo reproduces (name -> beta_start, beta_end), and scheduler fields that
# must keep their default.
_SD_BETAS = {'scaled_linear': (0.00085, 0.012)}
_PREDICTIONS = {'epsilon': 'epsilon', 'v_prediction': 'v', 'sample': 'x0'}
_REFUSED = {'trained_betas': None, 'thresholding': False, 'rescale_betas_zero_snr': False}
# The pipeline's own sampling defaults (StableDiffusionPipeline.__call__).
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5
SPECIALS = dict(bos_token='<|startoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>')


def _json(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found (a StableDiffusionPipeline.save_pretrained folder '
                            'holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and '
                            'scheduler/)')
  with open(path) as f:
    return json.load(f)


def _token(value):
  return value.get('content', '') if isinstance(value, dict) else (value or '')


def scheduler_fields(cfg, where):
  """Task fields of a diffusers scheduler config (DDIM / PNDM / DDPM / Euler ... all share them)."""
  for key, allowed in _REFUSED.items():
    if cfg.get(key, allowed) != allowed:
      raise ValueError(f'{where}: {key}={cfg[key]!r} has no zoo equivalent (allowed: {allowed!r})')
  name = cfg.get('beta_schedule', 'linear')
  ends = (cfg.get('beta_start', 0.0001), cfg.get('beta_end', 0.02))
  if name not in _SD_BETAS or not np.allclose(ends, _SD_BETAS[name], rtol=0, atol=1e-9):
    raise ValueError(f'{where}: beta_schedule={name!r} from {ends[0]} to {ends[1]}; the zoo '
                     f'reproduces {_SD_BETAS}')
  prediction = cfg.get('prediction_type', 'epsilon')
  if prediction not in _PREDICTIONS:
    raise ValueError(f'{where}: prediction_type={prediction!r}; allowed: {sorted(_PREDICTIONS)}')
  return dict(schedule=name, num_timesteps=int(cfg.get('num_train_timesteps', 1000)),
              prediction_type=_PREDICTIONS[prediction],
              timestep_spacing=cfg.get('timestep_spacing', 'leading'),
              steps_offset=int(cfg.get('steps_offset', 0)),
              set_alpha_to_one=bool(cfg.get('set_alpha_to_one', True)))


def _tokenizer_fields(folder, max_positions):
  """(pad token, max_len) the pipeline's tokenizer pads prompts with and to."""
  settings = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      settings |= {k: v for k, v in _json(path).items() if v is not None}
  pad = _token(settings.get('pad_token')) or SPECIALS['eos_token']
  max_len = int(settings.get('model_max_length', max_positions))
  if not 2 <= max_len <= max_positions:
    max_len = max_positions  # transformers writes 1e30 when a tokenizer has no limit.
  return pad, max_len


def read(folder):
  """{'unet', 'vae': hub.Converted, 'sample_size' (the UNet's latent size), 'text': (kwargs,
  params), 'tokenizer': (dir, pad, max_len), 'scheduler': task fields} of a pipeline folder."""
  index = _json(os.path.join(folder, 'model_index.json'))
  if index.get('_class_name') not in PIPELINES:
    raise ValueError(f'{folder}/model_index.json describes a {index.get("_class_name")!r}; '
                     f'--from diffusers-sd reads {PIPELINES}')
  text_dir = os.path.join(folder, 'text_encoder')
  state_dict, text_cfg = hub.read_state_dict(text_dir)
  text_cfg = hub._need_config(text_cfg, text_dir, 'diffusers-sd', ('clip_text_model',))
  if any(k.startswith('text_projection') for k in state_dict):
    raise ValueError(f'{text_dir}: a CLIPTextModelWithProjection; SD 1.x / 2.x condition on the '
                     'token features of a CLIPTextModel')
  text_kwargs = hf_convert.clip_text_config(text_cfg, f'{text_dir}/config.json')
  text_params = hf_convert.from_hf_clip_text(
      {k: np.asarray(v, np.float32) for k, v in state_dict.items()})
  tok_dir = os.path.join(folder, 'tokenizer')
  pad, max_len = _tokenizer_fields(tok_dir, text_kwargs['max_len'])
  sched_dir = os.path.join(folder, 'scheduler')
  scheduler = scheduler_fields(_json(os.path.join(sched_dir, 'scheduler_config.json')),
                               f'{sched_dir}/scheduler_config.json')
  sample_size = _json(os.path.join(folder, 'unet', 'config.json')).get('sample_size') or 64
  return dict(unet=hub.read('diffusers-unet', os.path.join(folder, 'unet')),
              sample_size=int(np.max(sample_size)),
              vae=hub.read('diffusers-vae', os.path.join(folder, 'vae')),
              text=(text_kwargs, text_params), tokenizer=(tok_dir, pad, max_len),
              scheduler=scheduler)


def run_config(parts, workdir, overrides=()):
  """The text_to_image experiment of a converted pipeline, validated."""
  from zoo.convert import workdir as convert_workdir  # It imports this module's users.
  config = zoo_config.load(os.path.join(convert_workdir.EXPERIMENTS, TEMPLATE),
                           validate_config=False)
  unet, vae = parts['unet'], parts['vae']
  if unet.kwargs.get('context_dim', 0) != parts['text'][0]['width']:
    raise ValueError(f'unet cross_attention_dim={unet.kwargs.get("context_dim")} != text_encoder '
                     f'hidden_size={parts["text"][0]["width"]}')
  workdir = os.path.abspath(workdir)
  config.model = models.config('unet', **unet.kwargs)
  tok_dir, pad, max_len = parts['tokenizer']
  config.data.text = zoo_config.ConfigDict(dict(  # `convert` points it at the workdir's copy.
      caption_key='captions', tokenizer='clip', tokenizer_path=os.path.abspath(tok_dir),
      max_len=max_len, pad_token=pad))
  factor = 2 ** (len(vae.kwargs['block_out_channels']) - 1)
  config.data.resolution = parts['sample_size'] * factor
  task = config.task
  task.update(parts['scheduler'])
  task.update(dict(sampler='ddim', sample_steps=DEFAULT_STEPS, eta=0.0,
                   guidance_scale=DEFAULT_GUIDANCE, clip_x0=False, caption_dropout=0.1,
                   negative_prompt='', attend_padding=True, latent_key=''))
  task.text_encoder = models.config('text', **parts['text'][0])
  task.text_encoder_from = task.vae_from = workdir  # Its own checkpoint holds both.
  task.train_text_encoder = False
  task.vae = models.config('vae', **vae.kwargs)
  config.evals = zoo_config.ConfigDict()
  config.init_from = ''
  for item in overrides:
    key, _, value = item.partition('=')
    zoo_config.override(config, key.removeprefix('--').removeprefix('config.'), value)
  zoo_config.validate(config)
  return config


def convert(folder, workdir, overrides=()):
  """Writes the pipeline at `folder` as a text_to_image run into `workdir`; returns its config."""
  from data import text_tokenizers
  from zoo.convert import workdir as convert_workdir
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileExistsError(f'{workdir} already holds checkpoints; convert into a new directory')
  parts = read(folder)
  config = run_config(parts, workdir, overrides)
  tok_dir, pad, _ = parts['tokenizer']
  tokenizer = text_tokenizers.get('clip', path=tok_dir, pad_token=pad)
  if tokenizer.vocab_size > parts['text'][0]['vocab_size']:
    raise ValueError(f'{tok_dir} has {tokenizer.vocab_size} tokens; the text encoder embeds '
                     f'{parts["text"][0]["vocab_size"]}')
  params = {'denoiser': parts['unet'].params, 'text_encoder': parts['text'][1],
            'vae': parts['vae'].params}
  os.makedirs(workdir, exist_ok=True)
  config.data.text.tokenizer_path = os.path.join(os.path.abspath(workdir),
                                                 text_tokenizers.WORKDIR_SUBDIR)
  text_tokenizers.save(tokenizer, config.data.text.tokenizer_path)
  convert_workdir.write_run(config, params, workdir, what=f'{folder} (as diffusers-sd)')
  with files.atomic_open(os.path.join(workdir, 'convert.json')) as f:
    json.dump({'kind': 'diffusers-sd', 'format': 'diffusers',
               'source': os.path.abspath(folder)}, f, indent=2)
  return config


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with files.atomic_open(path) as f:
    json.dump(obj, f, indent=2)
  return path


def export(config, params, workdir, out):
  """Writes a converted (or fine-tuned) SD run as a StableDiffusionPipeline folder at `out`."""
  task = config.task
  paths = hub.write('diffusers-unet', models.kwargs(config.model), params['denoiser'],
                    os.path.join(out, 'unet'), 'diffusers')
  paths += hub.write('diffusers-vae', models.kwargs(task.vae), params['vae'],
                     os.path.join(out, 'vae'), 'diffusers')
  text_kwargs = models.fields('text') | models.kwargs(task.text_encoder)
  text_dir = os.path.join(out, 'text_encoder')
  paths.append(_write_json(os.path.join(text_dir, 'config.json'), dict(
      model_type='clip_text_model', architectures=['CLIPTextModel'],
      **hf_convert.hf_text_config(text_kwargs))))
  flat = {k: np.asarray(v, np.float32, order='C')
          for k, v in hf_convert.to_hf_clip_text(params['text_encoder']).items()}
  with files.atomic_path(os.path.join(text_dir, 'model.safetensors')) as tmp:
    safetensors.numpy.save_file(flat, tmp, metadata={'format': 'pt'})
  paths.append(os.path.join(text_dir, 'model.safetensors'))
  tok_src, tok_out = os.path.join(workdir, 'tokenizer'), os.path.join(out, 'tokenizer')
  os.makedirs(tok_out, exist_ok=True)
  for name in sorted(os.listdir(tok_src)):
    with open(os.path.join(tok_src, name), 'rb') as src, files.atomic_open(
        os.path.join(tok_out, name), 'wb') as dst:
      dst.write(src.read())
    paths.append(os.path.join(tok_out, name))
  paths.append(_write_json(os.path.join(out, 'tokenizer', 'tokenizer_config.json'), dict(
      tokenizer_class='CLIPTokenizer', model_max_length=config.data.text.max_len,
      pad_token=config.data.text.get('pad_token', '') or '!', **SPECIALS)))
  paths.append(_write_json(os.path.join(out, 'scheduler', 'scheduler_config.json'), dict(
      _class_name='DDIMScheduler', num_train_timesteps=task.num_timesteps,
      beta_schedule=task.schedule, beta_start=_SD_BETAS[task.schedule][0],
      beta_end=_SD_BETAS[task.schedule][1], clip_sample=False,
      prediction_type={v: k for k, v in _PREDICTIONS.items()}[task.prediction_type],
      timestep_spacing=task.get('timestep_spacing', 'linspace'),
      steps_offset=task.get('steps_offset', 0),
      set_alpha_to_one=task.get('set_alpha_to_one', True))))
  paths.append(_write_json(os.path.join(out, 'model_index.json'), {
      '_class_name': 'StableDiffusionPipeline', 'requires_safety_checker': False,
      'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
      'text_encoder': ['transformers', 'CLIPTextModel'],
      'tokenizer': ['transformers', 'CLIPTokenizer'], 'scheduler': ['diffusers', 'DDIMScheduler'],
      'safety_checker': [None, None], 'feature_extractor': [None, None]}))
  return paths

