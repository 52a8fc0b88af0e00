"""Visual question answering: question/answer pairs as token arrays (`config.data.qa`).

Legend: L per-process batch, T max_len tokens, B prompts.

Each example carries several questions with their answers and types (the 'questions',
'answers' and 'question_types' features of the builtin 'shapes' dataset). Every time an
example appears the pipeline picks one question, uniformly among those whose type is in
`data.qa.types` (all types when empty), from a seed of (data seed, global batch index,
example index) and a constant salt: like the captions of `data.text` the pick is a fixed
function of the stream position, yet drawn independently of the caption pick. The batch gets

  qa_tokens      LxT int32  [BOS] question answer [EOS] then [PAD] ('siglip': no BOS);
  qa_mask        LxT bool   True on the real tokens;
  qa_prompt_len  L int32    tokens of [BOS] + question: the answer starts at this index;
  qa_type        L int32    the question's type, an index into `QUESTION_TYPES`.

The question and the answer are tokenized separately, so the answer always starts on a token
boundary (with nothing between them: 'bytes' spells '...star?red'), and `encode_prompts`
builds the same prompt for decoding at evaluation. Nothing is truncated: a pair that does not
fit `data.qa.max_len` raises. `data.text` and `data.qa` may both be set.
"""

import os

import numpy as np

from data import text_tokenizers
from data.shapes import grammar
from data.shapes.questions import QUESTION_TYPES, plural

SCHEMA_HINT = ("config.data.qa = ConfigDict(dict(tokenizer='shapes', tokenizer_path='', "
               'max_len=24, types=()))')
FEATURES = ('questions', 'answers', 'question_types')
# Mixed into the pick's seed so that it is independent of the caption pick of data.text,
# which seeds with (seed, k, index) alone.
_SALT = int.from_bytes(b'qa', 'big')
# Shape names and their plurals -> the shape; colour names are single words.
_SHAPE_WORDS = {**{s: s for s in grammar.SHAPES}, **{plural(s): s for s in grammar.SHAPES}}
_COLOUR_WORDS = frozenset(grammar.COLOUR_NAMES)


def check_config(qa_cfg) -> None:
  """Raises ValueError (FileNotFoundError: a missing tokenizer file) for a config that cannot work.

  Reads no data and no tokenizer file.
  """
  name, path = qa_cfg.tokenizer, qa_cfg.tokenizer_path
  if name not in text_tokenizers.TOKENIZERS:
    raise ValueError(f'data.qa.tokenizer={name!r} is not one of '
                     f'{sorted(text_tokenizers.TOKENIZERS)}; e.g. {SCHEMA_HINT}')
  path_arg = text_tokenizers.TOKENIZERS[name].path_arg
  if path_arg == 'required' and not path:
    raise ValueError(f'data.qa.tokenizer={name!r} needs data.qa.tokenizer_path '
                     '(its vocabulary file or directory)')
  if path_arg == 'none' and path:
    raise ValueError(f'data.qa.tokenizer={name!r} takes no file, but '
                     f'data.qa.tokenizer_path={path!r}')
  if path and not os.path.exists(path):
    raise FileNotFoundError(f'data.qa.tokenizer_path={path!r}: no such file or directory')
  if qa_cfg.max_len < 4:
    raise ValueError(f'data.qa.max_len={qa_cfg.max_len} must be >= 4 '
                     '(BOS, a question, an answer and EOS)')
  allowed_types(qa_cfg)


def allowed_types(qa_cfg) -> tuple[str, ...]:
  """The question types `data.qa.types` allows (every type when it is empty)."""
  types = qa_cfg.types
  if isinstance(types, (str, bytes)) or not isinstance(types, (tuple, list)):
    raise ValueError(f'data.qa.types={types!r} must be a tuple of names from '
                     f'{list(QUESTION_TYPES)} (empty: all), e.g. ("count",)')
  unknown = [t for t in types if t not in QUESTION_TYPES]
  if unknown or len(set(types)) != len(types):
    raise ValueError(f'data.qa.types={tuple(types)!r}: unknown or repeated '
                     f'{unknown or "names"}; allowed: {list(QUESTION_TYPES)} (empty: all)')
  return tuple(types) or QUESTION_TYPES


def check_features(features, dataset: str) -> None:
  """Raises ValueError unless a dataset's features hold the question/answer lists of 'shapes'."""
  missing = [key for key in FEATURES if key not in features]
  if missing:
    raise ValueError(f'data.qa needs the features {list(FEATURES)} (as the builtin \'shapes\' '
                     f'has); {dataset!r} lacks {missing}. Remove data.qa or use such a dataset.')
  names = getattr(getattr(features['question_types'], 'feature', None), 'names', None)
  if names is not None and tuple(names) != QUESTION_TYPES:
    raise ValueError(f"data.qa: {dataset!r} feature 'question_types' has classes {names}; "
                     f'data.qa reads them as {list(QUESTION_TYPES)}')


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _label_name(value, names: tuple[str, ...]) -> str:
  """A ClassLabel as stored (an int) or as the generator writes it (its name)."""
  return _as_str(value) if isinstance(value, (str, bytes)) else names[int(value)]


def examples_qa(example: dict) -> list[tuple[str, str, str]]:
  """[(question, answer, type name)] of every question of a decoded example, in stored order."""
  fields = [list(np.asarray(example[key], object).reshape(-1)) for key in FEATURES]
  return [(_as_str(q), _as_str(a), _label_name(t, QUESTION_TYPES)) for q, a, t in zip(*fields)]


def _prompt_ids(tokenizer: text_tokenizers.Tokenizer, question: str) -> list[int]:
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return bos + tokenizer.tokenize(question)


def encode_prompts(tokenizer: text_tokenizers.Tokenizer, questions: list[str],
                   max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids_BxT int32, prompt_len_B int32): [BOS] question then [PAD], as `qa_tokens` starts.

  The prompt of `qa_tokens[b, :qa_prompt_len[b]]` exactly, for decoding the answer from
  position prompt_len on. A question needs room for at least a one-token answer and EOS
  within max_len (data.qa.max_len), else ValueError.
  """
  if isinstance(questions, str):
    raise TypeError(f'questions must be a list of strings, not the string {questions!r}')
  ids_BxT = np.full((len(questions), max_len), tokenizer.pad_id, np.int32)
  prompt_len_B = np.zeros((len(questions),), np.int32)
  for b, question in enumerate(questions):
    prompt = _prompt_ids(tokenizer, question)
    if len(prompt) + 2 > max_len:
      raise ValueError(f'question {question!r} takes {len(prompt)} tokens with BOS; with a '
                       f'one-token answer and EOS it needs max_len >= {len(prompt) + 2}, '
                       f'but max_len (data.qa.max_len) is {max_len}')
    ids_BxT[b, :len(prompt)] = prompt
    prompt_len_B[b] = len(prompt)
  return ids_BxT, prompt_len_B


def normalize_answer(text: str) -> str:
  """An answer as compared with its reference: lower-case, spaces collapsed, no final '.'."""
  text = ' '.join(text.lower().split())
  return text[:-1].rstrip() if text.endswith('.') else text


class QuestionAnswers:
  """Picks and tokenizes one question/answer pair per example of a batch."""

  def __init__(self, qa_cfg, seed: int):
    self.max_len, self.seed = qa_cfg.max_len, seed
    self.types = allowed_types(qa_cfg)
    self.tokenizer = text_tokenizers.from_config(qa_cfg)

  def spec(self, local: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of the arrays `tokens` adds to a per-process batch."""
    return {'qa_tokens': ((local, self.max_len), np.dtype(np.int32)),
            'qa_mask': ((local, self.max_len), np.dtype(bool)),
            'qa_prompt_len': ((local,), np.dtype(np.int32)),
            'qa_type': ((local,), np.dtype(np.int32))}

  def pick(self, example: dict, index: int, k: int) -> tuple[str, str, str]:
    """(question, answer, type) of dataset example `index` asked in global batch k.

    ValueError when the example has no question of an allowed type: every shapes scene is
    asked 'count', 'shape' and 'exists', but e.g. 'read_text' only of scenes with a sign, so
    data.qa.types=('read_text',) fails on the first scene without one.
    """
    options = [qa for qa in examples_qa(example) if qa[2] in self.types]
    if not options:
      raise ValueError(f'example {int(index)} has no question of a type in data.qa.types='
                       f'{self.types}; every example needs one (the shapes dataset asks '
                       "'count', 'shape' and 'exists' of every scene)")
    rng = np.random.default_rng([self.seed, int(k), int(index), _SALT])
    return options[int(rng.integers(len(options)))]

  def tokens(self, examples: list[dict], indices_L: np.ndarray, k: int,
             batch: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """{'qa_tokens', 'qa_mask', 'qa_prompt_len', 'qa_type'} for decoded examples at `indices_L`.

    ValueError (naming data.qa.max_len and the length needed) for a pair that does not fit.
    `batch` (the images so far) is not read: the signature is the one `Captions.tokens` shares.
    """
    n = len(examples)
    ids_LxT = np.full((n, self.max_len), self.tokenizer.pad_id, np.int32)
    mask_LxT = np.zeros((n, self.max_len), bool)
    prompt_len_L, type_L = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
    for b, (example, index) in enumerate(zip(examples, indices_L)):
      question, answer, qtype = self.pick(example, index, k)
      prompt = _prompt_ids(self.tokenizer, question)
      seq = prompt + self.tokenizer.tokenize(answer) + [self.tokenizer.eos_id]
      if len(seq) > self.max_len:
        raise ValueError(f'data.qa.max_len={self.max_len} is too small: question {question!r} '
                         f'with answer {answer!r} needs {len(seq)} tokens')
      ids_LxT[b, :len(seq)] = seq
      mask_LxT[b, :len(seq)] = True
      prompt_len_L[b], type_L[b] = len(prompt), QUESTION_TYPES.index(qtype)
    return {'qa_tokens': ids_LxT, 'qa_mask': mask_LxT, 'qa_prompt_len': prompt_len_L,
            'qa_type': type_L}


def hallucinations(text: str, example: dict) -> dict:
  """{'named': n, 'absent': [words]}: shape and colour words of `text` missing from the scene.

  A shape word (singular or plural: 'circle', 'crosses') or colour word counts once however
  often it occurs, in its canonical form (the singular for shapes); 'named' is how many
  distinct ones the text names and 'absent' lists (sorted) those no object of `example` has:
  a word is present if any object has that shape or that colour, whatever the pairing. The
  person and the sign are not shapes, 'shape' and 'object' name no shape, and words inside
  double quotes (the sign's text) are skipped. `example['objects']` holds 'shape' and
  'colour' as ClassLabel ints (a decoded TFDS example) or as names (the generator's output).
  """
  words, quoted = [], False
  for word in text_tokenizers.split_words(text):
    if word == '"':
      quoted = not quoted
    elif not quoted:
      words.append(word)
  named = {_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS}
  named |= {w for w in words if w in _COLOUR_WORDS}
  objects = example['objects']
  present = {_label_name(s, grammar.SHAPES) for s in np.asarray(objects['shape']).reshape(-1)}
  present |= {_label_name(c, grammar.COLOUR_NAMES)
              for c in np.asarray(objects['colour']).reshape(-1)}
  return {'named': len(named), 'absent': sorted(named - present)}
