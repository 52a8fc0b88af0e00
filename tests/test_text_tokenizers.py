"""data.text_tokenizers: the shapes vocabulary covers the dataset's language; padding, truncation
and masks; 'clip' and 'shapes_bpe' token for token against transformers' CLIPTokenizer and
'siglip' against SiglipTokenizer, built from the same files (written here); the committed shapes
BPE retrains byte-identically; a workdir's copy of the tokenizer reads back."""

import gzip
import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import sentencepiece
import transformers

from data import captions as captions_lib
from data import text_tokenizers
from data.shapes import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny merges file. 'l o</w>' outranks 'he l' but never fires in 'hello': 'l l' (rank 1)
# takes the l's first.
MERGES = [('h', 'e'), ('l', 'l'), ('l', 'o</w>'), ('he', 'l'), ('w', 'o'), ('wo', 'r'),
          ('l', 'd</w>'), ('c', 'a'), ('ca', 't</w>')]
# Punctuation, numbers, unicode (composed and not), HTML entities, whitespace runs, apostrophes,
# upper case, emoji, special-token literals, and the shapes language.
TRICKY = [
    'hello world!', "Hello   WORLD, don't cat's 2024 café  naïve", 'x_y <tag> well-done ÄÖ',
    'a cat\tcatcat hellohello.', '日本 — ok?!', "it's ISN'T we'll they're I'd you've I'm",
    'cafe\u0301 vs café', 'ǅemo ﬁne Straße İstanbul ΣΑΣ', '&amp; &lt;b&gt; &#39;q&#39; &amp;amp;',
    '3.14159 1,000,000 2nd 42nd', '   leading and trailing   ', '\n\ttabs\r\nand newlines',
    'emoji 🙂👍🏽 zwj 👩\u200d💻', '!!!???... ---', "rock'n'roll 'quoted' \"double\"",
    '\u00a0nbsp\u3000ideographic space', '', 'a \u2581 b', 'A SMALL RED CIRCLE. A blue star!',
    'The shapes are close together: a red zebra and 3 other shapes.',
    'a <|endoftext|> b<|startoftext|>',  # transformers reads these as the specials.
]


def _shapes_language(n=200, splits=('train', 'validation', 'held_out')):
  spec = generate.GenSpec(resolution=16, sizes=(n // 2, n // 4, 0, n // 4))
  for split in splits:
    for i in range(spec.size(split)):
      lang = generate.language(spec, split, i, generate.make_scene(spec, split, i))
      yield from lang['captions'] + lang['questions'] + lang['answers']


def _text_cfg(tokenizer, path=''):
  return ml_collections.ConfigDict(dict(caption_key='captions', tokenizer=tokenizer,
                                        tokenizer_path=path, max_len=16))


def test_shapes_language_round_trips_without_unk():
  tok = text_tokenizers.get('shapes')
  texts = list(_shapes_language())
  assert len(texts) > 1000
  ids, mask = tok.encode(texts, max_len=64)
  assert not (ids == tok.unk_id).any()
  assert mask.sum(1).max() < 64  # Nothing was truncated.
  for text, row in zip(texts, ids):
    assert tok.decode(row) == text.lower()


def test_shapes_vocabulary_is_deterministic_and_sorted():
  vocab = text_tokenizers.shapes_vocabulary()
  assert vocab[:4] == ('[PAD]', '[BOS]', '[EOS]', '[UNK]')
  assert list(vocab[4:]) == sorted(set(vocab[4:]))
  tok = text_tokenizers.get('shapes')
  assert tok.vocab_size == len(vocab) and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert text_tokenizers.split_words('A sign says "GO".') == ['a', 'sign', 'says', '"', 'go', '"', '.']


def test_shapes_padding_truncation_and_unknown_words():
  tok = text_tokenizers.get('shapes')
  word = {w: i for i, w in enumerate(tok.vocab)}
  ids, mask = tok.encode(['A red circle.', 'red zebra'], max_len=7)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, 7)
  np.testing.assert_array_equal(ids[0],
                                [1, word['a'], word['red'], word['circle'], word['.'], 2, 0])
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
  tok = text_tokenizers.get('bytes')
  ids, mask = tok.encode(['héllo', ''], max_len=9)
  assert tok.vocab_size == 259
  np.testing.assert_array_equal(ids[0], [1, *(b + 3 for b in 'héllo'.encode()), 2, 0])
  np.testing.assert_array_equal(ids[1], [1, 2] + [0] * 7)
  assert mask.sum(1).tolist() == [8, 2]
  assert tok.decode(ids[0]) == 'héllo'
  cut, _ = tok.encode(['hé'], max_len=4)  # 'h', then the first byte of 'é', then EOS.
  assert tok.decode(cut[0]) == 'h\ufffd'


# ---------------------------------------------------------------------------------------------
# 'clip' and 'shapes_bpe' vs transformers' CLIPTokenizer. In transformers 5 CLIPTokenizer and
# CLIPTokenizerFast are one class (the `tokenizers`-backed one); the slow one is gone.


def write_clip_files(directory, merges, gz=False):
  """vocab.json (OpenAI order) + merges.txt, and the merges alone as OpenAI ships them."""
  directory.mkdir(exist_ok=True)
  text = '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges)
  (directory / 'merges.txt').write_text(text, encoding='utf-8')
  vocab = {s: i for i, s in enumerate(text_tokenizers.clip_vocabulary(merges))}
  (directory / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
  openai = directory / ('bpe.txt.gz' if gz else 'bpe.txt')
  openai.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
  return str(openai)


def assert_clip_parity(tok, hf, texts):
  assert len(hf) == tok.vocab_size
  assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
  ids, mask = tok.encode(texts, max_len=96)
  assert mask.sum(1).max() < 96
  for text, row, row_mask in zip(texts, ids, mask):
    want = hf(text)['input_ids']
    assert row[row_mask].tolist() == want, text
    if text_tokenizers.EOT not in text:
      assert tok.decode(row) == hf.decode(want, skip_special_tokens=True), text
  # Truncation: transformers cuts the text tokens and still ends with EOS, as `encode`.
  cut = hf(texts[1], truncation=True, max_length=6)['input_ids']
  assert tok.encode([texts[1]], max_len=6)[0][0].tolist() == cut


@pytest.mark.parametrize('gz', [True, False])
def test_clip_bpe_hand_worked(tmp_path, gz):
  tok = text_tokenizers.get('clip', path=write_clip_files(tmp_path, MERGES, gz))
  assert tok.vocab_size == 512 + len(MERGES) + 2
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (521, 522, 0)
  # hello: h e l l o</w> -> (h e, rank 0) he l l o</w> -> (l l, rank 1) he ll o</w>; no pair of
  # he/ll/o</w> is a merge. world -> wo r l d</w> -> wor l d</w> -> wor ld</w>.
  assert tok.backend.encode('hello world', add_special_tokens=False).tokens == [
      'he', 'll', 'o</w>', 'wor', 'ld</w>']
  # Merged symbols get ids 512 + rank; single bytes 0..255 in GPT-2 order starting at '!'
  # (so 'o' = 111 - 33 = 78) and with '</w>' 256 + that; '!' is the first byte (0 / 256).
  ids, mask = tok.encode(['  Hello   WORLD! '], max_len=10)
  np.testing.assert_array_equal(ids[0], [521, 512, 513, 256 + 78, 517, 518, 256, 522, 0, 0])
  assert mask[0].tolist() == [True] * 8 + [False] * 2
  assert tok.decode(ids[0]) == 'hello world !'  # '!' is its own word, as in OpenAI's decode.
  cut, _ = tok.encode(['hello world'], max_len=4)
  np.testing.assert_array_equal(cut[0], [521, 512, 513, 522])
  # transformers (hence zoo) leaves HTML entities alone; OpenAI's basic_clean unescapes them.
  assert tok.tokenize('a&amp;b') != tok.tokenize('a&b')


def test_clip_matches_transformers_from_every_file_form(tmp_path):
  openai = write_clip_files(tmp_path / 'hf', MERGES, gz=True)
  hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / 'hf'))
  # The same pipeline, component by component, as transformers wires it.
  tok = text_tokenizers.get('clip', path=str(tmp_path / 'hf'))
  assert json.loads(tok.backend.to_str()) == json.loads(hf.backend_tokenizer.to_str())
  assert_clip_parity(tok, hf, TRICKY)
  (tmp_path / 'json').mkdir()
  hf.backend_tokenizer.save(str(tmp_path / 'json' / 'tokenizer.json'))
  forms = [dict(path=openai), dict(path=str(tmp_path / 'json')),
           dict(path=str(tmp_path / 'json' / 'tokenizer.json')),
           dict(merges_path=str(tmp_path / 'hf' / 'merges.txt'),
                vocab_path=str(tmp_path / 'hf' / 'vocab.json'))]
  want = tok.encode(TRICKY, max_len=96)
  for kwargs in forms:
    got = text_tokenizers.get('clip', **kwargs).encode(TRICKY, max_len=96)
    np.testing.assert_array_equal(got[0], want[0], err_msg=str(kwargs))


def test_shapes_bpe_matches_transformers_clip_tokenizer(tmp_path):
  tok = text_tokenizers.get('shapes_bpe')
  # Pinned: a text tower over it needs vocab_size=755 and eos_token_id=754 (the largest id).
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (755, 753, 754, 0)
  model = json.loads(tok.backend.to_str())['model']
  merges = [tuple(m) for m in model['merges']]
  assert model['vocab'] == {s: i for i, s in enumerate(text_tokenizers.clip_vocabulary(merges))}
  write_clip_files(tmp_path, merges)
  hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  assert_clip_parity(tok, hf, TRICKY + list(_shapes_language(8)))


def test_shapes_bpe_covers_the_language_and_retrains_identically(tmp_path):
  tok = text_tokenizers.get('shapes_bpe')
  with open(text_tokenizers.SHAPES_BPE_PATH, 'rb') as f:
    committed = f.read()
  assert tok.files() == {'tokenizer.json': committed}
  # Splits it was not trained on: every word and run of marks is one token, so nothing falls
  # back to pieces (or could be [UNK]: byte-level BPE has none).
  texts = list(_shapes_language(120, splits=('validation', 'held_out')))
  backend = tok.backend
  for text in texts:
    words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    ids = tok.tokenize(text)
    assert len(ids) == len(words) and max(ids) < tok.bos_id, text  # The unknown id is EOT.
  assert tok.encode(texts, max_len=64)[1].sum(1).max() < 64
  # Unseen text still encodes, in pieces.
  assert len(tok.tokenize('a crimson disk')) > 3
  out = tmp_path / 'tokenizer.json'
  subprocess.run([sys.executable, '-m', 'data.text_tokenizers', 'train-shapes', '--out', str(out)],
                 cwd=REPO, check=True, capture_output=True)
  assert out.read_bytes() == committed


# ---------------------------------------------------------------------------------------------
# 'siglip' vs transformers' SiglipTokenizer.


@pytest.fixture(scope='module')
def spiece(tmp_path_factory):
  """A small SentencePiece model with c4_en's special ids: <pad>=0, </s>=1, <unk>=2, no <s>."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(list(_shapes_language(40)) + TRICKY), model_writer=model,
      vocab_size=150, model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp('siglip') / 'spiece.model'
  path.write_bytes(model.getvalue())
  return str(path)


def test_siglip_matches_transformers(spiece):
  tok = text_tokenizers.get('siglip', path=spiece)
  hf = transformers.SiglipTokenizer(spiece)
  assert tok.bos_id is None and tok.pad_id == tok.eos_id == hf.eos_token_id == hf.pad_token_id == 1
  assert tok.vocab_size == len(hf) == 150
  texts = TRICKY + list(_shapes_language(8))
  for max_len in (64, 8):  # 8 truncates: the last slot keeps </s>.
    ids, mask = tok.encode(texts, max_len=max_len)
    want = hf(texts, padding='max_length', truncation=True, max_length=max_len)
    np.testing.assert_array_equal(ids, want['input_ids'])
    np.testing.assert_array_equal(mask, np.asarray(want['attention_mask'], bool))
  ids, _ = tok.encode(['A RED, red circle.'], max_len=16)
  assert tok.decode(ids[0]) == 'a red red circle'  # Lower case, punctuation gone.


# ---------------------------------------------------------------------------------------------
# Config, workdir and errors.


def test_workdir_copy_reads_back_for_every_tokenizer(tmp_path, spiece):
  clip_files = tmp_path / 'clip'
  write_clip_files(clip_files, MERGES)
  paths = {'shapes': '', 'shapes_bpe': '', 'bytes': '', 'clip': str(clip_files),
           'siglip': spiece}
  assert sorted(paths) == sorted(text_tokenizers.TOKENIZERS)
  texts = ['A small red circle.', 'hello world']
  for name, path in paths.items():
    cfg, workdir = _text_cfg(name, path), str(tmp_path / f'run_{name}')
    captions_lib.check_config(cfg)
    written = text_tokenizers.save_to_workdir(workdir, cfg)
    assert text_tokenizers.save_to_workdir(workdir, cfg) == written  # Identical: a no-op on resume.
    assert [os.path.basename(p) for p in written] == {
        'shapes': ['vocab.txt'], 'shapes_bpe': ['tokenizer.json'], 'bytes': [],
        'clip': ['tokenizer.json'], 'siglip': ['spiece.model']}[name]
    want = captions_lib.build_tokenizer(cfg).encode(texts, 16)
    got = text_tokenizers.load_from_workdir(workdir, cfg).encode(texts, 16)
    np.testing.assert_array_equal(got[0], want[0], err_msg=name)
  with pytest.raises(ValueError, match='another tokenizer'):
    text_tokenizers.save_to_workdir(str(tmp_path / 'run_clip'), _text_cfg('shapes_bpe'))


def test_errors_name_the_key_or_path(tmp_path, spiece):
  with pytest.raises(ValueError, match=r"'sentencepiece'.*\['bytes', 'clip', 'shapes', "):
    text_tokenizers.get('sentencepiece')
  with pytest.raises(ValueError, match='tokenizer_path'):
    text_tokenizers.get('clip')
  with pytest.raises(ValueError, match='tokenizer_path'):
    text_tokenizers.get('siglip')
  with pytest.raises(ValueError, match="'bytes' takes no file"):
    text_tokenizers.get('bytes', path='x')
  for name in ('clip', 'siglip', 'shapes_bpe', 'shapes'):
    with pytest.raises(FileNotFoundError, match='missing'):
      text_tokenizers.get(name, path=str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='holds neither tokenizer.json nor merges.txt'):
    text_tokenizers.get('clip', path=str(tmp_path))
  bad = tmp_path / 'bad.txt'
  bad.write_text('#version\na b c\n')
  with pytest.raises(ValueError, match='two symbols'):
    text_tokenizers.get('clip', path=str(bad))
  with pytest.raises(ValueError, match='not a CLIP BPE'):
    text_tokenizers.get('clip', path=str(_word_level_json(tmp_path)))
  for name, path, error, match in [
      ('wordpiece', '', ValueError, r"tokenizer='wordpiece' is not one of .*'shapes_bpe'"),
      ('clip', '', ValueError, 'needs data.text.tokenizer_path'),
      ('bytes', spiece, ValueError, 'takes no file'),
      ('siglip', str(tmp_path / 'nope.model'), FileNotFoundError, 'tokenizer_path=.*nope')]:
    with pytest.raises(error, match=match):
      captions_lib.check_config(_text_cfg(name, path))


def _word_level_json(tmp_path):
  from tokenizers import Tokenizer, models
  path = tmp_path / 'word.json'
  Tokenizer(models.WordLevel({'[UNK]': 0, 'a': 1}, unk_token='[UNK]')).save(str(path))
  return path
