"""Tokenizers: text <-> int32 ids with a padding mask, looked up by name with `get`.

  'shapes'  word level, the vocabulary of the procedural shapes dataset's language;
  'bytes'   UTF-8 bytes;
  'clip'    OpenAI CLIP's byte-level BPE, read from a merges file the user gives (no downloads).

Every tokenizer encodes a text as [BOS] tokens [EOS], padded with `pad_id` (mask False) or
truncated to `max_len` with EOS kept in the last slot (OpenAI `clip.tokenize(truncate=True)`).
Legend: B texts, L max_len.
"""

import functools
import gzip
import html
import itertools
import math
import re
import sys
import unicodedata

import numpy as np

from data.shapes import captions
from data.shapes import grammar
from data.shapes import questions
from data.shapes import relations


class Tokenizer:
  """Shared `encode`: subclasses give `pad_id`, `bos_id`, `eos_id` and `tokenize(text)`."""

  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def tokenize(self, text: str) -> list[int]:
    """The ids of `text` without BOS/EOS."""
    raise NotImplementedError

  def encode(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BxL int32, mask_BxL bool): [BOS] tokens [EOS], padded or truncated to max_len."""
    if isinstance(texts, str):
      raise TypeError(f'texts must be a list of strings, not the string {texts!r}')
    if max_len < 2:
      raise ValueError(f'max_len={max_len} must be >= 2 (room for BOS and EOS)')
    ids_BxL = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask_BxL = np.zeros((len(texts), max_len), bool)
    for b, text in enumerate(texts):
      seq = [self.bos_id, *self.tokenize(text), self.eos_id]
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
  """Word level over `shapes_vocabulary()`; [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3."""

  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

  def __init__(self):
    self.vocab = shapes_vocabulary()
    self.vocab_size = len(self.vocab)
    self._ids = {w: i for i, w in enumerate(self.vocab)}

  def tokenize(self, text: str) -> list[int]:
    """Word ids; words outside the vocabulary become [UNK]."""
    return [self._ids.get(w, self.unk_id) for w in split_words(text)]

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

  def tokenize(self, text: str) -> list[int]:
    """One id per UTF-8 byte."""
    return [b + self.offset for b in text.encode('utf-8')]

  def decode(self, ids) -> str:
    """Text up to the first EOS; invalid UTF-8 (e.g. a truncated character) decodes as U+FFFD."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i >= self.offset:
        out.append(i - self.offset)
    return out.decode('utf-8', errors='replace')


# ---------------------------------------------------------------------------------------------
# 'clip': OpenAI CLIP BPE (openai/CLIP clip/simple_tokenizer.py), without ftfy.

SOT, EOT, END_OF_WORD = '<|startoftext|>', '<|endoftext|>', '</w>'
# OpenAI reads lines [1, 49152 - 256 - 2 + 1) of bpe_simple_vocab_16e6.txt.gz: 48894 merges.
MAX_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (same order as OpenAI's)."""
  bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
        *range(ord('®'), ord('ÿ') + 1)]
  cs, n = list(bs), 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _char_class(prefix: str) -> str:
  """Code-point ranges of every character whose Unicode category starts with `prefix`."""
  ranges, start = [], None
  for cp in range(sys.maxunicode + 2):
    hit = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
    if hit and start is None:
      start = cp
    elif not hit and start is not None:
      ranges.append(f'\\U{start:08x}-\\U{cp - 1:08x}')
      start = None
  return ''.join(ranges)


@functools.lru_cache(maxsize=1)
def clip_pattern() -> re.Pattern:
  """OpenAI's pre-tokenizer regex; `regex`'s \\p{L} / \\p{N} spelled as stdlib classes."""
  letters, numbers = _char_class('L'), _char_class('N')
  return re.compile(
      rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
      rf'|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+', re.IGNORECASE)


def clean_text(text: str) -> str:
  """simple_tokenizer's basic_clean + whitespace_clean + lower, with NFC in place of ftfy.

  ftfy repairs mojibake; on well-formed text its effect is its NFC normalisation.
  """
  text = html.unescape(html.unescape(unicodedata.normalize('NFC', text))).strip()
  return re.sub(r'\s+', ' ', text).strip().lower()


def read_merges(path: str) -> list[tuple[str, str]]:
  """Merge pairs from a bpe_simple_vocab_16e6.txt(.gz)-format file: a header line, 'a b' lines."""
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  lines = raw.decode('utf-8').split('\n')[1:MAX_MERGES + 1]
  merges = [tuple(line.split()) for line in lines if line.strip()]
  bad = [m for m in merges if len(m) != 2]
  if bad:
    raise ValueError(f'merges file {path}: lines must be two symbols, got {bad[0]}')
  return merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> list[str]:
  """OpenAI's order: bytes, bytes + '</w>', merged symbols, SOT, EOT (49408 for the real file)."""
  chars = list(bytes_to_unicode().values())
  return [*chars, *(c + END_OF_WORD for c in chars), *(a + b for a, b in merges), SOT, EOT]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  """Merges every non-overlapping occurrence of `pair`, left to right."""
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(word[i] + word[i + 1])
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


class ClipTokenizer(Tokenizer):
  """OpenAI CLIP BPE. SOT/EOT are the last two ids; padding is id 0 ('!'), as `clip.tokenize`.

  Since pad id 0 is also '!', only the mask tells padding from text.
  """

  pad_id = 0

  def __init__(self, merges_path: str):
    self.ranks = {m: r for r, m in enumerate(read_merges(merges_path))}
    self.vocab = clip_vocabulary(list(self.ranks))
    self.vocab_size = len(self.vocab)
    self.encoder = {s: i for i, s in enumerate(self.vocab)}
    self.bos_id, self.eos_id = self.encoder[SOT], self.encoder[EOT]
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self._cache = {SOT: (SOT,), EOT: (EOT,)}

  def bpe(self, token: str) -> tuple[str, ...]:
    """BPE symbols of one pre-token (byte-encoded): merge the lowest-ranked pair until none."""
    if token not in self._cache:
      word = (*token[:-1], token[-1] + END_OF_WORD)
      while len(word) > 1:
        pair = min(itertools.pairwise(word), key=lambda p: self.ranks.get(p, math.inf))
        if pair not in self.ranks:
          break
        word = _merge(word, pair)
      self._cache[token] = word
    return self._cache[token]

  def tokenize(self, text: str) -> list[int]:
    """BPE ids of the cleaned, lower-cased text."""
    ids = []
    for token in clip_pattern().findall(clean_text(text)):
      token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
      ids.extend(self.encoder[s] for s in self.bpe(token))
    return ids

  def decode(self, ids) -> str:
    """Text up to the first EOT, SOT dropped; '</w>' becomes a space, trailing space stripped."""
    symbols = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i != self.bos_id:
        symbols.append(self.vocab[i])
    text = bytearray(self.byte_decoder[c] for c in ''.join(symbols))
    return text.decode('utf-8', errors='replace').replace(END_OF_WORD, ' ').strip()


TOKENIZERS = {'shapes': ShapesTokenizer, 'bytes': BytesTokenizer, 'clip': ClipTokenizer}


def get(name: str, **kwargs) -> Tokenizer:
  """The tokenizer `name` ('shapes', 'bytes', or 'clip' with merges_path=...)."""
  if name not in TOKENIZERS:
    raise ValueError(f'tokenizer {name!r} is not one of {sorted(TOKENIZERS)}')
  if name == 'clip':
    path = kwargs.get('merges_path')
    if not path:
      raise ValueError("tokenizer 'clip' needs merges_path=<bpe_simple_vocab_16e6.txt.gz>")
    with open(path, 'rb'):  # FileNotFoundError names the path before any parsing.
      pass
  return TOKENIZERS[name](**kwargs)
