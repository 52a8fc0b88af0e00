"""`zoo convert` / `zoo export`: public checkpoints -> zoo workdirs -> the reference library.

Each kind goes the way a user's checkpoint would: a random diffusers / transformers model,
`save_pretrained` (config.json + safetensors) -> `zoo convert` (CLI) -> a workdir whose
checkpoint `runs.load` reads -> outputs equal to the reference's -> `zoo export` ->
`from_pretrained` in the reference library -> the same state dict, bit for bit.
"""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from diffusers import AutoencoderKL
from diffusers import ControlNetModel
from diffusers import DiTTransformer2DModel
from diffusers import UNet2DConditionModel
from diffusers import UNet2DModel

import data as data_lib
from conftest import REPO
from conftest import perturb as _perturb
from conftest import perturbed_hf_model
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import main as zoo_main
from zoo import models
from zoo import runs
from zoo import train
from zoo.convert import hub
from zoo.convert import workdir as workdir_lib

torch.set_num_threads(2)

SMOKE = {'unet': 'experiments/shapes_diffusion.py:smoke=True',
         'dit': 'experiments/shapes_diffusion.py:smoke=True,model=dit',
         'vae': 'experiments/vae_shapes.py:smoke=True',
         'clip': 'experiments/clip_shapes.py:smoke=True',
         'siglip': 'experiments/siglip_shapes.py:smoke=True'}
CLASSES = 8  # The shapes label of experiments/shapes_diffusion.py.


def _zoo(*argv):
  assert zoo_main.main(list(argv)) == 0, argv


def _state_dicts_equal(a, b):
  a, b = a.state_dict(), b.state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    assert torch.equal(a[k], b[k]), k


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _loaded(workdir):
  config, _, state = runs.load(workdir)
  return config, models.build(config.model), jax.device_get(state['ema_params'])


def test_unet_converts_samples_and_exports(tmp_path):
  """Class-conditional, pixel space, like the shapes_diffusion smoke run."""
  ref = _perturb(UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 24),
      layers_per_block=1, down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
      up_block_types=('AttnUpBlock2D', 'UpBlock2D'), attention_head_dim=8, norm_num_groups=8,
      num_class_embeds=CLASSES + 1), seed=0)
  ref.save_pretrained(tmp_path / 'hf')
  workdir = str(tmp_path / 'run')
  _zoo('convert', '--from', 'diffusers-unet', '--in', str(tmp_path / 'hf'), '--out', workdir,
       '--config', os.path.join(REPO, SMOKE['unet']))
  config, model, params = _loaded(workdir)
  assert config.model.num_classes == CLASSES
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  t, labels = np.array([3.0, 700.0], np.float32), np.array([1, CLASSES])
  got = jax.jit(model.apply)({'params': params}, x, t, labels_B=labels)
  with torch.no_grad():
    want = ref(_nchw(x), torch.from_numpy(t), class_labels=torch.from_numpy(labels)).sample
  np.testing.assert_allclose(np.asarray(got), _nhwc(want), atol=1e-4, rtol=0)

  # The converted run is a run: it samples, and `zoo train --config W/config.json
  # --config.init_from=W` reads its config and starts from its params.
  _zoo('sample', '--workdir', workdir, '--num', '2', '--steps', '2', '--out',
       str(tmp_path / 'grid.png'))
  assert os.path.getsize(tmp_path / 'grid.png') > 0
  tune = zoo_config.load(os.path.join(workdir, 'config.json'), [f'--config.init_from={workdir}'])
  assert tune.model == config.model
  spec = data_lib.get_dataset(tune.data, split='train', seed=0, global_batch_size=8).spec()
  start = checkpoint.load_params(os.path.join(tune.init_from, 'checkpoints'),
                                 train.setup(tune, spec).abstract_state['params'])
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), b)

  _zoo('export', '--workdir', workdir, '--out', str(tmp_path / 'out'))
  _state_dicts_equal(ref, UNet2DModel.from_pretrained(tmp_path / 'out'))


def test_controlnet_round_trips_and_matches_diffusers(tmp_path):
  """An SD-style (cross-attention) ControlNetModel, at the file level."""
  ref = _perturb(ControlNetModel(
      in_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), attention_head_dim=4,
      norm_num_groups=8, cross_attention_dim=12, conditioning_embedding_out_channels=(8, 16)),
      seed=1)
  ref.save_pretrained(tmp_path / 'hf')
  converted = hub.read('diffusers-controlnet', str(tmp_path / 'hf'))
  model = models.build(models.config('controlnet', **converted.kwargs))
  rng = np.random.default_rng(1)
  x, ctx = rng.standard_normal((2, 8, 8, 4)), rng.standard_normal((2, 3, 12))
  x, ctx, t = x.astype(np.float32), ctx.astype(np.float32), np.array([3.0, 700.0], np.float32)
  hint = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  got = jax.jit(lambda p: model.apply({'params': p}, x, t, hint, context_BxLxD=ctx,
                                      conditioning_scale=0.5))(converted.params)
  with torch.no_grad():
    down, mid = ref(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                    controlnet_cond=_nchw(hint), conditioning_scale=0.5, return_dict=False)
  for g, w in zip((*got.down, got.mid), (*down, mid)):
    np.testing.assert_allclose(np.asarray(g), _nhwc(w), atol=1e-4, rtol=0)
  hub.write('diffusers-controlnet', converted.kwargs, converted.params, str(tmp_path / 'out'),
            'diffusers')
  _state_dicts_equal(ref, ControlNetModel.from_pretrained(tmp_path / 'out'))


def test_vae_converts_and_exports(tmp_path):
  ref = _perturb(AutoencoderKL(
      block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
      up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, latent_channels=4,
      norm_num_groups=8, scaling_factor=0.4), seed=2)
  ref.save_pretrained(tmp_path / 'hf')
  workdir = str(tmp_path / 'run')
  _zoo('convert', '--from', 'diffusers-vae', '--in', str(tmp_path / 'hf'), '--out', workdir,
       '--config', os.path.join(REPO, SMOKE['vae']))
  config, model, params = _loaded(workdir)
  assert config.model.scaling_factor == 0.4
  x = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, _ = jax.jit(lambda p: model.apply({'params': p}, x, method='encode'))(params['vae'])
  with torch.no_grad():
    want = ref.encode(_nchw(x)).latent_dist.mean
  np.testing.assert_allclose(np.asarray(mean), _nhwc(want), atol=1e-4, rtol=0)
  _zoo('export', '--workdir', workdir, '--out', str(tmp_path / 'out'))
  _state_dicts_equal(ref, AutoencoderKL.from_pretrained(tmp_path / 'out'))


def _dit_reference():
  ref = DiTTransformer2DModel(
      num_attention_heads=4, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=2,
      sample_size=32, patch_size=4, num_embeds_ada_norm=CLASSES, norm_eps=1e-6)
  _perturb(ref, seed=3)
  state = ref.state_dict()  # zoo shares one timestep / label embedder across blocks.
  with torch.no_grad():
    for key in state:
      if '.norm1.emb.' in key:
        state[key].copy_(state['transformer_blocks.0.norm1.emb.' + key.split('.norm1.emb.')[1]])
  return ref


def test_dit_converts_from_diffusers_and_facebook_formats(tmp_path):
  ref = _dit_reference()
  ref.save_pretrained(tmp_path / 'hf')
  workdir = str(tmp_path / 'run')
  _zoo('convert', '--from', 'dit', '--in', str(tmp_path / 'hf'), '--out', workdir,
       '--config', os.path.join(REPO, SMOKE['dit']))
  config, model, params = _loaded(workdir)
  assert config.model.freq_shift == 1.0  # diffusers' timestep embedding
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  t, labels = np.array([3.0, 700.0], np.float32), np.array([1, CLASSES])
  got = jax.jit(model.apply)({'params': params}, x, t, labels_B=labels)
  with torch.no_grad():
    want = ref(_nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(labels)).sample
  np.testing.assert_allclose(np.asarray(got), _nhwc(want), atol=1e-4, rtol=0)

  _zoo('export', '--workdir', workdir, '--out', str(tmp_path / 'out'), '--format', 'diffusers')
  _state_dicts_equal(ref, DiTTransformer2DModel.from_pretrained(tmp_path / 'out'))
  # facebookresearch/DiT embeds timesteps with freq_shift 0: this one has no such export.
  fb = str(tmp_path / 'DiT-tiny.safetensors')
  assert zoo_main.main(['export', '--workdir', workdir, '--out', fb, '--format', 'facebook']) == 2
  # A freq_shift-0 DiT in facebookresearch/DiT naming: one file with pos_embed, and back.
  kwargs = models.kwargs(config.model) | {'freq_shift': 0.0}
  hub.write('dit', kwargs, params, fb, 'facebook')
  assert 'pos_embed' in safetensors.numpy.load_file(fb)
  with pytest.raises(ValueError, match='--num-heads'):  # 2 x 32 is no published DiT size
    hub.read('dit', fb)
  again = hub.read('dit', fb, num_heads=4)
  assert again.format == 'facebook'
  assert {k: again.kwargs[k] for k in again.kwargs} == {k: kwargs[k] for k in again.kwargs}
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def _dual_config(kind, tokenizer_json):
  with open(tokenizer_json) as f:
    vocab = len(json.load(f)['model']['vocab'])
  tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
  text = tower | dict(vocab_size=vocab, max_position_embeddings=40)
  vision = tower | dict(image_size=32, patch_size=8)
  if kind == 'clip':
    return transformers.CLIPConfig(text_config=text | dict(eos_token_id=vocab - 1),
                                   vision_config=vision, projection_dim=24,
                                   attn_implementation='eager')
  return transformers.SiglipConfig(text_config=text | dict(eos_token_id=vocab - 1),
                                   vision_config=vision, attn_implementation='eager')


@pytest.mark.parametrize('kind', ['clip', 'siglip'])
def test_dual_encoder_converts_searches_and_exports(kind, tmp_path):
  tokenizer_json = os.path.join(REPO, 'data', 'shapes', 'tokenizer.json')
  cls = transformers.CLIPModel if kind == 'clip' else transformers.SiglipModel
  ref = perturbed_hf_model(cls, _dual_config(kind, tokenizer_json), seed=4)
  ref.save_pretrained(tmp_path / 'hf')
  if kind == 'clip':  # Its BPE beside the weights, as on the Hub: the run adopts it.
    with open(tokenizer_json) as src, open(tmp_path / 'hf' / 'tokenizer.json', 'w') as dst:
      dst.write(src.read())
  workdir = str(tmp_path / 'run')
  _zoo('convert', '--from', kind, '--in', str(tmp_path / 'hf'), '--out', workdir,
       '--config', os.path.join(REPO, SMOKE[kind]))
  config, model, params = _loaded(workdir)
  if kind == 'clip':
    assert config.data.text.tokenizer == 'clip'
    assert os.path.isfile(os.path.join(workdir, 'tokenizer', 'tokenizer.json'))
  rng = np.random.default_rng(4)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  tokens = rng.integers(1, 700, (2, 9)).astype(np.int32)
  tokens[:, -1] = config.model.text.eos_token_id
  mask = np.ones_like(tokens, bool)
  out = jax.jit(model.apply)({'params': params}, images, tokens, mask)
  pixels = (images + 1) / 2
  if kind == 'clip':
    mean, std = np.array(models.vit.CLIP_MEAN), np.array(models.vit.CLIP_STD)
    pixels = ((pixels - mean) / std).astype(np.float32)
  else:
    pixels = images
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens.astype(np.int64)), pixel_values=_nchw(pixels))
  np.testing.assert_allclose(np.asarray(out['image']), want.image_embeds.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(out['text']), want.text_embeds.numpy(), atol=1e-4)

  if kind == 'clip':  # `zoo index` / `zoo search` take the converted run.
    index = str(tmp_path / 'index')
    _zoo('index', '--workdir', workdir, '--dataset', 'shapes/tiny32:test', '--out', index)
    _zoo('search', index, 'a red circle.', '-k', '2')
  _zoo('export', '--workdir', workdir, '--out', str(tmp_path / 'out'))
  _state_dicts_equal(ref, cls.from_pretrained(tmp_path / 'out'))


@pytest.mark.parametrize('mid', ['UNetMidBlock2DCrossAttn', 'UNetMidBlock2D'])
def test_conditional_unet_round_trips_through_its_config(tmp_path, mid):
  """SD-style UNet2DConditionModel: config.json -> zoo fields -> config.json -> same model; with
  a UNetMidBlock2D (one resnet in diffusers) too, and a ControlNetModel made from it."""
  ref = _perturb(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4,
      norm_num_groups=8, cross_attention_dim=12, use_linear_projection=True,
      mid_block_type=mid), seed=5)
  ref.save_pretrained(tmp_path / 'hf')
  converted = hub.read('diffusers-unet', str(tmp_path / 'hf'))
  assert converted.kwargs['num_attention_heads'] == 4 and converted.kwargs['context_dim'] == 12
  model = models.build(models.config('unet', **converted.kwargs))
  rng = np.random.default_rng(5)
  x, ctx = rng.standard_normal((1, 8, 8, 4)), rng.standard_normal((1, 3, 12))
  x, ctx, t = x.astype(np.float32), ctx.astype(np.float32), np.array([20.0], np.float32)
  got = jax.jit(model.apply)({'params': converted.params}, x, t, context_BxLxD=ctx)
  with torch.no_grad():
    want = ref(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
  np.testing.assert_allclose(np.asarray(got), _nhwc(want), atol=1e-4, rtol=0)
  hub.write('diffusers-unet', converted.kwargs, converted.params, str(tmp_path / 'out'),
            'diffusers')
  _state_dicts_equal(ref, UNet2DConditionModel.from_pretrained(tmp_path / 'out'))
  net = _perturb(ControlNetModel.from_unet(ref, conditioning_embedding_out_channels=(8,)), seed=6)
  net.save_pretrained(tmp_path / 'net')
  control = hub.read('diffusers-controlnet', str(tmp_path / 'net'))
  got = jax.jit(models.build(models.config('controlnet', **control.kwargs)).apply)(
      {'params': control.params}, x, t, x[..., :3], context_BxLxD=ctx)
  with torch.no_grad():
    down, mid_out = net(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                        controlnet_cond=_nchw(x[..., :3]), return_dict=False)
  for g, w in zip((*got.down, got.mid), (*down, mid_out)):
    np.testing.assert_allclose(np.asarray(g), _nhwc(w), atol=1e-4, rtol=0)
  hub.write('diffusers-controlnet', control.kwargs, control.params, str(tmp_path / 'net_out'),
            'diffusers')
  _state_dicts_equal(net, ControlNetModel.from_pretrained(tmp_path / 'net_out'))


def test_bad_sources_are_refused_clearly(tmp_path):
  pickled = tmp_path / 'model.ckpt'
  pickled.write_bytes(b'not read')
  with pytest.raises(ValueError, match='never read'):
    hub.read('diffusers-unet', str(pickled))
  folder = tmp_path / 'torch_folder'
  folder.mkdir()
  (folder / 'config.json').write_text('{"_class_name": "UNet2DModel"}')
  (folder / 'diffusion_pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(FileNotFoundError, match='pickled weights'):
    hub.read('diffusers-unet', str(folder))
  with pytest.raises(ValueError, match='not one of'):
    hub.read('sd-unet', str(folder))
  safetensors.numpy.save_file({'a': np.zeros(2, np.float32)},
                              str(folder / 'diffusion_pytorch_model.safetensors'))
  with pytest.raises(ValueError, match="describes a 'UNet2DModel'"):
    hub.read('diffusers-vae', str(folder))
  (folder / 'config.json').write_text(json.dumps({
      '_class_name': 'UNet2DModel', 'block_out_channels': [8], 'act_fn': 'gelu'}))
  with pytest.raises(ValueError, match="act_fn='gelu' is not supported"):
    hub.read('diffusers-unet', str(folder))
  # A ControlNetModel's UNetMidBlock2D is one resnet: over a base whose mid block has two (a
  # UNet2DModel's), the converter names the field that differs.
  base = tmp_path / 'base'
  base.mkdir()
  (base / 'config.json').write_text(zoo_config.to_json(
      zoo_config.load(os.path.join(REPO, SMOKE['unet']))))
  with pytest.raises(ValueError, match='mid_block_layers: controlnet 0 vs base 1'):
    workdir_lib._on_base({'mid_block_type': 'UNetMidBlock2D', 'mid_block_layers': 0}, str(base))
  assert zoo_main.main(['convert', '--from', 'diffusers-unet', '--in', str(pickled), '--out',
                        str(tmp_path / 'w')]) == 2
