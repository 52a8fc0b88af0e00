"""Experiment files: loading, typed arguments, command-line overrides and validation.

An experiment is `experiments/NAME.py` with `get_config(arg)`. It is addressed as
`experiments/NAME.py:key=value,...`; the part after the colon reaches `get_config` as a string
that the file parses with `parse_arg`. Overrides `--config.a.b=V` are applied on top. Every
config is validated by `validate` before anything is built or compiled, so a typo fails in
milliseconds with the key and the allowed values named.
"""

import ast
import importlib.util
import json
import os

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Engine sections and their keys -> accepted python types. Model, task, data and evaluator
# sections are checked by their own owners (see `validate`).
_TOP = {
    'seed': int, 'model': ConfigDict, 'task': ConfigDict, 'data': ConfigDict,
    'optim': ConfigDict, 'evals': ConfigDict, 'train': ConfigDict, 'mesh': ConfigDict,
    'sharding_rules': ConfigDict, 'init_from': str, 'distributed': ConfigDict,
    'lora': ConfigDict,
}
_SECTIONS = {
    'train': {
        'steps': int, 'batch_size': int, 'grad_accum': int, 'log_every': int,
        'checkpoint_every': int, 'eval_every': int, 'max_to_keep': int,
        'async_checkpointing': bool, 'progress_bar': bool,
    },
    'optim': {
        'name': str, 'lr': float, 'schedule': str, 'warmup_steps': int, 'end_lr_factor': float,
        'b1': float, 'b2': float, 'eps': float, 'weight_decay': float,
        'grad_clip_norm': float, 'ema_decay': float,
    },
    'mesh': {'data': int, 'fsdp': int, 'tensor': int},
    'distributed': {
        'coordinator_address': str, 'num_processes': int, 'process_id': int,
    },
    'data': {
        'name': str, 'data_dir': (str, type(None)), 'resolution': int, 'image_key': str,
        'label_key': str, 'builder_config': str, 'train_split': str, 'eval_split': str,
        'features': tuple,
    },
}
# Optional `config.data.text`: captions tokenized into `tokens` / `tokens_mask` batch arrays.
_DATA_TEXT = {'caption_key': str, 'tokenizer': str, 'tokenizer_path': str, 'max_len': int}
# 'pad_token' ('clip' tokenizers); colour-blind views of image and caption (data/captions.py).
_DATA_TEXT_OPTIONAL = {'pad_token': str, 'colour_blind': float, 'colour_words': tuple}
# Optional `config.data.qa`: question/answer pairs as `qa_*` batch arrays (data/qa.py).
_DATA_QA = {'tokenizer': str, 'tokenizer_path': str, 'max_len': int, 'types': tuple}
# Optional engine keys and their defaults, filled in before overrides so the CLI can set them
# (runs saved before a key existed load without it).
_OPTIONAL = {'optim': {'lr_mults': ()}}
OPTIMIZERS = ('adamw', 'adam', 'sgd')
LR_SCHEDULES = ('constant', 'cosine', 'linear')
MESH_AXES = ('data', 'fsdp', 'tensor')


def load(spec, overrides=(), validate_config=True):
  """Loads `path.py[:arg]` (or a run's `config.json`), applies `--config.a.b=V` style overrides
  and validates."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'experiment file not found: {path!r}')
  if path.endswith('.json'):
    if arg:
      raise ValueError(f'{spec}: a config.json takes no :arguments; use --config.a.b=V')
    with open(path) as f:
      config = from_json(f.read())
  else:
    module = experiment_module(path)
    if not hasattr(module, 'get_config'):
      raise ValueError(f'{path} defines no get_config(arg)')
    config = module.get_config(arg or None)
  for name, defaults in _OPTIONAL.items():
    if isinstance(config.get(name), ConfigDict):
      for key, value in defaults.items():
        if key not in config[name]:
          config[name][key] = value
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'override {item!r} must look like config.a.b=VALUE')
    override(config, key.removeprefix('--').removeprefix('config.'), value)
  if validate_config:  # Callers that change sections first (zoo convert) validate after.
    validate(config)
  return config


def experiment_module(path, name='zoo_experiment'):
  """The experiment file at `path` as a module (experiment files may build on each other)."""
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def sibling(file, name):
  """experiments/<name>.py as a module, from the experiment file `file` (its `__file__`)."""
  return experiment_module(os.path.join(os.path.dirname(os.path.abspath(file)), f'{name}.py'),
                           name)


def parse_arg(arg, **defaults):
  """Parses `a=1,b=True` into a ConfigDict typed like `defaults` (big_vision's `parse_arg`)."""
  out = ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown experiment argument {key!r}; allowed: {sorted(defaults)}')
    out[key] = _coerce(defaults[key], value if sep else 'True', key)
  return out


def override(config, dotted_key, value):
  """Sets `config.<dotted_key>` from a string, typed like the value it replaces."""
  *parents, leaf = dotted_key.split('.')
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ConfigDict) or name not in node:
      raise ValueError(f'unknown config key {".".join(parents[:i + 1])!r}; allowed: '
                       f'{sorted(node.keys()) if isinstance(node, ConfigDict) else []}')
    node = node[name]
  if not isinstance(node, ConfigDict) or leaf not in node:
    raise ValueError(f'unknown config key {dotted_key!r}; allowed at that level: '
                     f'{sorted(node.keys()) if isinstance(node, ConfigDict) else []}')
  with node.ignore_type():
    node[leaf] = _coerce(node[leaf], value, dotted_key)


def _coerce(current, text, key):
  """Parses `text` into the type of `current`."""
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'config key {key!r} takes a bool, got {text!r}')
    return text.lower() in ('true', '1')
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ValueError(f'config key {key!r} takes a {type(current).__name__}, got {text!r}') from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, (list, tuple)):
    value = tuple(value)
  if isinstance(current, ConfigDict) and isinstance(value, dict):
    value = ConfigDict(value)
  if current is not None and not isinstance(value, type(current)):
    raise ValueError(f'config key {key!r} takes a {type(current).__name__}, got {text!r}')
  return value


def check_keys(section, name, schema):
  """Raises ValueError for keys of `section` missing from or unknown to `schema`, or mistyped."""
  keys = set(section.keys())
  where = name if name.startswith('config') else f'config.{name}'
  unknown = keys - set(schema)
  if unknown:
    raise ValueError(f'unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(schema)}')
  for key, types in schema.items():
    if key not in keys:
      raise ValueError(f'{where}.{key} is missing (every default lives in the experiment file)')
    value = section[key]
    if isinstance(value, int) and not isinstance(value, bool) and float in _as_tuple(types):
      continue
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
      raise ValueError(f'{where}.{key} must be {_type_names(types)}, got {value!r}')


def check_choice(value, allowed, key):
  """Raises ValueError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(f'{key}={value!r} is not one of {list(allowed)}')


def validate(config):
  """Checks every key, type, name and shape of an experiment before anything compiles."""
  # Imported here: the registries import the models, which import this module's helpers.
  from zoo import evals, optim, tasks
  import data as data_lib

  unknown = set(config.keys()) - set(_TOP)
  if unknown:
    raise ValueError(f'unknown top-level config key(s) {sorted(unknown)}; allowed: {sorted(_TOP)}')
  missing = set(_TOP) - {'init_from', 'distributed', 'lora'} - set(config.keys())
  if missing:
    raise ValueError(f'config is missing {sorted(missing)}')
  check_keys(config, 'config', {k: _TOP[k] for k in config.keys()})
  for name, schema in _SECTIONS.items():
    if name in config:
      check_keys(config[name], name, schema | _optional_sections(config[name], name))
  if 'text' in config.data:
    optional = {k: t for k, t in _DATA_TEXT_OPTIONAL.items() if k in config.data.text}
    check_keys(config.data.text, 'data.text', _DATA_TEXT | optional)
  if 'qa' in config.data:
    check_keys(config.data.qa, 'data.qa', _DATA_QA)
  _check_train(config.train)
  check_choice(config.optim.name, OPTIMIZERS, 'config.optim.name')
  check_choice(config.optim.schedule, LR_SCHEDULES, 'config.optim.schedule')
  optim.check_lr_mults(config.optim.get('lr_mults', ()))
  _check_mesh(config)
  data_lib.check_config(config.data)
  tasks.check_config(config)
  evals.check_config(config)
  return config


def _optional_sections(section, name):
  """Optional keys of config.data: `text`, `qa` (token arrays), `mixture` (data/pipeline.py);
  of config.optim: `lr_mults`."""
  if name == 'optim':
    return {'lr_mults': tuple} if 'lr_mults' in section else {}
  if name != 'data':
    return {}
  optional = (('text', ConfigDict), ('qa', ConfigDict), ('mixture', str))
  return {k: t for k, t in optional if k in section}


def _check_train(train):
  for key in ('steps', 'batch_size', 'grad_accum', 'log_every', 'checkpoint_every',
              'eval_every', 'max_to_keep'):
    if train[key] < (0 if key in ('steps', 'eval_every') else 1):
      raise ValueError(f'config.train.{key} must be positive, got {train[key]}')
  if train.batch_size % train.grad_accum:
    raise ValueError(f'config.train.batch_size={train.batch_size} is not divisible by '
                     f'config.train.grad_accum={train.grad_accum}')


def _check_mesh(config):
  sizes = [config.mesh[a] for a in MESH_AXES]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f'config.mesh sizes must be positive or a single -1, got {dict(config.mesh)}')
  for logical, axis in config.sharding_rules.items():
    for a in _as_tuple(axis):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f'config.sharding_rules.{logical}={axis!r}: mesh axes are {MESH_AXES}')


def to_json(config):
  """A JSON string of the config (tuples become lists; `from_json` restores them)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text):
  """The inverse of `to_json`: lists become tuples again, as experiment files write them."""
  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x
  return ConfigDict(fix(json.loads(text)))


def run_config(workdir, key, hint):
  """The config a finished run `workdir` saved (its config.json), for a task that builds on it.

  `key` names the setting that pointed here and `hint` says how to make such a run, for the
  FileNotFoundError when `workdir` is not a run.
  """
  config = existing_run_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{key}={workdir!r} is not a zoo run (no '
                            f'{os.path.join(workdir, "config.json")}); {hint}')
  return config


def existing_run_config(workdir):
  """The config.json of the run `workdir`, or None where there is no run (yet)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return from_json(f.read())


def _as_tuple(x):
  return x if isinstance(x, tuple) else (x,)


def _type_names(types):
  return ' or '.join(t.__name__ for t in _as_tuple(types))
