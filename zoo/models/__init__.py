"""The model registry: `config.model.name` -> Linen module class and its config check."""

import dataclasses
import typing

from zoo import config as zoo_config
from zoo.models import classifier
from zoo.models import dit
from zoo.models import text
from zoo.models import unet
from zoo.models import vae


class Entry(typing.NamedTuple):
  module: type  # The Linen module class.
  check_config: typing.Callable  # (model_kwargs, resolution) -> None, raises ValueError.
  preset: typing.Callable  # name -> {field: value}


MODELS = {
    'classifier': Entry(classifier.Classifier, classifier.check_config, classifier.preset),
    'unet': Entry(unet.UNet, unet.check_config, unet.preset),
    'dit': Entry(dit.DiT, dit.check_config, dit.preset),
    'vae': Entry(vae.AutoencoderKL, vae.check_config, vae.preset),
    'text': Entry(text.TextTransformer, text.check_config, text.preset),
}


def _module(name):
  if name not in MODELS:
    raise ValueError(f'config.model.name={name!r} is not one of {sorted(MODELS)}')
  return MODELS[name]


def fields(name):
  """{field: default} of the model's Linen dataclass (its config keys besides `name`)."""
  cls = _module(name).module
  skip = {'parent', 'name'}
  return {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.name not in skip}


def check_config(model_config, resolution):
  """Unknown keys, wrong types and impossible shapes of `config.model`, before compilation."""
  name = model_config.get('name', None)
  allowed = fields(name)
  schema = {'name': str} | {k: _types_of(v) for k, v in allowed.items()}
  zoo_config.check_keys(model_config, 'model', schema)
  _module(name).check_config(kwargs(model_config), resolution)


def config(name, preset=None, **overrides):
  """A complete `config.model` for experiment files: defaults, then a preset, then overrides."""
  module = _module(name)
  values = fields(name) | (module.preset(preset) if preset else {}) | overrides
  unknown = set(values) - set(fields(name))
  if unknown:
    raise ValueError(f'unknown {name} field(s) {sorted(unknown)}; allowed: {sorted(fields(name))}')
  return zoo_config.ConfigDict({'name': name, **values})


def kwargs(model_config):
  """The module's constructor arguments from `config.model`."""
  return {k: v for k, v in model_config.items() if k != 'name'}


def build(model_config):
  """The Linen module described by `config.model`."""
  return _module(model_config.name).module(**kwargs(model_config))


def _types_of(default):
  if isinstance(default, bool):
    return bool
  if isinstance(default, float):
    return (float, int)
  if default is None:
    return object
  return type(default)
