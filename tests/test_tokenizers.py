"""data.tokenizers: the shapes vocabulary covers the dataset's language; padding, truncation
and masks; CLIP BPE against a hand-worked merge (transformers parity: test_text_parity.py)."""

import gzip

import numpy as np
import pytest

from data import tokenizers
from data.shapes import generate

# A tiny merges file. 'l o</w>' outranks 'he l' but never fires in 'hello': 'l l' (rank 1)
# takes the l's first.
MERGES = [('h', 'e'), ('l', 'l'), ('l', 'o</w>'), ('he', 'l'), ('w', 'o'), ('wo', 'r'),
          ('l', 'd</w>'), ('c', 'a'), ('ca', 't</w>')]


def _shapes_language(n=200):
  spec = generate.GenSpec(resolution=16, sizes=(n // 2, n // 4, 0, n // 4))
  for split in ('train', 'validation', 'held_out'):
    for i in range(spec.size(split)):
      lang = generate.language(spec, split, i, generate.make_scene(spec, split, i))
      yield from lang['captions'] + lang['questions'] + lang['answers']


def test_shapes_language_round_trips_without_unk():
  tok = tokenizers.get('shapes')
  texts = list(_shapes_language())
  assert len(texts) > 1000
  ids, mask = tok.encode(texts, max_len=64)
  assert not (ids == tok.unk_id).any()
  assert mask.sum(1).max() < 64  # Nothing was truncated.
  for text, row in zip(texts, ids):
    assert tok.decode(row) == text.lower()


def test_shapes_vocabulary_is_deterministic_and_sorted():
  vocab = tokenizers.shapes_vocabulary()
  assert vocab[:4] == ('[PAD]', '[BOS]', '[EOS]', '[UNK]')
  assert list(vocab[4:]) == sorted(set(vocab[4:]))
  tok = tokenizers.get('shapes')
  assert tok.vocab_size == len(vocab) and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tokenizers.split_words('A sign says "GO".') == ['a', 'sign', 'says', '"', 'go', '"', '.']


def test_shapes_padding_truncation_and_unknown_words():
  tok = tokenizers.get('shapes')
  word = {w: i for i, w in enumerate(tok.vocab)}
  ids, mask = tok.encode(['A red circle.', 'red zebra'], max_len=7)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, 7)
  np.testing.assert_array_equal(ids[0], [1, word['a'], word['red'], word['circle'], word['.'], 2, 0])
  np.testing.assert_array_equal(mask[0], [True] * 6 + [False])
  np.testing.assert_array_equal(ids[1], [1, word['red'], tok.unk_id, 2, 0, 0, 0])
  np.testing.assert_array_equal(mask[1], [True] * 4 + [False] * 3)
  short, short_mask = tok.encode(['A red circle.'], max_len=4)
  np.testing.assert_array_equal(short[0], [1, word['a'], word['red'], 2])  # EOS stays last.
  assert short_mask.all()
  assert tok.decode(short[0]) == 'a red'
  with pytest.raises(ValueError, match='max_len=1'):
    tok.encode(['x'], max_len=1)
  with pytest.raises(TypeError, match='list of strings'):
    tok.encode('a red circle', max_len=8)


def test_bytes_tokenizer():
  tok = tokenizers.get('bytes')
  ids, mask = tok.encode(['héllo', ''], max_len=9)
  assert tok.vocab_size == 259
  np.testing.assert_array_equal(ids[0], [1, *(b + 3 for b in 'héllo'.encode()), 2, 0])
  np.testing.assert_array_equal(ids[1], [1, 2] + [0] * 7)
  assert mask.sum(1).tolist() == [8, 2]
  assert tok.decode(ids[0]) == 'héllo'
  cut, _ = tok.encode(['hé'], max_len=4)  # 'h', then the first byte of 'é', then EOS.
  assert tok.decode(cut[0]) == 'h\ufffd'


def write_merges(tmp_path, gz):
  text = '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in MERGES)
  path = tmp_path / ('merges.txt.gz' if gz else 'merges.txt')
  path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
  return str(path)


@pytest.mark.parametrize('gz', [True, False])
def test_clip_bpe_hand_worked(tmp_path, gz):
  tok = tokenizers.get('clip', merges_path=write_merges(tmp_path, gz))
  assert tok.vocab_size == 512 + len(MERGES) + 2
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (521, 522, 0)
  # hello: h e l l o</w> -> (h e, rank 0) he l l o</w> -> (l l, rank 1) he ll o</w>; no pair of
  # he/ll/o</w> is a merge. world -> wo r l d</w> -> wor l d</w> -> wor ld</w>.
  assert tok.bpe('hello') == ('he', 'll', 'o</w>')
  assert tok.bpe('world') == ('wor', 'ld</w>')
  # Merged symbols get ids 512 + rank; single bytes 0..255 in GPT-2 order starting at '!'
  # (so 'o' = 111 - 33 = 78) and with '</w>' 256 + that; '!' is the first byte (0 / 256).
  ids, mask = tok.encode(['  Hello   WORLD! '], max_len=10)
  np.testing.assert_array_equal(ids[0], [521, 512, 513, 256 + 78, 517, 518, 256, 522, 0, 0])
  assert mask[0].tolist() == [True] * 8 + [False] * 2
  assert tok.decode(ids[0]) == 'hello world !'  # '!' is its own word, as in OpenAI's decode.
  cut, _ = tok.encode(['hello world'], max_len=4)
  np.testing.assert_array_equal(cut[0], [521, 512, 513, 522])
  # OpenAI's basic_clean unescapes HTML twice.
  assert tok.tokenize('a&amp;amp;b') == tok.tokenize('a&b')


def test_get_errors(tmp_path):
  with pytest.raises(ValueError, match=r"'sentencepiece'.*\['bytes', 'clip', 'shapes'\]"):
    tokenizers.get('sentencepiece')
  with pytest.raises(ValueError, match='merges_path'):
    tokenizers.get('clip')
  with pytest.raises(FileNotFoundError):
    tokenizers.get('clip', merges_path=str(tmp_path / 'missing.txt.gz'))
  bad = tmp_path / 'bad.txt'
  bad.write_text('#version\na b c\n')
  with pytest.raises(ValueError, match='two symbols'):
    tokenizers.get('clip', merges_path=str(bad))
