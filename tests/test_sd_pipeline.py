"""`zoo convert --from diffusers-sd`: a StableDiffusionPipeline folder -> one text_to_image run,
and SD-style ControlNets over it (`--from diffusers-controlnet --base`, experiments/
control_t2i_shapes.py).

A tiny random pipeline (the shapes CLIP BPE as its tokenizer, CLIPTextModel, cross-attention
UNet2DConditionModel, AutoencoderKL, Stable Diffusion 1.x's DDIM scheduler config) goes the way
a user's would: save_pretrained -> `zoo convert` (CLI) -> the run's prompt tokens and text
features equal the pipeline's -> `task.sample` draws the pipeline's images from the same initial
latents (guidance, negative prompt) -> `zoo sample --prompt` -> `zoo export` -> from_pretrained
-> the same weights, tokens and scheduler. A ControlNetModel made from its UNet converts over the
run and samples as StableDiffusionControlNetPipeline does; a text ControlNet trains over it.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL
from diffusers import ControlNetModel
from diffusers import DDIMScheduler
from diffusers import StableDiffusionControlNetPipeline
from diffusers import StableDiffusionPipeline
from diffusers import UNet2DConditionModel
from PIL import Image

from conftest import REPO
from conftest import perturb
from conftest import perturbed_hf_model
from data import text_tokenizers
from test_text_tokenizers import write_clip_files
from zoo import config as zoo_config
from zoo import diffusion
from zoo import main as zoo_main
from zoo import metrics
from zoo import runs
from zoo import train
from zoo.convert import workdir as convert_workdir

torch.set_num_threads(2)

MAX_LEN = 16
PROMPTS = ['one shape: a red circle.', 'a green star left of a yellow heart.']
NEGATIVE = ['a blue square.', '']
# Runs on one of the 8 test devices: replicated over all 8, each call would compute 8 times.
ONE = ('--config.mesh.data=1',)


def _zoo(*argv):
  assert zoo_main.main([str(a) for a in argv]) == 0, argv


def _tiny_pipeline(directory):
  merges = [tuple(m) for m in json.loads(
      text_tokenizers.get('shapes_bpe').backend.to_str())['model']['merges']]
  write_clip_files(directory / 'bpe', merges)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory / 'bpe'),
                                                         model_max_length=MAX_LEN)
  text = perturbed_hf_model(transformers.CLIPTextModel, transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act='quick_gelu',
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id), seed=0)
  torch.manual_seed(1)
  unet = perturb(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4,
      norm_num_groups=8, cross_attention_dim=32), seed=2)
  vae = perturb(AutoencoderKL(
      block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
      up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, latent_channels=4,
      norm_num_groups=8, sample_size=16, scaling_factor=0.5), seed=3)
  # Stable Diffusion v1's scheduler fields (its PNDM config, as a DDIMScheduler).
  scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(directory / 'pipe')
  return pipe


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd')
  pipe = _tiny_pipeline(root)
  _zoo('convert', '--from', 'diffusers-sd', '--in', root / 'pipe', '--out', root / 'run', *ONE)
  return pipe, root, str(root / 'run')


def test_prompts_encode_as_the_pipeline_encodes_them(converted):
  pipe, _, workdir = converted
  config, s, state = runs.load(workdir)
  assert (config.task.timestep_spacing, config.task.steps_offset,
          config.task.set_alpha_to_one) == ('leading', 1, False)
  theirs = pipe.tokenizer(PROMPTS + [''], padding='max_length', max_length=MAX_LEN,
                          truncation=True, return_tensors='np').input_ids
  ids, mask = s.task.tokenizer.encode(PROMPTS + [''], MAX_LEN)
  np.testing.assert_array_equal(ids, theirs)
  assert ids[0, -1] == pipe.tokenizer.pad_token_id and not mask.all()  # Padded, and attended:
  cond = s.task.encode_text(state['ema_params'], ids, mask)
  assert cond['context_mask_BxL'].all()
  with torch.no_grad():
    want = pipe.text_encoder(torch.from_numpy(theirs)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(cond['context_BxLxD']), want, atol=2e-5, rtol=1e-4)


def test_sample_draws_the_pipelines_images(converted, tmp_path):
  pipe, _, workdir = converted
  _, s, state = runs.load(workdir)
  rng = jax.random.PRNGKey(3)
  x_T = diffusion.normal(diffusion.split_keys(rng)[0], (2, *s.task.image_shape))
  ours = s.task.sample(state['ema_params'], rng, prompts=PROMPTS, negative_prompts=NEGATIVE,
                       sampler='ddim', steps=4, guidance_scale=5.0)
  latents = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    want = pipe(PROMPTS, negative_prompt=NEGATIVE, latents=latents, num_inference_steps=4,
                guidance_scale=5.0, output_type='np').images
  assert ours.shape == want.shape == (2, 16, 16, 3)
  assert np.std(want) > 0.05  # Not a flat image: the comparison sees the model's detail.
  np.testing.assert_allclose(np.asarray(ours), want, atol=2e-4)
  out = tmp_path / 'sd.png'
  _zoo('sample', '--workdir', workdir, '--prompt', PROMPTS[0], '--num', 2, '--steps', 2,
       '--out', out)
  assert Image.open(out).size[0] >= 16


def test_export_loads_back_into_diffusers(converted):
  pipe, root, workdir = converted
  _zoo('export', '--workdir', workdir, '--out', root / 'export')
  back = StableDiffusionPipeline.from_pretrained(str(root / 'export'), safety_checker=None)
  for name in ('unet', 'vae', 'text_encoder'):
    a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
    assert sorted(a) == sorted(b), name
    for k in a:
      assert torch.equal(a[k], b[k]), (name, k)
  assert back.tokenizer(PROMPTS, padding='max_length', max_length=MAX_LEN).input_ids == \
      pipe.tokenizer(PROMPTS, padding='max_length', max_length=MAX_LEN).input_ids
  assert back.tokenizer.model_max_length == MAX_LEN
  for key in ('timestep_spacing', 'steps_offset', 'set_alpha_to_one', 'beta_schedule',
              'beta_start', 'beta_end', 'prediction_type', 'num_train_timesteps'):
    assert back.scheduler.config[key] == pipe.scheduler.config[key], key


@pytest.mark.parametrize('edit, match', [
    (('model_index.json', '_class_name', 'StableDiffusionXLPipeline'), 'StableDiffusionXL'),
    (('scheduler/scheduler_config.json', 'beta_schedule', 'squaredcos_cap_v2'),
     'beta_schedule'),
    (('scheduler/scheduler_config.json', 'thresholding', True), 'thresholding'),
    (('text_encoder/config.json', 'model_type', 'siglip_text_model'), 'siglip_text_model'),
])
def test_unsupported_pipelines_are_refused_by_name(converted, tmp_path, edit, match):
  _, root, _ = converted
  src = tmp_path / 'pipe'
  for dirpath, _, files in os.walk(root / 'pipe'):
    rel = os.path.relpath(dirpath, root / 'pipe')
    os.makedirs(src / rel, exist_ok=True)
    for name in files:
      os.symlink(os.path.join(dirpath, name), src / rel / name)
  path, key, value = edit
  with open(src / path) as f:
    cfg = json.load(f)
  os.remove(src / path)
  with open(src / path, 'w') as f:
    json.dump(cfg | {key: value}, f)
  with pytest.raises(ValueError, match=match):
    convert_workdir.convert('diffusers-sd', str(src), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


# --- SD-style ControlNets over the converted run. ---------------------------------------------

@pytest.fixture(scope='module')
def control(converted):
  pipe, root, workdir = converted
  torch.manual_seed(4)
  net = perturb(ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)),
                seed=5)
  net.save_pretrained(root / 'controlnet')
  _zoo('convert', '--from', 'diffusers-controlnet', '--in', root / 'controlnet', '--base',
       workdir, '--out', root / 'control_run', *ONE)
  return net, str(root / 'control_run')


def test_controlnet_samples_as_the_controlnet_pipeline(converted, control, tmp_path):
  pipe, _, workdir = converted
  net, control_run = control
  config, s, state = runs.load(control_run)
  assert (config.task.name, config.task.control) == ('text_controlnet', 'seg')
  hints_u8 = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  hints = hints_u8.astype(np.float32) / 255.0
  rng = jax.random.PRNGKey(5)
  x_T = diffusion.normal(diffusion.split_keys(rng)[0], (2, *s.task.image_shape))
  kw = dict(prompts=PROMPTS, negative_prompts=NEGATIVE, sampler='ddim', steps=4,
            guidance_scale=5.0)
  ours = s.task.sample(state['ema_params'], rng, hints=hints, conditioning_scale=0.7, **kw)
  both = StableDiffusionControlNetPipeline(
      vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
      controlnet=net, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  both.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    want = both(PROMPTS, image=[Image.fromarray(h) for h in hints_u8], latents=latents,
                negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                controlnet_conditioning_scale=0.7, output_type='np').images
  np.testing.assert_allclose(np.asarray(ours), want, atol=2e-4)
  # Scale 0: the base run's images (to float rounding: the two sampling programs are compiled
  # separately and may vectorise reductions differently); the control moves them.
  _, base_s, base_state = runs.load(workdir)
  base = base_s.task.sample(base_state['ema_params'], rng, **kw)
  off = s.task.sample(state['ema_params'], rng, hints=hints, conditioning_scale=0.0, **kw)
  np.testing.assert_allclose(np.asarray(off), np.asarray(base), atol=1e-5)
  assert np.abs(np.asarray(ours) - np.asarray(base)).max() > 0.02
  Image.fromarray(hints_u8[0]).save(tmp_path / 'seg.png')
  _zoo('sample', '--workdir', control_run, '--control', f'seg:{tmp_path / "seg.png"}',
       '--prompt', PROMPTS[0], '--num', 2, '--steps', 2, '--out', tmp_path / 'c.png')
  assert os.path.isfile(tmp_path / 'c.png')


def test_text_controlnet_trains_over_the_frozen_run(converted, control, tmp_path):
  _, _, workdir = converted
  config = zoo_config.load(f'{REPO}/experiments/control_t2i_shapes.py:smoke=True,base={workdir},'
                           'control=seg,steps=3', ['--config.train.checkpoint_every=3',
                                                   '--config.train.log_every=1',
                                                   '--config.train.batch_size=2',
                                                   '--config.mesh.data=1'])
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  _, s, state = runs.load(str(tmp_path / 'run'))
  _, _, base_state = runs.load(workdir)
  for a, b in zip(jax.tree.leaves(state['params']['base']),
                  jax.tree.leaves(base_state['ema_params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  zero_convs = [np.abs(np.asarray(v['kernel'])).max()
                for k, v in state['params']['controlnet'].items()
                if k.startswith('controlnet_down_blocks')]
  assert min(zero_convs) > 0  # Trained away from their zero init.
  losses = [r['loss'] for r in metrics.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
            if 'loss' in r]
  assert len(losses) == 3 and np.isfinite(losses).all()
  # The control evaluator ran at the last step: held-out hints under their scenes' captions,
  # with the ControlNet and at scale 0 (the base), each scored; a grid hint|ctl|base|real.
  evaluated, = [r for r in metrics.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
                if 'control/overall' in r]
  for name in ('overall', 'mean_iou', 'silhouette_iou'):
    for key in (f'control/{name}', f'control/{name}_base'):
      assert 0.0 <= evaluated[key] <= 1.0, key
  assert evaluated['control/silhouette_iou'] != evaluated['control/silhouette_iou_base']
  grid = np.asarray(Image.open(tmp_path / 'run' / 'control' / 'step_000003.png'))
  side = config.data.resolution
  assert grid.shape[0] >= 4 * side and grid.shape[1] >= 4 * side


@pytest.mark.parametrize('override, match', [
    ('model.conditioning_embedding_out_channels=(16,)', 'downsamples hints by 1'),
    ('model.block_out_channels=(16,16)', 'block_out_channels'),
    ('data.text.max_len=8', 'data.text.max_len'),
    ('data.resolution=32', 'data.resolution'),
    ('task.caption_dropout=1.0', 'caption_dropout'),
])
def test_text_controlnet_configs_name_what_differs_from_the_base(converted, override, match):
  _, _, workdir = converted
  with pytest.raises(ValueError, match=re.escape(match)):
    zoo_config.load(f'{REPO}/experiments/control_t2i_shapes.py:smoke=True,base={workdir},'
                    'control=seg', [f'--config.{override}'])
