"""The model registry: `config.model.name` -> Linen module class and its config check."""

import dataclasses
import types
import typing

from zoo import config as zoo_config
from zoo.models import classifier
from zoo.models import controlnet
from zoo.models import dit
from zoo.models import dual_encoder
from zoo.models import text
from zoo.models import unet
from zoo.models import vae
from zoo.models import vit
from zoo.models import vlm


class Entry(typing.NamedTuple):
  module: type  # The Linen module class.
  check_config: typing.Callable  # (model_kwargs, resolution) -> None, raises ValueError.
  preset: typing.Callable  # name -> {field: value}
  # Fields holding a sub-model's kwargs -> that sub-model's name (a dual encoder's towers).
  nested: typing.Mapping[str, str] = types.MappingProxyType({})


MODELS = {
    'classifier': Entry(classifier.Classifier, classifier.check_config, classifier.preset),
    'unet': Entry(unet.UNet, unet.check_config, unet.preset),
    'dit': Entry(dit.DiT, dit.check_config, dit.preset),
    'controlnet': Entry(controlnet.ControlNet, controlnet.check_config_unet, unet.preset),
    'dit_controlnet': Entry(controlnet.DiTControlNet, controlnet.check_config_dit, dit.preset),
    'vae': Entry(vae.AutoencoderKL, vae.check_config, vae.preset),
    'text': Entry(text.TextTransformer, text.check_config, text.preset),
    'vit': Entry(vit.ViT, vit.check_config, vit.preset),
    'vlm': Entry(vlm.VLM, vlm.check_config, vlm.preset),
    'dual_encoder': Entry(dual_encoder.DualEncoder, dual_encoder.check_config,
                          dual_encoder.preset, {'image': 'vit', 'text': 'text'}),
}


def _module(name):
  if name not in MODELS:
    raise ValueError(f'config.model.name={name!r} is not one of {sorted(MODELS)}')
  return MODELS[name]


def fields(name):
  """{field: default} of the model's Linen dataclass (its config keys besides `name`)."""
  cls = _module(name).module
  skip = {'parent', 'name'}
  return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
          for f in dataclasses.fields(cls) if f.init and f.name not in skip}


def check_config(model_config, resolution):
  """Unknown keys, wrong types and impossible shapes of `config.model`, before compilation."""
  name = model_config.get('name', None)
  allowed = fields(name)
  schema = {'name': str} | {k: _types_of(v) for k, v in allowed.items()}
  zoo_config.check_keys(model_config, 'model', schema)
  for key, sub in _module(name).nested.items():
    _check_nested(model_config[key], f'model.{key}', sub)
  _module(name).check_config(kwargs(model_config), resolution)


def _check_nested(section, where, name):
  """Unknown keys and wrong types of a sub-model's kwargs; absent keys take its defaults."""
  allowed = fields(name)
  unknown = sorted(set(section.keys()) - set(allowed))
  if unknown:
    raise ValueError(f'unknown key(s) {unknown} in config.{where}; allowed: {sorted(allowed)}')
  zoo_config.check_keys(section, where, {k: _types_of(allowed[k]) for k in section.keys()})


def config(name, preset=None, **overrides):
  """A complete `config.model` for experiment files: defaults, then a preset, then overrides.

  A sub-model's kwargs (a dual encoder's `image` / `text`) merge with the preset's, so
  `config('dual_encoder', 'clip-tiny', image={'patch_size': 4})` changes one key.
  """
  module = _module(name)
  values = fields(name) | (module.preset(preset) if preset else {})
  for key, value in overrides.items():
    if key in module.nested and isinstance(values.get(key), dict):
      value = values[key] | dict(value)
    values[key] = value
  unknown = set(values) - set(fields(name))
  if unknown:
    raise ValueError(f'unknown {name} field(s) {sorted(unknown)}; allowed: {sorted(fields(name))}')
  return zoo_config.ConfigDict({'name': name, **values})


def kwargs(model_config):
  """The module's constructor arguments from `config.model` (nested ConfigDicts -> dicts)."""
  return {k: v.to_dict() if isinstance(v, zoo_config.ConfigDict) else v
          for k, v in model_config.items() if k != 'name'}


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
  if isinstance(default, dict):
    return (dict, zoo_config.ConfigDict)
  return type(default)
