"""Pre-computed latents: a latent-diffusion experiment's VAE encodes its dataset once.

  zoo latents --config experiments/ldm_t2i_shapes.py --out latents/shapes64

writes `tfds:zoo_latents` into --out (see `data/latents.py`): the source splits' images,
captions and labels plus each image's posterior moments from the experiment's frozen VAE
(`config.task.vae_from`, EMA params, as the run itself loads them). A run then reads them with
`config.data = latents_data(config.data, out)` and `config.task.latent_key = MOMENTS`
(experiments/ldm_t2i_shapes.py:latents=DIR does both) and skips the encoder at every step. It
checks before training that the VAE it loads is the one that wrote the latents.
"""

import hashlib
import json
import logging
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data import latents as latents_data_lib
from data import pipeline
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import tasks

log = logging.getLogger('zoo')
MOMENTS = latents_data_lib.MOMENTS
# VAE fields that change the scaled latent but not the stored (un-scaled) posterior.
SCALE_FIELDS = ('scaling_factor', 'shift_factor')


def fingerprint(params) -> str:
  """sha256 over a param tree's paths, dtypes, shapes and values."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.asarray(jax.device_get(leaf))
    digest.update(f'{checkpoint.path_str(path)}:{value.dtype}:{value.shape};'.encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def vae_architecture(vae_cfg) -> dict:
  """The VAE config without the latent scale and shift (which cached moments do not depend on)."""
  return {k: v for k, v in vae_cfg.to_dict().items() if k not in SCALE_FIELDS}


def latents_data(data_cfg, out_dir: str):
  """`data_cfg` reading the latents written to `out_dir` instead of its source dataset."""
  data = zoo_config.from_json(zoo_config.to_json(data_cfg))
  data.name = f'tfds:{latents_data_lib.NAME}'
  data.data_dir = out_dir
  data.builder_config = ''
  data.features = tuple(data.features) + (latents_data_lib.MOMENTS,)
  return data


def is_latents(data_cfg) -> bool:
  return data_cfg.name == f'tfds:{latents_data_lib.NAME}'


def source_data(data_cfg):
  """The data config the latents in `data_cfg` were encoded from (`data_cfg` if not latents).

  Record i of a latents split is record i of the source split, so evaluators that need the
  source's ground truth (the shapes scorer) read it there.
  """
  if not is_latents(data_cfg):
    return data_cfg
  record = latents_data_lib.read_provenance(data_cfg.data_dir)
  if 'data' not in record:
    raise ValueError(f'{data_cfg.data_dir}: vae.json does not record its source data config; '
                     're-run `zoo latents`')
  return zoo_config.from_json(json.dumps(record['data']))


def _load_vae(task, image_shape):
  source = task.pretrained['vae']
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = nn.unbox(jax.eval_shape(task.vae.init, jax.random.PRNGKey(0),
                                     jnp.zeros((1, *image_shape), jnp.float32))['params'])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  return checkpoint.load_params(os.path.join(source.workdir, 'checkpoints'), abstract,
                                use_ema=source.use_ema, subtree=source.subtree)


def precompute(config, out_dir: str, *, splits=(), batch_size: int = 64):
  """Encodes `splits` (default: the train and eval splits) of `config.data`; returns the builder."""
  zoo_config.validate(config)
  if config.task.name != 'text_to_image' or not config.task.vae:
    raise ValueError('zoo latents needs a latent-diffusion experiment: config.task.name '
                     f"'text_to_image' with a config.task.vae (got {config.task.name!r})")
  if config.task.get('latent_key', ''):
    raise ValueError('config.task.latent_key is set: this experiment already reads latents; '
                     'pass it without latents=...')
  if config.data.get('mixture', ''):
    raise ValueError(f'config.data.mixture={config.data.mixture!r}: latents are encoded from one '
                     'builder config (record i of the cache is record i of its source); set '
                     'config.data.builder_config instead')
  data = config.data
  source = pipeline.get_builder(data)
  splits = tuple(dict.fromkeys(splits or (data.train_split, data.eval_split)))
  for split in splits:
    if split not in source.info.splits:
      raise ValueError(f'split {split!r} is not in {source.info.full_name}: '
                       f'{sorted(source.info.splits)}')
  task = tasks.build(config)
  channels = source.info.features[data.image_key].shape[-1]
  params = _load_vae(task, (data.resolution, data.resolution, channels))

  @jax.jit
  def encode_fn(images_NxRxRxC):
    mean, logvar = task.vae.apply({'params': params}, images_NxRxRxC, method='encode')
    return jnp.concatenate([mean, logvar], axis=-1)

  def encode(examples):
    images = np.stack([pipeline.preprocess(ex, image_key=data.image_key, label_key='',
                                           resolution=data.resolution)['image']
                       for ex in examples])
    n = len(images)
    if n < batch_size:  # One compiled shape: pad the last batch.
      images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                images.dtype)])
    return np.asarray(encode_fn(images))[:n]

  moments_shape = jax.eval_shape(
      encode_fn, jax.ShapeDtypeStruct((1, data.resolution, data.resolution, channels),
                                      jnp.float32)).shape[1:]
  keep = [data.image_key, *([data.label_key] if data.label_key else []),
          *([data.text.caption_key] if 'text' in data else []), *data.features]
  provenance = dict(
      vae_from=os.path.abspath(task.pretrained['vae'].workdir),
      use_ema=task.pretrained['vae'].use_ema, fingerprint=fingerprint(params),
      vae=vae_architecture(config.task.vae), source=source.info.full_name,
      resolution=data.resolution, splits=list(splits), data=json.loads(zoo_config.to_json(data)))
  log.info('encoding %s of %s with the VAE of %s', splits, source.info.full_name,
           provenance['vae_from'])
  return latents_data_lib.write(
      out_dir, provenance, source=source, image_key=data.image_key, keep=dict.fromkeys(keep),
      encode=encode, moments_shape=moments_shape, splits=splits, batch_size=batch_size)


def check_provenance(config):
  """Raises unless config.data.data_dir holds latents of config.task.vae at this resolution."""
  record = latents_data_lib.read_provenance(config.data.data_dir)
  where = os.path.join(config.data.data_dir, latents_data_lib.NAME)
  if record['resolution'] != config.data.resolution:
    raise ValueError(f'the latents in {where} were encoded at {record["resolution"]}px but '
                     f'config.data.resolution={config.data.resolution}')
  ours = vae_architecture(config.task.vae)
  differing = sorted(k for k in set(ours) | set(record['vae'])
                     if _plain(ours.get(k)) != _plain(record['vae'].get(k)))
  if differing:
    raise ValueError(f'the latents in {where} come from another VAE architecture: '
                     f'config.task.vae differs in {differing}')
  return record


def _plain(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def check_vae_params(record, vae_params, data_dir):
  """Raises unless `vae_params` are the params that encoded the latents of `record`."""
  ours = fingerprint(vae_params)
  if ours != record['fingerprint']:
    raise ValueError(
        f'the latents in {data_dir} were encoded by the VAE of {record["vae_from"]} '
        f'(params {record["fingerprint"][:12]}), not by the VAE this run loads '
        f'(params {ours[:12]}): re-run `zoo latents` for this VAE, or drop latents=')
