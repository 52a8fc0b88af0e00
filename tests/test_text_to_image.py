"""Text-to-image diffusion: caption batches, the task in pixel and latent space, frozen parts
loaded from other runs, guidance with negative prompts, the `--prompt` CLI; learned σ."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data as data_lib
from data import captions
from data import pipeline
from data.shapes import generate
from data.shapes import grammar
from zoo import config as zoo_config
from zoo import main as zoo_main
from zoo import models
from zoo import runs
from zoo import tasks
from zoo import train
from zoo.nn import layers

from conftest import REPO
from conftest import assert_same
from conftest import leaves

LDM = os.path.join(REPO, 'experiments', 'ldm_t2i_shapes.py')
# One device: a run laid over the 8 test devices computes every call 8 times on 2 cores.
QUIET = ['--config.train.progress_bar=false', '--config.mesh.data=1']


def text_data(**overrides):
  cfg = zoo_config.ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='',
      builder_config='tiny32', train_split='train', eval_split='validation', features=()))
  cfg.text = zoo_config.ConfigDict(dict(caption_key='captions', tokenizer='shapes',
                                        tokenizer_path='', max_len=32) | overrides)
  return cfg


def test_caption_batches_are_a_function_of_the_stream_position():
  cfg = text_data()
  one = data_lib.get_dataset(cfg, split='train', seed=3, global_batch_size=8)
  first = [next(one) for _ in range(3)]
  assert first[0]['tokens'].shape == (8, 32) and first[0]['tokens_mask'].dtype == bool
  halves = [data_lib.get_dataset(cfg, split='train', seed=3, global_batch_size=8,
                                 process_index=p, process_count=2) for p in range(2)]
  for batch in first:
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([p['tokens'] for p in parts]), batch['tokens'])
  resumed = data_lib.get_dataset(cfg, split='train', seed=3, global_batch_size=8)
  resumed.set_state({'next_batch': 2})
  np.testing.assert_array_equal(next(resumed)['tokens'], first[2]['tokens'])


def test_each_token_row_is_one_of_its_examples_captions():
  cfg = text_data(max_len=64)
  picker = captions.Captions(cfg.text, seed=0)
  tok = picker.tokenizer
  gen_spec = pipeline.get_builder(cfg).builder_config.spec()
  examples = [generate.make_example(gen_spec, 'train', i) for i in range(6)]
  chosen = set()
  for k in range(8):  # The same example in other batches shows other paraphrases.
    out = picker.tokens(examples, np.arange(6), k)
    for row, mask, ex in zip(out['tokens'], out['tokens_mask'], examples):
      text = tok.decode(row[mask])
      assert text in [c.lower() for c in ex['captions']]
      chosen.add((ex['captions'][0], text))
  assert len(chosen) > 6


def test_colour_blind_views_grey_the_image_and_drop_the_colour_words():
  colours = grammar.COLOUR_NAMES
  cfg = text_data(max_len=64, colour_blind=0.5, colour_words=colours)
  clip = zoo_config.load(os.path.join(REPO, 'experiments', 'clip_shapes.py:colour_blind=0.3'))
  assert clip.data.text.colour_blind == 0.3 and clip.data.text.colour_words == colours
  seen = data_lib.get_dataset(cfg, split='train', seed=3, global_batch_size=16)
  plain = data_lib.get_dataset(text_data(max_len=64), split='train', seed=3, global_batch_size=16)
  tok = captions.Captions(cfg.text, seed=3).tokenizer
  greyed = 0
  for _ in range(2):
    b, p = next(seen), next(plain)
    for image, plain_image, row, mask, plain_row, plain_mask in zip(
        b['image'], p['image'], b['tokens'], b['tokens_mask'], p['tokens'], p['tokens_mask']):
      text, plain_text = tok.decode(row[mask]), tok.decode(plain_row[plain_mask])
      if np.array_equal(image, plain_image):
        assert np.array_equal(row, plain_row)
        continue
      greyed += 1  # The brightest channel in every channel; the caption without its colours.
      np.testing.assert_array_equal(image, np.repeat(plain_image.max(-1, keepdims=True), 3, -1))
      assert not set(text.replace(',', ' ').split()) & set(colours), text
      assert set(text.split()) < set(plain_text.split()) and len(text) < len(plain_text)
  assert 4 <= greyed <= 28, greyed
  for bad, match in (({'colour_blind': 1.0, 'colour_words': colours}, r'colour_blind=1.0 must'),
                     ({'colour_blind': 0.3, 'colour_words': ()}, 'needs data.text.colour_words')):
    with pytest.raises(ValueError, match=match):
      captions.check_config(text_data(**bad).text)
  picker = captions.Captions(cfg.text, seed=0)
  assert picker.without_colours('Four shapes: an orange star and a red oval.') == (
      'Four shapes: a star and an oval.')


def pixel_config(*overrides):
  """ldm_t2i_shapes smoke, but in pixel space at 32x32 (no VAE): the quickest t2i run."""
  config = zoo_config.load(f'{LDM}:smoke=True', QUIET)
  config.data.resolution = 32
  config.data.builder_config = 'tiny32'
  config.model = models.config('unet', preset='tiny-t2i', in_channels=3, out_channels=3,
                               context_dim=32)
  config.task.vae = zoo_config.ConfigDict()
  config.task.vae_from = ''
  config.train.steps = 12
  config.evals.samples.per_prompt = 1
  for item in overrides:
    key, value = item.split('=', 1)
    zoo_config.override(config, key, value)
  return zoo_config.validate(config)


@pytest.fixture(scope='module')
def pixel_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('t2i_pixel'))
  config = pixel_config()
  config.train.steps = 20
  config.optim.lr = 3e-3
  train.train_and_evaluate(config, workdir)
  return workdir


def test_pixel_text_to_image_learns_and_writes_a_prompt_grid(pixel_run):
  losses = [m['loss'] for m in runs.metrics.read_jsonl(os.path.join(pixel_run, 'metrics.jsonl'))
            if 'loss' in m]
  assert np.mean(losses[-2:]) < losses[0]
  assert os.path.isfile(os.path.join(pixel_run, 'samples', 'step_000020.png'))


def test_guidance_uses_the_negative_prompt(pixel_run):
  _, s, state = runs.load(pixel_run)
  params, rng, sample = state['ema_params'], jax.random.PRNGKey(1), s.task.predict['sample']
  kw = dict(prompts=['one shape: a red circle.'] * 2, steps=3, sampler='ddim')
  empty = sample(params, rng, guidance_scale=3.0, **kw)
  assert empty.shape == (2, 32, 32, 3) and 0.0 <= float(empty.min()) <= float(empty.max()) <= 1.0
  negative = sample(params, rng, guidance_scale=3.0, negative_prompts=['a blue star.'] * 2, **kw)
  assert float(jnp.abs(empty - negative).max()) > 1e-4
  # Scale 1 is the conditional prediction alone: the negative prompt plays no part.
  plain = sample(params, rng, guidance_scale=1.0, **kw)
  plain_neg = sample(params, rng, guidance_scale=1.0, negative_prompts=['a blue star.'] * 2, **kw)
  np.testing.assert_array_equal(plain, plain_neg)
  four = 'four shapes: a red star, a blue heart, a cyan cross and a pink square.'
  other = sample(params, rng, guidance_scale=1.0, steps=3, sampler='ddim', prompts=[four] * 2)
  assert float(jnp.abs(plain - other).max()) > 1e-4
  with pytest.raises(ValueError, match='prompts'):
    sample(params, rng, prompts='a red circle.')
  with pytest.raises(ValueError, match='text-conditional'):
    sample(params, rng, np.zeros(2, np.int32))


def test_frozen_text_encoder_comes_from_another_run_and_stays(pixel_run, tmp_path):
  config = pixel_config(f'task.text_encoder_from={pixel_run}', 'task.train_text_encoder=False')
  config.train.steps, config.evals = 4, zoo_config.ConfigDict()
  state = train.train_and_evaluate(config, str(tmp_path))
  _, _, source = runs.load(pixel_run)
  assert_same(state['params']['text_encoder'], source['ema_params']['text_encoder'])
  assert_same(state['ema_params']['text_encoder'], source['ema_params']['text_encoder'])
  # Adam keeps two moments for the denoiser's params only (plus a step count).
  moments = sum(x.size for x in leaves(state['opt_state']))
  assert 0 <= moments - 2 * layers.param_count(state['params']['denoiser']) < 8


def test_prompt_cli_writes_one_row_per_prompt(pixel_run, tmp_path, capsys):
  out = str(tmp_path / 'grid.png')
  code = zoo_main.main(['sample', '--workdir', pixel_run, '--prompt', 'a red circle.',
                        '--prompt', 'a blue star.', '--num', '3', '--steps', '2', '--upscale',
                        '1', '--out', out, '--negative-prompt', 'a green square.'])
  assert code == 0
  from PIL import Image
  assert Image.open(out).size[1] > Image.open(out).size[0] * 2 / 3 * 0.9  # 2 rows x 3 columns.
  assert zoo_main.main(['sample', '--workdir', pixel_run, '--label', '1', '--out', out]) == 2
  assert 'use --prompt' in capsys.readouterr().err


def _assert_inpainted(task, params, shape, **kw):
  """Inpaints a centre box of two random images: kept pixels exact, the box regenerated."""
  images = np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype(np.float32)
  mask = np.zeros(shape[:2] + (1,), np.float32)
  mask[shape[0] // 4:shape[0] // 2, shape[1] // 4:shape[1] // 2] = 1.0
  out = task.predict['inpaint'](params, jax.random.PRNGKey(0), images, mask,
                                prompts=['a red circle.', 'a blue star.'], steps=3, **kw)
  assert out.shape == images.shape
  keep = np.broadcast_to(mask == 0, images.shape)
  np.testing.assert_array_equal(out[keep], images[keep])
  assert np.abs(out[~keep] - images[~keep]).mean() > 0.05
  return images, mask


def test_text_to_image_inpainting(pixel_run):
  _, s, state = runs.load(pixel_run)
  images, mask = _assert_inpainted(s.task, state['ema_params'], (32, 32, 3),
                                   jump_length=1, jump_n_sample=2)
  with pytest.raises(ValueError, match='1 prompts for 2 images'):
    s.task.predict['inpaint'](state['ema_params'], jax.random.PRNGKey(0), images, mask,
                              prompts=['a red circle.'])
  with pytest.raises(ValueError, match='text-conditional'):
    s.task.predict['inpaint'](state['ema_params'], jax.random.PRNGKey(0), images, mask,
                              np.zeros(2, np.int32))


def test_latent_run_freezes_the_vae_it_loads(tmp_path, vae_smoke_run):
  vae_dir, ldm_dir = str(vae_smoke_run[0]), str(tmp_path / 'ldm')
  config = zoo_config.load(f'{LDM}:smoke=True,steps=2,vae={vae_dir}', QUIET)
  config.evals = zoo_config.ConfigDict()
  state = train.train_and_evaluate(config, ldm_dir)
  _, _, vae_state = runs.load(vae_dir)
  assert_same(state['params']['vae'], vae_state['ema_params']['vae'])
  _, s, ldm_state = runs.load(ldm_dir)
  images = s.task.predict['sample'](ldm_state['ema_params'], jax.random.PRNGKey(0),
                                    prompts=['a red circle.'], steps=2)
  assert images.shape == (1, 64, 64, 3)
  # Inpainting on latents: the mask max-pooled to the latent grid, the known pixels pasted back.
  _assert_inpainted(s.task, ldm_state['ema_params'], (64, 64, 3), mode='blend')
  bad = zoo_config.load(f'{LDM}:smoke=True,steps=4,vae={tmp_path / "missing"}', QUIET)
  with pytest.raises(FileNotFoundError, match='missing'):
    train.train_and_evaluate(bad, str(tmp_path / 'bad'))


@pytest.mark.parametrize('change,match', [
    (lambda c: delattr(c.data, 'text'), 'needs captions'),
    (lambda c: setattr(c.model, 'context_dim', 16), 'context_dim=16 must equal'),
    (lambda c: setattr(c.task, 'train_text_encoder', False), 'text_encoder_from'),
    (lambda c: setattr(c.task, 'vae_from', ''), 'vae_from'),
    (lambda c: setattr(c.task, 'caption_dropout', 1.0), 'caption_dropout'),
    (lambda c: setattr(c.data.text, 'max_len', 40), 'exceeds'),
    (lambda c: setattr(c.data.text, 'tokenizer', 'wordpiece'), "'shapes'"),
    (lambda c: setattr(c.model, 'in_channels', 3), 'latent channels'),
    (lambda c: setattr(c.task, 'timestep_spacing', 'uniform'), 'timestep_spacing'),
    (lambda c: setattr(c.task, 'steps_offset', 1000), 'steps_offset=1000'),
    (lambda c: setattr(c.task, 'attend_padding', 'yes'), 'attend_padding must be'),
    (lambda c: setattr(c.data.text, 'pad_token', 7), 'pad_token must be'),
])
def test_bad_text_to_image_configs_fail_before_compiling(change, match):
  config = zoo_config.load(f'{LDM}:smoke=True', QUIET)
  change(config)
  with pytest.raises(ValueError, match=match):
    zoo_config.validate(config)


def test_learned_sigma_trains_and_samples_with_its_variance():
  config = zoo_config.load(os.path.join(REPO, 'experiments', 'dit_shapes.py') + ':smoke=True',
                           QUIET + ['--config.model.learn_sigma=True'])
  task = tasks.build(config)
  spec = data_lib.get_dataset(config.data, split='train', seed=0, global_batch_size=4).spec()
  batch = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x,
                        task.init(jax.random.PRNGKey(0), batch),
                        is_leaf=lambda x: hasattr(x, 'names'))
  batch['image'] = jax.random.uniform(jax.random.PRNGKey(1), batch['image'].shape) * 2 - 1
  loss, metrics = task.loss(params, batch, jax.random.PRNGKey(2))
  np.testing.assert_allclose(loss, metrics['mse'] + metrics['vlb'], rtol=1e-6)
  grads = jax.grad(lambda p: task.loss(p, batch, jax.random.PRNGKey(2))[1]['vlb'])(params)
  assert float(jnp.abs(grads['final_layer']['linear']['kernel']).max()) > 0
  labels = np.arange(2, dtype=np.int32)
  ddpm = task.sample(params, jax.random.PRNGKey(3), labels, sampler='ddpm', steps=4)
  ddim = task.sample(params, jax.random.PRNGKey(3), labels, sampler='ddim', steps=4)
  assert ddpm.shape == ddim.shape == (2, 32, 32, 3)
  bad = config.copy_and_resolve_references()
  bad.task.prediction_type = 'v'
  with pytest.raises(ValueError, match='learn_sigma=True'):
    zoo_config.validate(bad)


def test_dit_denoiser_gets_tokens_and_pooled_text():
  config = pixel_config()
  config.model = models.config('dit', preset='tiny-t2i', input_size=32, patch_size=8,
                               in_channels=3)
  task = tasks.build(zoo_config.validate(config))
  spec = data_lib.get_dataset(config.data, split='train', seed=0, global_batch_size=2).spec()
  batch = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x,
                        task.init(jax.random.PRNGKey(0), batch),
                        is_leaf=lambda x: hasattr(x, 'names'))
  assert 'pooled_embedder' in params['denoiser'] and task.use_pooled
  batch['tokens'], batch['tokens_mask'] = task.tokenizer.encode(['a red star.', 'a cat.'], 32)
  grads = jax.grad(lambda p: task.loss(p, batch, jax.random.PRNGKey(1))[0])(params)
  # adaLN-Zero: at init only the final layer gets gradient; the text encoder gets none yet.
  assert float(jnp.abs(grads['denoiser']['final_layer']['linear']['kernel']).max()) > 0
  images = task.sample(params, jax.random.PRNGKey(2), prompts=['a red star.'], steps=2)
  assert images.shape == (1, 32, 32, 3)
