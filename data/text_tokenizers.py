"""Tokenizers: text <-> int32 ids with a padding mask, looked up by name with `get`.

  'shapes'      word level, the vocabulary of the procedural shapes dataset's language;
  'shapes_bpe'  a CLIP-format BPE trained with the `tokenizers` library on the shapes dataset's
                language, committed as data/shapes/tokenizer.json; regenerate it byte for byte
                with `python -m data.text_tokenizers train-shapes --out data/shapes/tokenizer.json`;
  'bytes'       UTF-8 bytes;
  'clip'        OpenAI CLIP's BPE, wired in `tokenizers` as transformers' CLIPTokenizer(Fast),
                from the user's files (a tokenizer.json, vocab.json + merges.txt, or OpenAI's
                bpe_simple_vocab_16e6.txt.gz);
  'siglip'      SigLIP's SentencePiece model (a .model file), as transformers' SiglipTokenizer.

Every tokenizer encodes a text as [BOS] tokens [EOS] ('siglip' has no BOS), padded with `pad_id`
(mask False) or truncated to `max_len` with EOS kept in the last slot (OpenAI
`clip.tokenize(truncate=True)`, big_vision's eos='sticky'). A run's workdir keeps a copy of its
tokenizer (`save_to_workdir`, called by zoo/train.py) that `load_from_workdir` reads back.
Legend: B texts, L max_len.
"""

import argparse
import functools
import json
import os
import re
import string

import numpy as np
import sentencepiece
import tokenizers as hf_tokenizers
from tokenizers import models, trainers

from data.clip_bpe import (END_OF_WORD, EOT, SOT, clip_pipeline, clip_vocabulary, file_in,
                           load_clip, wire_clip)
from data.shapes import captions
from data.shapes import generate
from data.shapes import grammar
from data.shapes import questions
from data.shapes import relations
from zoo import files

WORKDIR_SUBDIR = 'tokenizer'


class Tokenizer:
  """Shared `encode`: subclasses give `pad_id`, `bos_id`, `eos_id` and `tokenize(text)`.

  `path_arg` says whether `get` takes a file (`path=`, config key data.text.tokenizer_path):
  'none', 'optional' or 'required'.
  """

  pad_id: int
  bos_id: int | None
  eos_id: int
  vocab_size: int
  path_arg = 'optional'

  def tokenize(self, text: str) -> list[int]:
    """The ids of `text` without BOS/EOS."""
    raise NotImplementedError

  def files(self) -> dict[str, bytes]:
    """File name -> content that `get(name, path=directory)` rebuilds this tokenizer from."""
    raise NotImplementedError

  def encode(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BxL int32, mask_BxL bool): [BOS] tokens [EOS], padded or truncated to max_len."""
    if isinstance(texts, str):
      raise TypeError(f'texts must be a list of strings, not the string {texts!r}')
    if max_len < 2:
      raise ValueError(f'max_len={max_len} must be >= 2 (room for BOS and EOS)')
    bos = [] if self.bos_id is None else [self.bos_id]
    ids_BxL = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask_BxL = np.zeros((len(texts), max_len), bool)
    for b, text in enumerate(texts):
      seq = [*bos, *self.tokenize(text), self.eos_id]
      if len(seq) > max_len:
        seq = seq[:max_len - 1] + [self.eos_id]
      ids_BxL[b, :len(seq)] = seq
      mask_BxL[b, :len(seq)] = True
    return ids_BxL, mask_BxL


# ---------------------------------------------------------------------------------------------
# 'shapes': words of the shapes dataset.

SHAPES_SPECIALS = ('[PAD]', '[BOS]', '[EOS]', '[UNK]')
PUNCTUATION = ('.', ',', ':', '?', '"')
_CLOSING = ('.', ',', ':', '?')
# The literal words of the templates in data/shapes/captions.py and questions.py; the
# variable parts (shapes, colours, sizes, relations, numbers, sign words, ...) are read from
# those modules below. tests/test_tokenizers.py checks generated language has no [UNK].
TEMPLATE_WORDS = tuple("""
    a an and are close colour does from how is left many object of on one only other person
    picture right say says shape shapes sign the there to together what with yes no
    """.split())
_WORD = re.compile(r'[a-z0-9]+|[^\sa-z0-9]')


def split_words(text: str) -> list[str]:
  """Lower-cased words and single punctuation marks: 'Says "GO".' -> says " go " ."""
  return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1)
def shapes_vocabulary() -> tuple[str, ...]:
  """Specials, then every word and mark of the shapes language, sorted (so ids are stable)."""
  phrases = [
      *TEMPLATE_WORDS, *PUNCTUATION, *grammar.SHAPES, *map(questions.plural, grammar.SHAPES),
      *grammar.COLOUR_NAMES, *grammar.SIZES, *grammar.WORDS, *captions.NUMBER_WORDS,
      *captions.BACKGROUND_PHRASES.values(), *captions.POSE_PHRASES, *relations.RELATIONS,
      *(str(n) for n in range(grammar.MAX_OBJECTS + 1)),
  ]
  words = {w for phrase in phrases for w in split_words(phrase)}
  return SHAPES_SPECIALS + tuple(sorted(words))


class ShapesTokenizer(Tokenizer):
  """Word level over `shapes_vocabulary()`; [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3.

  `path` (a vocab.txt, one word a line, or a directory holding one) pins the vocabulary a
  workdir was trained with, should the dataset's language grow later.
  """

  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

  def __init__(self, path: str = ''):
    if path:
      path = file_in(path, ('vocab.txt',), "tokenizer 'shapes'")
      with open(path, encoding='utf-8') as f:
        self.vocab = tuple(f.read().splitlines())
      if self.vocab[:4] != SHAPES_SPECIALS:
        raise ValueError(f'{path}: the first lines must be {list(SHAPES_SPECIALS)}')
    else:
      self.vocab = shapes_vocabulary()
    self.vocab_size = len(self.vocab)
    self._ids = {w: i for i, w in enumerate(self.vocab)}

  def tokenize(self, text: str) -> list[int]:
    """Word ids; words outside the vocabulary become [UNK]."""
    return [self._ids.get(w, self.unk_id) for w in split_words(text)]

  def files(self) -> dict[str, bytes]:
    """vocab.txt, one word a line."""
    return {'vocab.txt': ''.join(w + '\n' for w in self.vocab).encode('utf-8')}

  def decode(self, ids) -> str:
    """Lower-cased text up to the first EOS; marks are re-attached as the templates write them.

    For the dataset's language, decode(encode(t)) == t.lower().
    """
    words = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id):
        words.append(self.vocab[i])
    return _detokenize(words)


def _detokenize(words: list[str]) -> str:
  """Joins words with spaces; '.,:?' and closing quotes attach left, opening quotes right."""
  out, glue, quote_open = '', True, False
  for w in words:
    if w in _CLOSING or (w == '"' and quote_open):
      out, glue = out + w, False
      quote_open = quote_open and w != '"'
    else:
      out += w if glue else ' ' + w
      glue = w == '"'
      quote_open = quote_open or glue
  return out


# ---------------------------------------------------------------------------------------------
# 'bytes': UTF-8 bytes.


class BytesTokenizer(Tokenizer):
  """UTF-8 bytes shifted by the specials: [PAD]=0, [BOS]=1, [EOS]=2, byte b -> 3 + b."""

  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + 3
  path_arg = 'none'

  def tokenize(self, text: str) -> list[int]:
    """One id per UTF-8 byte."""
    return [b + self.offset for b in text.encode('utf-8')]

  def files(self) -> dict[str, bytes]:
    """None: the tokenizer is fixed."""
    return {}

  def decode(self, ids) -> str:
    """Text up to the first EOS; invalid UTF-8 (e.g. a truncated character) decodes as U+FFFD."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i >= self.offset:
        out.append(i - self.offset)
    return out.decode('utf-8', errors='replace')


class ClipTokenizer(Tokenizer):
  """OpenAI CLIP BPE. Padding is id 0 ('!'), as `clip.tokenize` (transformers pads with EOT).

  Since pad id 0 is also '!', only the mask tells padding from text. `path` is a
  tokenizer.json, a directory holding one (or vocab.json + merges.txt), or a merges file
  whose vocabulary then follows OpenAI's order (`clip_vocabulary`); `merges_path` with an
  optional `vocab_path` names the files one by one.
  """

  pad_id = 0
  path_arg = 'required'

  def __init__(self, path: str = '', *, merges_path: str = '', vocab_path: str = '',
               pad_token: str = ''):
    if bool(path) == bool(merges_path) or (vocab_path and not merges_path):
      raise ValueError("tokenizer 'clip' needs path=<tokenizer.json, directory or merges file> "
                       '(data.text.tokenizer_path) or merges_path=[, vocab_path=]')
    self.backend = load_clip(path, merges_path, vocab_path)
    self.backend.no_truncation()
    self.backend.no_padding()
    self.bos_id, self.eos_id = self.backend.token_to_id(SOT), self.backend.token_to_id(EOT)
    if self.bos_id is None or self.eos_id is None:
      raise ValueError(f'tokenizer file {path or merges_path}: no {SOT!r} / {EOT!r} tokens, '
                       'not a CLIP BPE')
    if pad_token:  # e.g. '<|endoftext|>' as Stable Diffusion 1.x's tokenizer pads.
      self.pad_id = self.backend.token_to_id(pad_token)
      if self.pad_id is None:
        raise ValueError(f'data.text.pad_token={pad_token!r} is not a token of '
                         f'{path or merges_path}')
    self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

  def tokenize(self, text: str) -> list[int]:
    """BPE ids of the normalised (NFC, whitespace-collapsed, lower-cased) text."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def files(self) -> dict[str, bytes]:
    """tokenizer.json: the whole pipeline, whatever files it was read from."""
    return {'tokenizer.json': self.backend.to_str(pretty=True).encode('utf-8')}

  def decode(self, ids) -> str:
    """Text up to the first EOT, SOT dropped; '</w>' becomes a space, trailing space stripped."""
    kept = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      kept.append(i)
    text = self.backend.decode(kept, skip_special_tokens=True)
    return text.replace(END_OF_WORD, ' ').strip()


# ---------------------------------------------------------------------------------------------
# 'shapes_bpe': a CLIP-format BPE learned from the shapes dataset's language.
#
# BPE rather than WordPiece or Unigram: its training only counts pairs, so it is exactly
# reproducible (Unigram's EM is floating point); byte-level symbols mean any text, e.g. a
# free-text search query, encodes without [UNK] (WordPiece maps unseen characters to [UNK]);
# and in CLIP's format it loads in `ClipTokenizer` and transformers' CLIPTokenizer alike, with
# EOT the largest id as CLIP's argmax pooling expects. The 512 byte symbols cost little. With
# no vocabulary cap, every word the data uses becomes one token (241 merges); words the
# templates allow but the data never shows ('close together', 'zero') stay in pieces.

SHAPES_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(generate.__file__)),
                               'tokenizer.json')
SHAPES_BPE_SCENES = 1000  # The first training scenes of the default dataset (GenSpec()).


def shapes_corpus(num_scenes: int = SHAPES_BPE_SCENES) -> list[str]:
  """Captions, questions and answers of the default shapes dataset's first training scenes.

  Questions and answers are included so a VQA model can share the tokenizer.
  """
  spec = generate.GenSpec()
  texts = []
  for i in range(num_scenes):
    lang = generate.language(spec, 'train', i, generate.make_scene(spec, 'train', i))
    texts += lang['captions'] + lang['questions'] + lang['answers']
  return texts


def train_shapes_bpe(texts: list[str]) -> hf_tokenizers.Tokenizer:
  """CLIP's pipeline with merges learned on `texts`: every pair seen twice or more is merged."""
  learner = wire_clip(hf_tokenizers.Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD)))
  trainer = trainers.BpeTrainer(vocab_size=1 << 16, min_frequency=2, show_progress=False,
                                end_of_word_suffix=END_OF_WORD)
  learner.train_from_iterator(texts, trainer)
  merges = [tuple(m) for m in json.loads(learner.to_str())['model']['merges']]
  vocab = clip_vocabulary(merges)
  if len(set(vocab)) != len(vocab):
    raise ValueError('two merges produced the same symbol; CLIP order needs unique symbols')
  return clip_pipeline({s: i for i, s in enumerate(vocab)}, merges)


class ShapesBpeTokenizer(ClipTokenizer):
  """`ClipTokenizer` over data/shapes/tokenizer.json (or `path`, e.g. a workdir's copy)."""

  path_arg = 'optional'

  def __init__(self, path: str = ''):
    super().__init__(path or SHAPES_BPE_PATH)


# ---------------------------------------------------------------------------------------------
# 'siglip': SentencePiece, as transformers' SiglipTokenizer.


class SiglipTokenizer(Tokenizer):
  """SigLIP text: canonicalised text -> SentencePiece ids, then '</s>'; no BOS; pad '</s>'.

  Canonical text is lower case, ASCII punctuation removed, whitespace runs collapsed, stripped
  (transformers' `canonicalize_text`; big_vision's SigLIP lower-cases but keeps punctuation).
  Padding with EOS is big_vision's eos='sticky', pad_value=1 (for c4_en, '</s>' = 1).
  Unlike transformers, a literal '</s>' in the text stays text. `path` is a .model file or a
  directory holding spiece.model.
  """

  path_arg = 'required'
  _PUNCTUATION = str.maketrans('', '', string.punctuation)

  def __init__(self, path: str = ''):
    if not path:
      raise ValueError("tokenizer 'siglip' needs path=<spiece.model> (data.text.tokenizer_path)")
    path = file_in(path, ('spiece.model',), "tokenizer 'siglip'")
    self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
    self.eos_id = self.processor.piece_to_id('</s>')
    if self.eos_id == self.processor.unk_id():
      raise ValueError(f'SentencePiece model {path} has no </s> piece')
    self.bos_id, self.pad_id = None, self.eos_id
    self.vocab_size = self.processor.get_piece_size()

  def canonicalize(self, text: str) -> str:
    """Lower case, no ASCII punctuation, single spaces, stripped."""
    text = text.replace('\u2581', ' ').lower().translate(self._PUNCTUATION)
    return re.sub(r'\s+', ' ', text).strip()

  def tokenize(self, text: str) -> list[int]:
    """SentencePiece ids of the canonical text."""
    return self.processor.encode(self.canonicalize(text))

  def files(self) -> dict[str, bytes]:
    """spiece.model (transformers' file name)."""
    return {'spiece.model': self.processor.serialized_model_proto()}

  def decode(self, ids) -> str:
    """Text up to the first EOS."""
    ids = np.asarray(ids).reshape(-1).tolist()
    return self.processor.decode(ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids)


# ---------------------------------------------------------------------------------------------
# Lookup, config and workdir.

TOKENIZERS = {'shapes': ShapesTokenizer, 'shapes_bpe': ShapesBpeTokenizer,
              'bytes': BytesTokenizer, 'clip': ClipTokenizer, 'siglip': SiglipTokenizer}


def get(name: str, **kwargs) -> Tokenizer:
  """The tokenizer `name`; `path=` names its file(s) where it takes one (see the module doc)."""
  if name not in TOKENIZERS:
    raise ValueError(f'tokenizer {name!r} is not one of {sorted(TOKENIZERS)}')
  if TOKENIZERS[name].path_arg == 'none' and kwargs:
    raise ValueError(f'tokenizer {name!r} takes no file (data.text.tokenizer_path), '
                     f'got {sorted(kwargs)}')
  return TOKENIZERS[name](**kwargs)


def from_config(text_cfg) -> Tokenizer:
  """The tokenizer `config.data.text` names, with `tokenizer_path` (and the optional
  `pad_token`, 'clip' only) if set."""
  kwargs = {'path': text_cfg.tokenizer_path} if text_cfg.tokenizer_path else {}
  if text_cfg.get('pad_token', ''):
    if text_cfg.tokenizer != 'clip':
      raise ValueError(f'data.text.pad_token applies to tokenizer \'clip\', not '
                       f'{text_cfg.tokenizer!r}')
    kwargs['pad_token'] = text_cfg.pad_token
  return get(text_cfg.tokenizer, **kwargs)


def save(tokenizer: Tokenizer, directory: str) -> list[str]:
  """Writes `tokenizer.files()` into `directory`; returns their paths.

  A file already there must be identical: a workdir's checkpoints hold ids of one tokenizer.
  """
  written = []
  for name, content in tokenizer.files().items():
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        if f.read() != content:
          raise ValueError(f'{path} holds another tokenizer than data.text names, the one the '
                           "workdir's checkpoints were trained with: use a new workdir (or "
                           'delete the file if the ids did not change)')
    else:
      with files.atomic_open(path, 'wb') as f:  # Makes the directory too.
        f.write(content)
    written.append(path)
  return written


def save_to_workdir(workdir: str, text_cfg) -> list[str]:
  """Copies the tokenizer of `config.data.text` into WORKDIR/tokenizer/ (see `save`)."""
  return save(from_config(text_cfg), os.path.join(workdir, WORKDIR_SUBDIR))


def load_from_workdir(workdir: str, text_cfg) -> Tokenizer:
  """The tokenizer a run in `workdir` saved, of the kind `text_cfg.tokenizer` names."""
  if text_cfg.tokenizer in TOKENIZERS and TOKENIZERS[text_cfg.tokenizer].path_arg == 'none':
    return get(text_cfg.tokenizer)
  pad = {'pad_token': text_cfg.pad_token} if text_cfg.get('pad_token', '') else {}
  return get(text_cfg.tokenizer, path=os.path.join(workdir, WORKDIR_SUBDIR), **pad)


def main(argv: list[str] | None = None) -> None:
  """`python -m data.text_tokenizers train-shapes --out PATH`: (re)trains the 'shapes_bpe' file."""
  parser = argparse.ArgumentParser(prog='python -m data.text_tokenizers')
  commands = parser.add_subparsers(dest='command', required=True)
  train = commands.add_parser('train-shapes', help='train the shapes BPE (deterministic)')
  train.add_argument('--out', required=True, help=f'tokenizer.json to write ({SHAPES_BPE_PATH})')
  args = parser.parse_args(argv)
  tok = train_shapes_bpe(shapes_corpus())
  tok.save(args.out)
  print(f'wrote {args.out}: {tok.get_vocab_size()} tokens')


if __name__ == '__main__':
  main()
