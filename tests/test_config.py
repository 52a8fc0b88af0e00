"""Experiment files load, and every user mistake in a config fails early with a clear message."""

import glob
import os
import re

import pytest

from zoo import config as zoo_config

from conftest import REPO

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, 'experiments', '*.py')))


def _documented_specs(path):
  """The `--config experiments/X.py[:args]` specs written in an experiment's docstring."""
  with open(path) as f:
    text = f.read()
  specs = re.findall(r'--config (experiments/\S+\.py(?::\S+)?)', text)
  return [os.path.join(REPO, s) for s in specs]


def test_there_are_experiments():
  assert any(p.endswith('quickstart.py') for p in EXPERIMENTS)


@pytest.mark.parametrize('path', EXPERIMENTS, ids=os.path.basename)
def test_experiment_loads_with_smoke(path):
  config = zoo_config.load(f'{path}:smoke=True')
  assert config.train.steps <= 100


@pytest.mark.parametrize('path', EXPERIMENTS, ids=os.path.basename)
def test_experiment_loads_with_documented_arguments(path):
  specs = _documented_specs(path)
  assert specs, f'{path} docstring shows no `zoo train --config ...` command'
  for spec in specs:
    config = zoo_config.load(spec)
    assert config.train.steps > 0


def _quickstart():
  return os.path.join(REPO, 'experiments', 'quickstart.py')


def test_override_types_and_values():
  config = zoo_config.load(f'{_quickstart()}:smoke=True', [
      '--config.train.steps=7', '--config.optim.lr=1', '--config.model.block_out_channels=(16,32)',
      '--config.train.async_checkpointing=false', '--config.init_from=/x'])
  assert config.train.steps == 7
  assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
  assert config.model.block_out_channels == (16, 32)
  assert config.train.async_checkpointing is False
  assert config.init_from == '/x'


@pytest.mark.parametrize('overrides, match', [
    (['--config.train.stepz=3'], r"unknown config key 'train.stepz'.*steps"),
    (['--config.nope.a=3'], r"unknown config key 'nope'.*train"),
    (['--config.train.steps=abc'], r"'train.steps' takes a int"),
    (['--config.train.steps=1.5'], r"'train.steps' takes a int"),
    (['--config.model.name=vit9'], r"config.model.name='vit9' is not one of \['unet', 'dit'\]"),
    (['--config.task.name=gan'],
     r"config.task.name='gan' is not one of \['classification', 'consistency_distillation', "
     r"'contrastive', 'controlnet', 'diffusion', 'inpaint', 'progressive_distillation', "
     r"'text_controlnet', 'text_to_image', 'vae', 'vlm'\]"),
    (['--config.task.sampler=plms'],
     r"config.task.sampler='plms' is not one of \['ddpm', 'ddim', 'dpmpp_2m', 'euler', 'heun'\]"),
    (['--config.task.schedule=sqrt'], r"config.task.schedule='sqrt' is not one of"),
    (['--config.optim.name=lion'], r"config.optim.name='lion' is not one of"),
    (['--config.data.resolution=17'], r'resolution'),
    (['--config.train.batch_size=6', '--config.train.grad_accum=4'], r'not divisible'),
    (['--config.mesh.data=-1', '--config.mesh.fsdp=-1'], r'single -1'),
    (['--config.sharding_rules.embed=model'], r'mesh axes are'),
    (['--config.evals.samples.labels=(3,12)'], r'\[12\] are not class ids'),
    (['--config.evals.samples.type=fid9'], r"type='fid9' is not one of"),
    (['--config.task.sample_steps=5000'], r'sample_steps=5000'),
    (['--config.data.name=imagenet'], r"imagenet"),
])
def test_config_errors_name_the_key_and_allowed_values(overrides, match):
  with pytest.raises(ValueError, match=match):
    zoo_config.load(f'{_quickstart()}:smoke=True', overrides)


def test_unknown_experiment_argument():
  with pytest.raises(ValueError, match=r"unknown experiment argument 'smok'.*smoke"):
    zoo_config.load(f'{_quickstart()}:smok=True')


def test_a_controlnet_base_experiment_takes_only_the_families_it_trains():
  path = os.path.join(REPO, 'experiments', 'control_seg_shapes.py')
  assert zoo_config.load(f'{path}:smoke=True,on=dit_shapes').model.name == 'dit_controlnet'
  assert zoo_config.load(f'{path}:smoke=True').model.name == 'controlnet'
  with pytest.raises(ValueError, match=r"on=dit_shapes model='unet' is not one of \['dit'\]"):
    zoo_config.load(f'{path}:smoke=True,on=dit_shapes,model=unet')


def test_unknown_keys_written_in_a_file_are_caught():
  config = zoo_config.load(f'{_quickstart()}:smoke=True')
  config.train.unlisted = 3
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['unlisted'\] in config.train"):
    zoo_config.validate(config)
  del config.train['unlisted']
  config.model.channels = 3
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['channels'\] in config.model"):
    zoo_config.validate(config)
  del config.model['channels']
  config.extra = 1
  with pytest.raises(ValueError, match=r"unknown top-level config key\(s\) \['extra'\]"):
    zoo_config.validate(config)


def test_wrong_type_in_file():
  config = zoo_config.load(f'{_quickstart()}:smoke=True')
  with config.train.ignore_type():
    config.train.steps = '10'
  with pytest.raises(ValueError, match=r'config.train.steps must be int'):
    zoo_config.validate(config)


def test_missing_experiment_file():
  with pytest.raises(FileNotFoundError, match='nope.py'):
    zoo_config.load('experiments/nope.py')


def test_json_round_trip_keeps_tuples():
  config = zoo_config.load(f'{_quickstart()}:smoke=True')
  again = zoo_config.from_json(zoo_config.to_json(config))
  zoo_config.validate(again)
  assert again.model.block_out_channels == config.model.block_out_channels
  assert again.to_dict() == config.to_dict()
