"""VQA accuracy and captioning BLEU-4 of a VLM run, with the hallucination rate of its answers.

'vqa': every question of the first `num_examples` examples of `split` is asked (greedy, or
beam search with `decoding='beam'`); an answer is right when it equals the reference after
`data.qa.normalize_answer`. Reports overall accuracy and accuracy per question type
(`accuracy_read_text` is the document question on its own).

'caption': one caption per image from the prompt [BOS], scored by corpus BLEU-4 (Papineni et
al. 2002: clipped 1-4-gram precisions, geometric mean, brevity penalty against the closest
reference length; every caption of the example is a reference; words as the shapes
tokenizer splits them).

Both report `hallucination_rate`: of the generated texts that name a shape or a colour, the
fraction naming one absent from the scene (`data.qa.hallucinations`).
"""

import collections
import math

import jax
import numpy as np

from data import qa
from data import text_tokenizers
from zoo import embedding
from zoo.evals import retrieval


def _ngrams(words, n):
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses, references, max_n=4):
  """Corpus BLEU in [0, 1] of word lists against lists of reference word lists."""
  matches, totals = [0] * max_n, [0] * max_n
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    hyp_len += len(hyp)
    ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    for n in range(1, max_n + 1):
      counts = _ngrams(hyp, n)
      best = collections.Counter()
      for ref in refs:
        best |= _ngrams(ref, n)
      matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
      totals[n - 1] += max(len(hyp) - n + 1, 0)
  if min(matches) == 0:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
  brevity = min(0.0, 1.0 - ref_len / max(hyp_len, 1))
  return math.exp(log_precision + brevity)


def hallucination_rate(texts, examples):
  """(rate, how many texts named a shape or colour)."""
  named = bad = 0
  for text, example in zip(texts, examples):
    found = qa.hallucinations(text, example)
    if found['named']:
      named += 1
      bad += bool(found['absent'])
  return (bad / named if named else 0.0), named


class VQA:
  """Answers every question of a split's first examples; accuracy by question type."""

  SCHEMA = {'type': str, 'split': str, 'num_examples': int, 'batch_size': int,
            'use_ema': bool, 'decoding': str}
  OBJECTIVE = 'vqa'

  @classmethod
  def check(cls, cfg, config, where):
    if config.task.name != 'vlm' or config.task.objective != cls.OBJECTIVE:
      raise ValueError(f'{where}.type={cfg.type!r} needs config.task.name=vlm with '
                       f'task.objective={cls.OBJECTIVE!r}')
    if cfg.decoding not in ('greedy', 'beam'):
      raise ValueError(f"{where}.decoding={cfg.decoding!r}; allowed: ['greedy', 'beam']")
    if not cfg.split or cfg.num_examples < 0 or cfg.batch_size < 1:
      raise ValueError(f'{where}: split must be set, num_examples >= 0 (0 = all), '
                       'batch_size >= 1')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task, self.data_cfg = cfg, task, config.data
    self._answer = jax.jit(lambda params, batch: task.predict[cfg.decoding](
        params, batch['image'], batch['ids'], batch['prompt_len']))

  def _generate(self, params, reader, items):
    """Decoded texts for (example index, prompt) items, in order."""
    cache = {}

    def load(indices_L):
      rows = [items[i] for i in indices_L]
      for e, _ in rows:
        if e not in cache:
          cache[e] = reader.image(reader.examples([e])[0])
      ids, prompt_len = qa.encode_prompts(self.task.tokenizer, [p for _, p in rows],
                                          self.task.max_len)
      return {'image': np.stack([cache[e] for e, _ in rows]), 'ids': ids,
              'prompt_len': prompt_len}

    mesh = jax.tree.leaves(params)[0].sharding.mesh
    tokens = embedding.embed(self._answer, params, load, len(items), self.cfg.batch_size, mesh)
    return self.task.decode_text(tokens)

  def run(self, state, step):
    cfg = self.cfg
    params = state['ema_params' if cfg.use_ema else 'params']
    reader = embedding.SplitReader(self.data_cfg, cfg.split)
    n = retrieval.num_examples(cfg, reader, self.OBJECTIVE)
    examples = reader.examples(range(n))
    return self._score(params, reader, examples)

  def _score(self, params, reader, examples):
    items, truth = [], []
    for e, example in enumerate(examples):
      for question, answer, kind in qa.examples_qa(example):
        items.append((e, question))
        truth.append((qa.normalize_answer(answer), kind))
    answers = self._generate(params, reader, items)
    right = collections.defaultdict(list)
    for got, (want, kind) in zip(answers, truth):
      right[kind].append(qa.normalize_answer(got) == want)
    out = {'accuracy': float(np.mean([r for rs in right.values() for r in rs])),
           'questions': len(items)}
    out |= {f'accuracy_{kind}': float(np.mean(rs)) for kind, rs in sorted(right.items())}
    out['hallucination_rate'], out['answers_naming'] = hallucination_rate(
        answers, [examples[e] for e, _ in items])
    return out


class Captioning(VQA):
  """One greedy (or beam) caption per image; BLEU-4 against all of the example's captions."""

  OBJECTIVE = 'caption'

  def _score(self, params, reader, examples):
    captions = self._generate(params, reader, [(e, '') for e in range(len(examples))])
    split = text_tokenizers.split_words
    refs = [[split(c) for c in embedding.captions_of(ex, self.data_cfg.text.caption_key)]
            for ex in examples]
    rate, named = hallucination_rate(captions, examples)
    return {'bleu4': corpus_bleu([split(c) for c in captions], refs), 'captions': len(captions),
            'hallucination_rate': rate, 'captions_naming': named}
