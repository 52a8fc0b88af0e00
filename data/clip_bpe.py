"""OpenAI CLIP's byte-level BPE built in the `tokenizers` library, wired as transformers'
CLIPTokenizer(Fast): the pipeline, the merges / vocabulary readers and the file lookup.

It differs from OpenAI's simple_tokenizer in two places, both only on unusual text: NFC stands in
for ftfy's mojibake repair, and HTML entities ('&amp;') are not unescaped. `data.text_tokenizers`
wraps it as the 'clip' and 'shapes_bpe' tokenizers.
"""

import functools
import gzip
import json
import os

import tokenizers as hf_tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

SOT, EOT, END_OF_WORD = '<|startoftext|>', '<|endoftext|>', '</w>'
# OpenAI reads lines [1, 49152 - 256 - 2 + 1) of bpe_simple_vocab_16e6.txt.gz: 48894 merges.
MAX_MERGES = 49152 - 256 - 2
# OpenAI's pre-tokenizer pattern (simple_tokenizer.py), as transformers spells it.
CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
              r'|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+')


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


def read_merges(path: str, limit: int | None = None) -> list[tuple[str, str]]:
  """Merge pairs of a merges.txt or bpe_simple_vocab_16e6.txt(.gz): '#version' header, 'a b' lines.

  `limit` keeps the first merges only (OpenAI reads MAX_MERGES of its 262k-line file).
  """
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  lines = raw.decode('utf-8').split('\n')
  if lines and '#version' in lines[0]:
    lines = lines[1:]
  merges = [tuple(line.split()) for line in lines if line.strip()][:limit]
  bad = [m for m in merges if len(m) != 2]
  if bad:
    raise ValueError(f'merges file {path}: lines must be two symbols, got {bad[0]}')
  return merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> list[str]:
  """OpenAI's order: bytes, bytes + '</w>', merged symbols, SOT, EOT (49408 for the real file)."""
  chars = list(bytes_to_unicode().values())
  return [*chars, *(c + END_OF_WORD for c in chars), *(a + b for a, b in merges), SOT, EOT]


def wire_clip(tok: hf_tokenizers.Tokenizer) -> hf_tokenizers.Tokenizer:
  """CLIP's normalizer (NFC, whitespace runs -> ' ', lower case), pre-tokenizer and decoder."""
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(hf_tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(hf_tokenizers.Regex(CLIP_SPLIT), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def clip_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]) -> hf_tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` transformers' CLIPTokenizer builds from vocab.json + merges.txt."""
  for special in (SOT, EOT):
    if special not in vocab:
      raise ValueError(f'CLIP vocabulary lacks {special!r}')
  tok = wire_clip(hf_tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=merges, continuing_subword_prefix='', end_of_word_suffix=END_OF_WORD,
      fuse_unk=False, unk_token=EOT)))
  tok.add_special_tokens([hf_tokenizers.AddedToken(s, normalized=False, special=True)
                          for s in (SOT, EOT)])
  tok.post_processor = processors.RobertaProcessing(
      (EOT, vocab[EOT]), (SOT, vocab[SOT]), trim_offsets=False, add_prefix_space=False)
  return tok


def load_clip(path: str, merges_path: str, vocab_path: str) -> hf_tokenizers.Tokenizer:
  """From a tokenizer.json, a directory, vocab.json + merges.txt, or a merges file alone."""
  if path and os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, 'tokenizer.json')):
      merges_path, vocab_path = (os.path.join(path, n) for n in ('merges.txt', 'vocab.json'))
      for name in (merges_path, vocab_path):
        if not os.path.isfile(name):
          raise FileNotFoundError(f"tokenizer 'clip': {path} holds neither tokenizer.json nor "
                                  f'{os.path.basename(name)}')
      path = ''
  if path:
    path = file_in(path, ('tokenizer.json',), "tokenizer 'clip'")
    if path.endswith('.json'):
      return hf_tokenizers.Tokenizer.from_file(path)
    merges_path = path
  if vocab_path:
    with open(vocab_path, encoding='utf-8') as f:
      vocab = json.load(f)
    return clip_pipeline(vocab, read_merges(merges_path))
  # OpenAI's merges-only file: the vocabulary follows from the merges.
  merges = read_merges(merges_path, MAX_MERGES)
  return clip_pipeline({s: i for i, s in enumerate(clip_vocabulary(merges))}, merges)


def file_in(path: str, names: tuple[str, ...], what: str) -> str:
  """`path` itself if a file, else the first of `names` inside the directory `path`."""
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    for name in names:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f'{what}: directory {path} holds none of {list(names)}')
  raise FileNotFoundError(f'{what}: no such file or directory: {path}')
