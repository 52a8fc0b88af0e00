"""Image <-> text retrieval Recall@K of a dual encoder over the first N examples of a split.

Legend: N images, C captions kept per image (`max_captions`), M captions in all (<= N C),
E embedding width, T tokens, G global batch, L per-process rows.

Protocol (COCO / Flickr30k, as in the CLIP and SigLIP papers): the gallery is the N images
and all of their captions (the first `max_captions` of each; COCO's standard is 5).
  text -> image: every caption is a query; it is right at K when its own image is among the
                 K images of highest similarity;
  image -> text: every image with a caption is a query; it is right at K when any one of its
                 captions is among the K captions of highest similarity.
A query's rank is the number of candidates scoring strictly higher than its best correct one,
so exact ties (identical captions of different images) count in the query's favour.

Each process embeds the images and captions of its rows of each global batch; the embeddings
are gathered (`zoo.embedding.embed`), so every process computes the single-process metrics.
"""

import jax
import numpy as np

import data as data_lib
from zoo import embedding
from zoo import search

KS = (1, 5, 10)
_CHUNK = 1024  # Query rows scored at once: bounds the score block to _CHUNK x gallery.


def ranks(img_NxE, txt_MxE, owner_M):
  """(i2t_N, t2i_M): 0-based rank of each query's best correct item (see the module doc).

  `owner_M[m]` is the image of caption m. An image without captions gets rank M.
  """
  img = np.asarray(img_NxE, np.float32)
  txt = np.asarray(txt_MxE, np.float32)
  owner = np.asarray(owner_M)
  n, m = len(img), len(txt)
  i2t, t2i = np.empty(n, np.int64), np.empty(m, np.int64)
  for a in range(0, n, _CHUNK):
    scores_cxM = img[a:a + _CHUNK] @ txt.T
    own_cxM = owner[None, :] == np.arange(a, a + len(scores_cxM))[:, None]
    best_c = np.where(own_cxM, scores_cxM, -np.inf).max(axis=1, initial=-np.inf)
    i2t[a:a + _CHUNK] = np.where(np.isfinite(best_c),
                                 (scores_cxM > best_c[:, None]).sum(axis=1), m)
  for a in range(0, m, _CHUNK):
    scores_cxN = txt[a:a + _CHUNK] @ img.T
    own_c = scores_cxN[np.arange(len(scores_cxN)), owner[a:a + _CHUNK]]
    t2i[a:a + _CHUNK] = (scores_cxN > own_c[:, None]).sum(axis=1)
  return i2t, t2i


def recall_at_k(img_NxE, txt_MxE, owner_M, ks=KS):
  """{'i2t_recall@K', 't2i_recall@K'} for K in ks; images without captions are not queries."""
  i2t, t2i = ranks(img_NxE, txt_MxE, owner_M)
  has_caption_N = np.isin(np.arange(len(i2t)), owner_M)
  out = {}
  for k in ks:
    out[f'i2t_recall@{k}'] = float(np.mean(i2t[has_caption_N] < k))
    out[f't2i_recall@{k}'] = float(np.mean(t2i < k))
  return out


def flatten_captions(txt_NxCxE, valid_NxC):
  """(txt_MxE, owner_M): the valid caption embeddings in (image, caption) order."""
  n, c = valid_NxC.shape
  owner_NxC = np.broadcast_to(np.arange(n)[:, None], (n, c))
  return txt_NxCxE[valid_NxC], owner_NxC[valid_NxC]


def eval_data(data_cfg, builder_config):
  """The run's `config.data`, or a copy reading another builder config of the same dataset.

  An evaluator's `builder_config` ('' = the run's) lets a model trained on one configuration
  be judged on another, e.g. zero-shot on the one-object `single32` scenes of a run trained on
  the full `res32` scenes.
  """
  if not builder_config:
    return data_cfg
  return data_lib.component_config(data_cfg, builder_config)


class Retrieval:
  """Recall@1/5/10 both ways over the first `num_examples` of `split` (0: the whole split)."""

  SCHEMA = {'type': str, 'split': str, 'builder_config': str, 'num_examples': int,
            'max_captions': int, 'batch_size': int, 'use_ema': bool}

  @staticmethod
  def check(cfg, config, where):
    check_dual_encoder(config, where, 'retrieval')
    if not cfg.split:
      raise ValueError(f'{where}.split must name a split (e.g. validation)')
    if cfg.num_examples < 0 or cfg.max_captions < 1 or cfg.batch_size < 1:
      raise ValueError(f'{where}: num_examples must be >= 0 (0 = the whole split), max_captions '
                       'and batch_size >= 1')
    if 'text' not in config.data:
      raise ValueError(f'{where}: retrieval reads captions: set config.data.text')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task, self.data_cfg = cfg, task, eval_data(config.data, cfg.builder_config)
    self.caption_key = config.data.text.caption_key
    self._encode = jax.jit(self._encode_batch)

  def _encode_batch(self, params, batch):
    tokens_GxCxT, mask_GxCxT = batch['tokens'], batch['tokens_mask']
    g, c, t = tokens_GxCxT.shape
    txt_GCxE = self.task.predict['encode_text'](params, tokens_GxCxT.reshape(g * c, t),
                                                mask_GxCxT.reshape(g * c, t))
    return {'image': self.task.predict['encode_image'](params, batch['image']),
            'text': txt_GCxE.reshape(g, c, -1), 'valid': batch['valid']}

  def _load(self, reader):
    c = self.cfg.max_captions

    def load(indices_L):
      examples = reader.examples(indices_L)
      kept = [embedding.captions_of(ex, self.caption_key)[:c] for ex in examples]
      valid_LxC = np.array([[j < len(row) for j in range(c)] for row in kept], bool)
      texts = [t for row in kept for t in row + [''] * (c - len(row))]
      ids_LCxT, mask_LCxT = self.task.tokenizer.encode(texts, self.task.max_len)
      return {'image': np.stack([reader.image(ex) for ex in examples]),
              'tokens': ids_LCxT.reshape(len(examples), c, -1),
              'tokens_mask': mask_LCxT.reshape(len(examples), c, -1), 'valid': valid_LxC}
    return load

  def run(self, state, step):
    cfg = self.cfg
    params = state['ema_params' if cfg.use_ema else 'params']
    reader = embedding.SplitReader(self.data_cfg, cfg.split)
    n = num_examples(cfg, reader, 'retrieval')
    out = embedding.embed(self._encode, params, self._load(reader), n, cfg.batch_size,
                       jax.tree.leaves(params)[0].sharding.mesh)
    txt_MxE, owner_M = flatten_captions(out['text'], out['valid'])
    if not len(owner_M):
      raise ValueError(f'retrieval: the first {n} examples of {cfg.split!r} have no '
                       f'{self.caption_key!r} captions')
    return {**recall_at_k(out['image'], txt_MxE, owner_M), 'images': n,
            'captions': int(len(owner_M))}


def check_dual_encoder(config, where, kind):
  """ValueError unless the run trains a dual encoder (a task with image and text encoders)."""
  if config.task.name not in search.TASKS:
    raise ValueError(f'{where}.type={kind} needs config.task.name in {list(search.TASKS)}, not '
                     f'{config.task.name!r}')


def num_examples(cfg, reader, kind):
  """`cfg.num_examples` (0: the whole split); ValueError if the split is smaller."""
  if cfg.num_examples > len(reader):
    raise ValueError(f'{kind}: num_examples={cfg.num_examples} exceeds the {len(reader)} '
                     f'examples of split {cfg.split!r}')
  return cfg.num_examples or len(reader)
