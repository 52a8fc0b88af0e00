"""Vision-language modelling: next-token cross-entropy on answers (VQA) or captions.

Legend: B batch, L tokens, T vocabulary, P prompt tokens, G generated tokens.

`task.objective`:
  'vqa'      batches from `config.data.qa` (data/qa.py): [BOS] question answer [EOS]; the loss
             covers the answer and its EOS, never the question (it is the prompt);
  'caption'  batches from `config.data.text` (data/captions.py): [BOS] caption [EOS]; the loss
             covers the caption and EOS, the prompt is [BOS] alone.
Position t of the model's input predicts token t + 1. For early fusion the prompt (question)
is in the bidirectional prefix with the image (`prompt_len`), as a prefix LM trains.

`predict['greedy']` / `predict['beam']` (params, images, prompt ids BxP right-padded,
prompt_len B) -> BxG tokens, decoded with the KV cache inside one jit (zoo/models/decoding.py).

`task.pretrained_from` (a VLM workdir) warm-starts every top-level part of the params the two
models share (the vision tower, the language layers, embeddings and head) from that run's EMA
weights; the rest (a mid-fusion model's gated cross-attention and resampler) starts fresh.
That is Flamingo's setting, pretrained vision and language with new gated blocks: a mid-fusion
model trained from scratch keeps its zero gates shut (a random vision tower gives them nothing
to open for), while one warm-started from an early- or late-fusion run opens them.

`task.vision_from` (a dual encoder's or a ViT classifier's run) initialises the vision tower
alone from that run's image tower (EMA), as Flamingo and LLaVA start from a contrastively
trained encoder; `config.model`'s vision fields must describe the same tower (`vision_config`
gives them), except that `model.vision_depth` may be smaller: the tower is then the source's
first vision_depth layers (LLaVA reads CLIP's penultimate layer: a class-token tower's last
layer is trained only for the class token). `task.lock_vision` freezes the tower (no updates,
no optimizer state, no gradient computed), whichever run it came from.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data import text_tokenizers
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import models
from zoo.models import decoding
from zoo.models import vlm
from zoo.tasks import contrastive

OBJECTIVES = ('vqa', 'caption')
SCHEMA = {'name': str, 'objective': str, 'max_new': int, 'beams': int, 'pretrained_from': str,
          'vision_from': str, 'lock_vision': bool}
# Top-level entries of an image tower's params that the VLM's tower has no place for.
TOWER_HEADS = ('head', 'classifier')


def vision_config(workdir, key='config.task.vision_from'):
  """The `config.model` vision fields of the image tower the run `workdir` trained."""
  return vlm.vision_fields(contrastive.source_tower(workdir, key)[1])


def _check_vision_from(config, *, must_exist=False):
  """`vision_from` / `lock_vision` against the rest, and the model against that run's tower once
  the run exists (a config may name its source before it is trained)."""
  task = config.task
  if task.lock_vision and not (task.vision_from or task.pretrained_from):
    raise ValueError('config.task.lock_vision=True needs config.task.vision_from or '
                     'pretrained_from: a tower to lock')
  if not task.vision_from:
    return
  if task.pretrained_from:
    raise ValueError(f'config.task.vision_from={task.vision_from!r} and pretrained_from='
                     f'{task.pretrained_from!r} both initialise the vision tower; set one')
  if config.model.get('fusion', vlm.VLM.fusion) == 'none':
    raise ValueError("config.task.vision_from needs a vision tower: config.model.fusion='none' "
                     'has none')
  if not must_exist and zoo_config.existing_run_config(task.vision_from) is None:
    return
  want = vision_config(task.vision_from)
  ours = models.fields('vlm') | models.kwargs(config.model)
  ours['vision_mlp_dim'] = ours['vision_mlp_dim'] or 4 * ours['vision_width']
  ours['vision_stem'] = tuple(ours['vision_stem'])
  # A shallower tower keeps the source's first vision_depth layers (LLaVA reads the
  # penultimate layer of CLIP: a CLS-pooled tower's last layer trains only the class token).
  differ = sorted(k for k in want if ours[k] != want[k] and not (
      k == 'vision_depth' and 1 <= ours[k] < want[k]))
  if differ:
    raise ValueError(f'config.model differs from the image tower of config.task.vision_from='
                     f'{task.vision_from!r} in ' + ', '.join(
                         f'{k} ({ours[k]!r} here, {want[k]!r} there)' for k in differ)
                     + ' (zoo.tasks.vlm.vision_config gives the fields)')


class VLMTask:
  """`init`, `loss` (answer cross-entropy, token accuracy, exact match) and decoding."""

  conditioning = 'none'  # Not an image generator (zoo/evals/generation.py).

  @staticmethod
  def check_config(config):
    task = config.task
    zoo_config.check_keys(task, 'task', SCHEMA)
    zoo_config.check_choice(task.objective, OBJECTIVES, 'config.task.objective')
    zoo_config.check_choice(config.model.get('name', None), ('vlm',), 'config.model.name')
    models.check_config(config.model, config.data.resolution)
    _check_vision_from(config)
    if task.max_new < 1 or task.beams < 1:
      raise ValueError(f'config.task.max_new={task.max_new} and config.task.beams={task.beams} '
                       'must be >= 1')
    section = 'qa' if task.objective == 'vqa' else 'text'
    if section not in config.data:
      raise ValueError(f'config.task.objective={task.objective!r} reads config.data.{section}; '
                       'set it (see data/qa.py, data/captions.py)')
    text_cfg = config.data[section]
    tokenizer = text_tokenizers.from_config(text_cfg)
    if tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(f'config.model.vocab_size={config.model.vocab_size} is smaller than the '
                       f'{text_cfg.tokenizer!r} tokenizer\'s {tokenizer.vocab_size} ids')
    if text_cfg.max_len - 1 > config.model.max_len:
      raise ValueError(f'config.data.{section}.max_len={text_cfg.max_len} needs model.max_len >= '
                       f'{text_cfg.max_len - 1} (the model reads all tokens but the last)')

  def __init__(self, config):
    self.model = models.build(config.model)
    self.cfg = config.task
    self.text_cfg = config.data.qa if self.cfg.objective == 'vqa' else config.data.text
    self.tokenizer = text_tokenizers.from_config(self.text_cfg)
    self.max_len = self.text_cfg.max_len
    self.image_shape = (config.data.resolution, config.data.resolution, self.model.in_channels)
    self.predict = {'greedy': self.greedy, 'beam': self.beam, 'logits': self.logits}
    self.pretrained = {}
    if self.cfg.pretrained_from:
      source = zoo_config.existing_run_config(self.cfg.pretrained_from)
      if source is None or source.task.name != 'vlm':
        raise ValueError(f'config.task.pretrained_from={self.cfg.pretrained_from!r} is not a '
                         'vlm run (no config.json of task vlm there)')
      shared = _parts(self.model) & _parts(models.build(source.model))
      self.pretrained = {k: checkpoint.Source(self.cfg.pretrained_from, k) for k in sorted(shared)}
    if self.cfg.vision_from:
      _check_vision_from(config, must_exist=True)
      name, _ = contrastive.source_tower(self.cfg.vision_from, 'config.task.vision_from')
      source_depth = vision_config(self.cfg.vision_from)['vision_depth']
      unused = tuple(f'encoder/layers_{i}' for i in range(self.model.vision_depth, source_depth))
      self.pretrained['vision'] = checkpoint.Source(
          self.cfg.vision_from, contrastive.TOWER_SUBTREES[name], ignore=TOWER_HEADS + unused)
    if self.cfg.lock_vision and 'vision' not in self.pretrained:
      raise ValueError(f'config.task.lock_vision=True but config.task.pretrained_from='
                       f'{self.cfg.pretrained_from!r} has no vision tower to start it from')
    self.frozen = ('vision',) if self.cfg.lock_vision else ()

  def _sequences(self, batch):
    """(tokens BxL, mask BxL, prompt length B) of a batch, whichever the objective."""
    if self.cfg.objective == 'vqa':
      return batch['qa_tokens'], batch['qa_mask'], batch['qa_prompt_len']
    tokens = batch['tokens']
    return tokens, batch['tokens_mask'], jnp.ones(tokens.shape[:1], jnp.int32)

  def init(self, rng, batch):
    """Params for a batch of this shape."""
    if batch['image'].shape[1:] != self.image_shape:
      raise ValueError(f"data images are {batch['image'].shape[1:]} but the model expects "
                       f'{self.image_shape} (config.data.resolution, model.in_channels)')
    tokens, mask, prompt_len = self._sequences(batch)
    return self.model.init({'params': rng}, batch['image'], tokens[:, :-1], mask[:, :-1],
                           prompt_len)['params']

  def logits(self, params, images, tokens_BxL, mask_BxL, prompt_len_B):
    """Teacher-forced next-token logits BxLxT."""
    return self.model.apply({'params': params}, images, tokens_BxL, mask_BxL, prompt_len_B)

  def loss(self, params, batch, rng, train=True):
    """Mean cross-entropy over answer (caption) tokens and EOS; accuracy and exact match."""
    del rng
    if self.frozen:
      params = {**params, 'vision': jax.lax.stop_gradient(params['vision'])}
    tokens, mask, prompt_len = self._sequences(batch)
    logits = self.model.apply({'params': params}, batch['image'], tokens[:, :-1], mask[:, :-1],
                              prompt_len, train=train)
    targets = tokens[:, 1:]
    # Target j + 1 is scored when it is real and not part of the prompt.
    weights = mask[:, 1:] & (jnp.arange(1, tokens.shape[1])[None] >= prompt_len[:, None])
    weights = weights.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    total = jnp.maximum(weights.sum(), 1.0)
    hit = (logits.argmax(-1) == targets).astype(jnp.float32)
    exact = jnp.all((hit > 0) | (weights == 0), axis=1).astype(jnp.float32)
    loss = (nll * weights).sum() / total
    return loss, {'loss': loss, 'token_accuracy': (hit * weights).sum() / total,
                  'exact_match': exact.mean()}

  def greedy(self, params, images, ids_BxP, prompt_len_B):
    """BxG greedy answer tokens (PAD after EOS)."""
    return decoding.greedy(self.model, params, images, ids_BxP, prompt_len_B,
                           max_new=self.cfg.max_new, eos_id=self.tokenizer.eos_id,
                           pad_id=self.tokenizer.pad_id)

  def beam(self, params, images, ids_BxP, prompt_len_B):
    """BxG tokens of the best of `task.beams` beams."""
    return decoding.beam_search(self.model, params, images, ids_BxP, prompt_len_B,
                                max_new=self.cfg.max_new, eos_id=self.tokenizer.eos_id,
                                pad_id=self.tokenizer.pad_id, beams=self.cfg.beams)[0]

  def decode_text(self, tokens_BxG):
    """The generated strings (up to EOS)."""
    return [self.tokenizer.decode(row) for row in np.asarray(tokens_BxG)]

  # Tasks are static arguments of jitted functions: identity hashing is what we want.
  __hash__ = object.__hash__


def _parts(model):
  """The top-level entries of a VLM's params (shapes only, nothing computed)."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.in_channels),
                                jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  return set(jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)['params'])
