"""Inpainting-trained diffusion: training masks, the zero-extended start, the CLI, errors."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from zoo import config as zoo_config
from zoo import main as zoo_main
from zoo import metrics
from zoo import runs
from zoo import tasks
from zoo.tasks import inpaint

from conftest import REPO

SPEC = os.path.join(REPO, 'experiments', 'inpaint_shapes.py')


def test_random_masks_cover_boxes_borders_and_everything():
  r = 32
  masks = np.asarray(inpaint.random_masks(jax.random.key(0), 300, r))[..., 0]
  assert masks.shape == (300, r, r) and set(np.unique(masks)) <= {0.0, 1.0}
  full = masks.all(axis=(1, 2))
  ring = ~full & (masks[:, 0, :].all(axis=1) & masks[:, :, 0].all(axis=1))
  box = ~full & ~ring
  for kind in (full, ring, box):
    assert 60 <= kind.sum() <= 140  # A third each, give or take.
  pads = [int(np.argmin(m[r // 2])) for m in masks[ring]]  # First kept column = border width.
  assert min(pads) >= r // 8 and max(pads) <= r // 4
  areas = masks[box].mean(axis=(1, 2))
  assert areas.min() >= 0.0625 * 0.8 and areas.max() <= 0.5625 * 1.2


@pytest.fixture(scope='module')
def inpaint_run(shapes_diffusion_run, tmp_path_factory):
  base = shapes_diffusion_run[0]
  workdir = tmp_path_factory.mktemp('inpaint')
  assert zoo_main.main(['train', '--config', f'{SPEC}:smoke=True,base={base}', '--workdir',
                        str(workdir), '--config.train.steps=4', '--config.evals={}',
                        '--config.mesh.data=1', '--config.train.progress_bar=false']) == 0
  return base, workdir


def test_zero_extended_start_predicts_what_the_base_does(inpaint_run):
  base, _ = inpaint_run
  config = zoo_config.load(f'{SPEC}:smoke=True,base={base}', ['--config.mesh.data=1'])
  task = tasks.build(config)
  _, base_setup, base_state = runs.load(str(base))
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  batch = {'image': x0, 'label': jnp.array([1, 5])}
  params = task.after_pretrained(nn.unbox(jax.jit(task.init)(jax.random.key(0), batch)))
  t = jnp.array([10, 900])
  mask = inpaint.random_masks(jax.random.key(1), 2, 32)
  ours = jax.jit(task.model.apply)({'params': params}, inpaint.model_input(x0, mask, x0), t,
                                   labels_B=batch['label'])
  theirs = jax.jit(base_setup.task.model.apply)({'params': base_state['ema_params']}, x0, t,
                                                labels_B=batch['label'])
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)
  assert not np.any(np.asarray(params['conv_in']['kernel'])[:, :, 3:])


def test_inpaint_run_keeps_known_pixels_and_samples(inpaint_run, tmp_path, capsys):
  _, workdir = inpaint_run
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 4:20] = 255
  Image.fromarray(image).save(tmp_path / 'in.png')
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  common = ['sample', '--workdir', str(workdir), '--num', '2', '--label', '2', '--steps', '3',
            '--upscale', '1']
  assert zoo_main.main([*common, '--mode', 'inpaint', '--image', str(tmp_path / 'in.png'),
                        '--mask', str(tmp_path / 'mask.png'),
                        '--out', str(tmp_path / 'out.png')]) == 0
  grid = np.asarray(Image.open(tmp_path / 'out.png'))
  keep = mask == 0
  for k in (1, 2):
    tile = grid[1:33, 1 + 33 * k:33 * (k + 1)]
    np.testing.assert_array_equal(tile[keep], image[keep])
    assert np.any(tile[~keep] != image[~keep])
  capsys.readouterr()
  assert zoo_main.main([*common, '--mode', 'inpaint', '--method', 'repaint', '--image',
                        str(tmp_path / 'in.png'), '--mask', str(tmp_path / 'mask.png'),
                        '--out', str(tmp_path / 'bad.png')]) == 2
  assert "inpaints with mode='model'" in capsys.readouterr().err
  assert [r['step'] for r in metrics.read_jsonl(workdir / 'metrics.jsonl') if 'loss' in r]


def test_config_errors(inpaint_run, tmp_path):
  base, _ = inpaint_run
  with pytest.raises(ValueError, match=r'in_channels=3 must be 2C \+ 1 = 7'):
    zoo_config.load(f'{SPEC}:smoke=True', ['--config.model.in_channels=3'])
  with pytest.raises(ValueError, match=r"differs from the base run .*\['block_out_channels'"):
    zoo_config.load(f'{SPEC}:smoke=True,base={base}', ['--config.model.block_out_channels=(8, 16)',
                                                      '--config.model.norm_num_groups=8'])
  config = zoo_config.load(f'{SPEC}:smoke=True,base={tmp_path}/none')
  with pytest.raises(FileNotFoundError, match='is not a zoo run'):
    tasks.build(config)


def test_inpaint_evaluator_keeps_the_outside_and_scores(inpaint_run, tmp_path):
  from zoo.evals import inpaint as inpaint_eval
  _, workdir = inpaint_run
  config, s, state = runs.load(str(workdir))
  cfg = zoo_config.ConfigDict(dict(
      type='inpaint', split='validation', num_samples=4, batch_size=4, sampler='ddim', steps=2,
      guidance_scale=1.0, use_ema=True, seed=0, method='', pad=4, grid=4, upscale=1))
  inpaint_eval.InpaintQuality.check(cfg, config, 'config.evals.x')
  out = inpaint_eval.InpaintQuality(cfg, task=s.task, config=config,
                                    workdir=str(tmp_path)).run(state, 4)
  assert out['outside_max_diff'] == 0.0
  assert 0.0 <= out['inpaint_overall'] <= 1.0 and out['outpaint_mse'] > 0
  assert (tmp_path / 'inpaint' / 'step_000004.png').exists()
  masks = inpaint_eval.object_masks([{'objects': {'size': [0, 2], 'box': [
      [0, 0, 0.25, 0.25], [0.5, 0.25, 0.75, 0.5]]}}], 16)
  assert masks[0, :, :, 0].sum() == 6 * 6 and masks[0, 7:13, 3:9].all()
  bad = zoo_config.ConfigDict(cfg.to_dict() | {'pad': 16})
  with pytest.raises(ValueError, match=r'pad=16 must lie in \[1, 15\]'):
    inpaint_eval.InpaintQuality.check(bad, config, 'config.evals.x')
