"""Semantic search over a dual encoder's embeddings: embedding collections, the index, top-k.

Legend: N items, E embedding width, Q queries, K results, G global batch, L per-process rows,
S shards of the item axis.

An index is a directory: `embeddings.safetensors` (one NxE float32 tensor 'embeddings', the
L2-normalised image embeddings) and `manifest.json` (the run's workdir, checkpoint step, params
fingerprint, what was embedded, and one entry per item: id, path or caption). It is written to
a temporary directory beside its destination and renamed into place, so a reader never sees a
half-written index. A search reloads the run named in the manifest at the manifest's step and
refuses to score with params whose fingerprint differs from the ones that made the index.

Scores are exact inner products. The index rows are sharded over every device (padded to a
multiple of S); each shard keeps its own top K under `shard_map` and the global top K is taken
from the S*K candidates, so the result equals an unsharded top K, ties going to the lower id.

`embed` is also what the zero-shot and retrieval evaluators run: every process loads only the
rows of each global batch that its devices hold, and the outputs are gathered to every process.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.sharding import NamedSharding, PartitionSpec as P

from zoo import config as zoo_config
from zoo import metrics
from zoo import embedding
from zoo import sharding

FORMAT = 'zoo-index/1'
EMBEDDINGS_FILE = 'embeddings.safetensors'
MANIFEST_FILE = 'manifest.json'
ITEMS = 'items'  # The one axis of the search mesh.
TASKS = ('contrastive',)  # Tasks with predict['encode_image'] and predict['encode_text'].
_MANIFEST_KEYS = ('format', 'workdir', 'step', 'use_ema', 'fingerprint', 'resolution', 'source',
                  'count', 'dim', 'sha256', 'items')




# ---------------------------------------------------------------------------------------------
# The run an index belongs to.

def fingerprint(params):
  """sha256 (hex) of a params tree's paths, shapes, dtypes and values: which model this is."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(sharding.host_gather(params))[0]
  for path, x in leaves:
    x = np.ascontiguousarray(x)
    digest.update(f'{jax.tree_util.keystr(path)}{x.shape}{x.dtype};'.encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass
class Run:
  """A dual-encoder run loaded for embedding: its task, params and where they came from."""
  workdir: str
  step: int
  use_ema: bool
  config: object
  task: object
  params: object
  mesh: jax.sharding.Mesh
  channels: int

  @property
  def resolution(self):
    """Image side the run was trained at."""
    return self.config.data.resolution

  def fingerprint(self):
    """`fingerprint` of the params this run embeds with."""
    return fingerprint(self.params)


def load_run(workdir, step=None, use_ema=True):
  """The contrastive run in `workdir` at checkpoint `step` (default latest)."""
  from zoo import runs  # Here: runs imports the evaluators, which import this module.
  if step is not None and not os.path.isdir(os.path.join(workdir, 'checkpoints', str(step))):
    raise FileNotFoundError(f'checkpoint step {step} of {workdir!r} is gone (the index was made '
                            'from it): rebuild the index with `zoo index`')
  config, s, state = runs.load(workdir, step)
  if config.task.name not in TASKS:
    raise ValueError(f'{workdir} is a {config.task.name!r} run; search needs a dual encoder '
                     f'(config.task.name in {list(TASKS)})')
  return Run(os.path.abspath(workdir), int(np.asarray(state['step'])), use_ema, config, s.task,
             state['ema_params' if use_ema else 'params'], s.mesh,
             s.abstract_batch['image'].shape[-1])


# ---------------------------------------------------------------------------------------------
# The index on disk.

@dataclasses.dataclass
class Index:
  """A loaded index: NxE float32 embeddings and the manifest describing them."""
  path: str
  embeddings_NxE: np.ndarray
  manifest: dict


def _sha256_file(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def write_index(out, embeddings_NxE, manifest, overwrite=False):
  """Writes an index directory atomically (temporary directory, then rename); returns `out`."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'{out} exists; pass --overwrite to replace it')
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    tmp_embeddings = os.path.join(tmp, EMBEDDINGS_FILE)
    safetensors.numpy.save_file({'embeddings': np.ascontiguousarray(embeddings_NxE, np.float32)},
                                tmp_embeddings)
    manifest = dict(manifest, format=FORMAT, count=int(embeddings_NxE.shape[0]),
                    dim=int(embeddings_NxE.shape[1]), sha256=_sha256_file(tmp_embeddings))
    with open(os.path.join(tmp, MANIFEST_FILE), 'w') as f:
      json.dump(manifest, f, indent=1)
    old = None
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.old-', dir=parent)
      os.rename(out, os.path.join(old, 'index'))
    os.rename(tmp, out)
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def read_manifest(path):
  """The checked manifest of the index directory `path` (its embeddings are not read)."""
  manifest_path = os.path.join(path, MANIFEST_FILE)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'index {path!r} not found (make one with `zoo index`)')
  for p in (manifest_path, os.path.join(path, EMBEDDINGS_FILE)):
    if not os.path.isfile(p):
      raise FileNotFoundError(f'{p} is missing: {path!r} is not a complete zoo index')
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{manifest_path} is corrupt: {e}') from e
  if not isinstance(manifest, dict):
    manifest = {}
  missing = [k for k in _MANIFEST_KEYS if k not in manifest]
  if missing or manifest['format'] != FORMAT:
    raise ValueError(f'{manifest_path} is not a {FORMAT} manifest (missing {missing}, format '
                     f'{manifest.get("format")!r})')
  return manifest


def load_index(path):
  """Reads and checks an index directory; FileNotFoundError / ValueError say what is wrong."""
  manifest = read_manifest(path)
  emb_path = os.path.join(path, EMBEDDINGS_FILE)
  if _sha256_file(emb_path) != manifest['sha256']:
    raise ValueError(f'{emb_path} is corrupt: its sha256 differs from the manifest\'s')
  try:
    embeddings = safetensors.numpy.load_file(emb_path)['embeddings']
  except Exception as e:  # safetensors raises its own error types for bad headers.
    raise ValueError(f'{emb_path} is not a readable safetensors file: {e}') from e
  shape = (manifest['count'], manifest['dim'])
  if embeddings.shape != shape or embeddings.dtype != np.float32 or len(
      manifest['items']) != shape[0]:
    raise ValueError(f'{path}: embeddings {embeddings.shape} {embeddings.dtype} and '
                     f'{len(manifest["items"])} items do not match the manifest\'s count x dim '
                     f'{shape} float32')
  return Index(os.path.abspath(path), embeddings, manifest)


def build_index(workdir, out, *, images=None, dataset=None, batch_size=64, use_ema=True,
                overwrite=False):
  """Embeds image files under `images` or a dataset split `dataset` with a run; writes `out`."""
  if (images is None) == (dataset is None):
    raise ValueError('give exactly one of --images DIR and --dataset name[/config]:split')
  if batch_size < 1:
    raise ValueError(f'--batch-size={batch_size} must be >= 1')
  if dataset is not None:
    embedding.parse_dataset(dataset)  # Fails on a malformed spec before the run loads.
  run = load_run(workdir, use_ema=use_ema)
  load, items, source = (_image_files(images, run) if images is not None
                         else _dataset_split(dataset, run))
  embeddings = embedding.encode_images(run.task, run.params, load, len(items), batch_size, run.mesh)
  manifest = {'workdir': run.workdir, 'step': run.step, 'use_ema': use_ema,
              'fingerprint': run.fingerprint(), 'resolution': run.resolution,
              'source': source, 'items': items}
  if jax.process_index() != 0:
    return os.path.abspath(out)
  return write_index(out, embeddings, manifest, overwrite=overwrite)


def _image_files(directory, run):
  """(load, items, source) of the image files under `directory`."""
  root = os.path.abspath(directory)
  names = embedding.list_images(root)
  paths = [os.path.join(root, name) for name in names]

  def load(indices):
    return {'image': np.stack([embedding.load_image(paths[i], run.resolution, run.channels)
                               for i in indices])}

  items = [{'id': name, 'path': path} for name, path in zip(names, paths)]
  return load, items, {'kind': 'images', 'dir': root}


def _dataset_split(dataset, run):
  """(load, items, source) of a dataset split; items carry their first caption, if any."""
  data_cfg, split = embedding.dataset_config(run.config.data, dataset)
  reader = embedding.SplitReader(data_cfg, split)
  caption_key = _caption_key(run.config, reader.builder)

  def load(indices):
    return {'image': np.stack([reader.image(ex) for ex in reader.examples(indices)])}

  items = [{'id': f'{split}/{i}', 'index': i} for i in range(len(reader))]
  if caption_key:
    for first in range(0, len(items), 256):  # Chunks: decoded examples hold every feature.
      chunk = items[first:first + 256]
      for item, ex in zip(chunk, reader.examples([item['index'] for item in chunk])):
        item['caption'] = embedding.first_caption(ex, caption_key)
  source = {'kind': 'dataset', 'dataset': dataset, 'split': split,
            'data': json.loads(zoo_config.to_json(data_cfg))}
  return load, items, source


def _caption_key(config, builder):
  """The run's caption feature if this dataset has it ('' otherwise)."""
  key = config.data.text.caption_key if 'text' in config.data else 'captions'
  return key if key in builder.info.features else ''


# ---------------------------------------------------------------------------------------------
# Top-k search.

def items_mesh(devices=None):
  """A one-axis mesh over `devices` (default all) for the index rows."""
  return jax.sharding.Mesh(np.asarray(jax.devices() if devices is None else devices), (ITEMS,))


def place(embeddings_NxE, mesh):
  """The index rows, zero-padded to a multiple of the mesh size and sharded over it."""
  n, e = embeddings_NxE.shape
  padded = np.zeros((n + (-n) % mesh.size, e), np.float32)
  padded[:n] = embeddings_NxE
  return jax.device_put(padded, NamedSharding(mesh, P(ITEMS, None)))


@functools.partial(jax.jit, static_argnames=('k', 'count', 'mesh'))
def _top_k(index_NxE, queries_QxE, *, k, count, mesh):
  def shard(local_nxE, q_QxE):
    n = local_nxE.shape[0]
    scores_Qxn = jnp.matmul(q_QxE, local_nxE.T, precision=jax.lax.Precision.HIGHEST)
    ids_n = jax.lax.axis_index(ITEMS) * n + jnp.arange(n)
    scores_Qxn = jnp.where(ids_n[None, :] < count, scores_Qxn, -jnp.inf)  # Padding rows lose.
    top_Qxk, pos_Qxk = jax.lax.top_k(scores_Qxn, min(k, n))
    # Shard-major candidates: among equal scores top_k keeps the earlier, i.e. the lower id.
    cand_QxSk = jax.lax.all_gather(top_Qxk, ITEMS, axis=1, tiled=True)
    ids_QxSk = jax.lax.all_gather(ids_n[pos_Qxk], ITEMS, axis=1, tiled=True)
    best_QxK, where_QxK = jax.lax.top_k(cand_QxSk, k)
    return best_QxK, jnp.take_along_axis(ids_QxSk, where_QxK, axis=1)

  # all_gather leaves the candidates identical on every shard, which the varying-manual-axes
  # check cannot infer: the replicated out_specs are true by construction.
  return jax.shard_map(shard, mesh=mesh, in_specs=(P(ITEMS, None), P()), out_specs=(P(), P()),
                       check_vma=False)(index_NxE, queries_QxE)


def top_k(placed_NxE, count, queries_QxE, k, mesh):
  """(scores_QxK, ids_QxK) numpy: the k highest inner products among the first `count` rows.

  `placed_NxE` comes from `place(embeddings, mesh)`; k is capped at `count`.
  """
  check_k(k)
  k = min(k, count)
  scores, ids = _top_k(placed_NxE, jnp.asarray(queries_QxE, jnp.float32), k=k, count=count,
                       mesh=mesh)
  return np.asarray(scores), np.asarray(ids)


def check_k(k):
  """ValueError unless k >= 1."""
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'-k {k} must be an integer >= 1')


def search(index_path, *, text=None, image=None, k=5, workdir=None):
  """The k best items of an index for a text or an image query: a list of result dicts.

  Each result has 'rank' (1-based), 'score' (cosine similarity), 'id', and 'path' / 'caption'
  when the item has them. The run is the manifest's (or `workdir`, which must hold the same
  params: its fingerprint at the manifest's step is checked).
  """
  check_k(k)
  if (text is None) == (image is None):
    raise ValueError('give exactly one query: a text or --image PATH')
  if image is not None and not os.path.isfile(image):
    raise FileNotFoundError(f'--image {image!r} not found')
  index = load_index(index_path)
  manifest = index.manifest
  run = load_run(workdir or manifest['workdir'], manifest['step'], manifest['use_ema'])
  mine = run.fingerprint()
  if mine != manifest['fingerprint']:
    raise ValueError(f'index {index.path} was made by another model: the params of '
                     f'{run.workdir} at step {run.step} have fingerprint {mine[:12]}, the '
                     f'index {manifest["fingerprint"][:12]}; rebuild it with `zoo index`')
  mesh = items_mesh()
  scores, ids = top_k(place(index.embeddings_NxE, mesh), manifest['count'],
                      _query(run, text, image), k, mesh)
  items, results = manifest['items'], []
  for rank, (score, i) in enumerate(zip(scores[0], ids[0]), start=1):
    known = {key: items[i][key] for key in ('id', 'path', 'caption') if key in items[i]}
    results.append({'rank': rank, 'score': float(score), **known})
  return results


def _query(run, text, image):
  """The 1xE embedding of a text, or of the image file at `image`."""
  if image is None:
    return embedding.encode_texts(run.task, run.params, [text], 1, run.mesh)
  pixels_HxWxC = embedding.load_image(image, run.resolution, run.channels)

  def load(indices):  # One image: every row of the (padded) batch is the query.
    return {'image': np.stack([pixels_HxWxC for _ in indices])}

  return embedding.encode_images(run.task, run.params, load, 1, 1, run.mesh)


def format_results(results):
  """One line per result: rank, score, id, caption (if any)."""
  width = max((len(str(r['id'])) for r in results), default=0)  # Captions start in one column.
  lines = []
  for r in results:
    row = f'{r["rank"]:>3}  {r["score"]:+.4f}  {r["id"]}'
    lines.append(f'{row:<{width + 14}}  {r["caption"]}' if r.get('caption') else row)
  return '\n'.join(lines)


def contact_sheet(index_path, results, out, *, size=128):
  """Writes a PNG row of the results' images as the model saw them, enlarged to ~`size` px."""
  manifest = read_manifest(index_path)
  source, resolution = manifest['source'], manifest['resolution']
  by_id = {item['id']: item for item in manifest['items']}
  items = [by_id[r['id']] for r in results]
  if source['kind'] == 'images':
    images = [embedding.load_image(item['path'], resolution, 3) for item in items]
  else:
    data_cfg = zoo_config.from_json(json.dumps(source['data']))
    reader = embedding.SplitReader(data_cfg, source['split'])
    images = [reader.image(ex) for ex in reader.examples([item['index'] for item in items])]
  images = [np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in images]
  return metrics.save_image_grid((np.stack(images) + 1.0) / 2.0, out, ncols=len(images),
                                 upscale=max(1, size // resolution))


def zero_shot(workdir, image, classes, *, templates=('a {}.',), use_ema=True):
  """Zero-shot classification of the image file `image` with a dual-encoder run: one
  (class, probability) pair per class, best first. Each class is the normalised mean of its
  `templates` prompts' embeddings (CLIP's prompt ensembling); probabilities are the softmax
  of the run's scaled cosine logits (a SigLIP run's sigmoid probabilities do not sum to 1)."""
  from zoo.evals import zero_shot as zero_shot_lib  # The evaluator's prompt ensembling.
  if not classes:
    raise ValueError('zero_shot needs at least one class name')
  run = load_run(workdir, use_ema=use_ema)
  prompts = [t.format(c) for c in classes for t in templates]
  text_KxTxE = embedding.encode_texts(run.task, run.params, prompts, 64, run.mesh).reshape(
      len(classes), len(templates), -1)
  classes_KxE = zero_shot_lib.class_embeddings(text_KxTxE)
  image_E = _query(run, None, image)[0]
  scale = float(np.exp(np.asarray(jax.device_get(run.params['logit_scale']))))
  logits_K = scale * classes_KxE @ image_E
  if run.config.model.kind == 'siglip':
    bias = float(np.asarray(jax.device_get(run.params['logit_bias'])).reshape(()))
    probs_K = 1.0 / (1.0 + np.exp(-(logits_K + bias)))
  else:
    probs_K = np.exp(logits_K - logits_K.max())
    probs_K = probs_K / probs_K.sum()
  return sorted(zip(classes, probs_K.tolist()), key=lambda pair: -pair[1])
