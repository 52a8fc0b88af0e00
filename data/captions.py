"""Captions as token arrays for text-conditioned tasks (`config.data.text`).

Legend: L per-process batch, T max_len tokens.

Each example carries several captions (a `Sequence(Text)` feature) or one (`Text`). Every
time an example appears the pipeline picks one of them from a seed of (data seed, global
batch index, example index), so the choice is a fixed function of the stream position
(resume stays exact, and any process count draws the same captions) and a second epoch
shows other paraphrases. Tokens follow `data.text_tokenizers`: [BOS] words [EOS] then padding
('siglip': no BOS).

Colour-blind views (optional `colour_blind` p and `colour_words`): each time an example
appears, with probability p (drawn from the same seed) its image is shown in grey, the
largest of its channels at each pixel (HSV's value, so a saturated object stays bright against
a grey ground where luminance could match it), and its caption loses the colour words. Shape
then has to be read apart from colour, and no colour/shape pair is shown that the data does not
hold (a greyed held-out shape has no colour).
"""

import os
import re

import numpy as np

from data import text_tokenizers

SCHEMA_HINT = ("config.data.text = ConfigDict(caption_key='captions', tokenizer='shapes', "
               "tokenizer_path='', max_len=24)")


def check_config(text_cfg) -> None:
  """Raises ValueError (FileNotFoundError: a missing tokenizer file) for a config that cannot work.

  Reads no data and no tokenizer file.
  """
  if not text_cfg.caption_key:
    raise ValueError(f'data.text.caption_key must name a text feature; e.g. {SCHEMA_HINT}')
  if text_cfg.tokenizer not in text_tokenizers.TOKENIZERS:
    raise ValueError(f'data.text.tokenizer={text_cfg.tokenizer!r} is not one of '
                     f'{sorted(text_tokenizers.TOKENIZERS)}')
  path_arg = text_tokenizers.TOKENIZERS[text_cfg.tokenizer].path_arg
  if path_arg == 'required' and not text_cfg.tokenizer_path:
    raise ValueError(f'data.text.tokenizer={text_cfg.tokenizer!r} needs data.text.tokenizer_path '
                     '(its vocabulary file or directory)')
  if path_arg == 'none' and text_cfg.tokenizer_path:
    raise ValueError(f'data.text.tokenizer={text_cfg.tokenizer!r} takes no file, but '
                     f'data.text.tokenizer_path={text_cfg.tokenizer_path!r}')
  if text_cfg.tokenizer_path and not os.path.exists(text_cfg.tokenizer_path):
    raise FileNotFoundError(f'data.text.tokenizer_path={text_cfg.tokenizer_path!r}: no such '
                            'file or directory')
  if text_cfg.max_len < 2:
    raise ValueError(f'data.text.max_len={text_cfg.max_len} must be >= 2 (BOS and EOS)')
  p, words = text_cfg.get('colour_blind', 0.0), text_cfg.get('colour_words', ())
  if not 0.0 <= p < 1.0:
    raise ValueError(f'data.text.colour_blind={p} must be in [0, 1)')
  if p and not (words and all(isinstance(w, str) and w.strip() for w in words)):
    raise ValueError(f'data.text.colour_blind={p} needs data.text.colour_words, the words to drop '
                     f"from a greyed example's caption, e.g. ('red', 'green'); got {words!r}")


def build_tokenizer(text_cfg) -> text_tokenizers.Tokenizer:
  """The tokenizer `config.data.text` names (with its vocabulary file, if any)."""
  return text_tokenizers.from_config(text_cfg)


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class Captions:
  """Picks and tokenizes one caption per example of a batch."""

  def __init__(self, text_cfg, seed: int):
    self.key, self.max_len, self.seed = text_cfg.caption_key, text_cfg.max_len, seed
    self.tokenizer = build_tokenizer(text_cfg)
    self.colour_blind = float(text_cfg.get('colour_blind', 0.0))
    words = '|'.join(re.escape(w.strip()) for w in text_cfg.get('colour_words', ()))
    self._colour_words = re.compile(rf'\b(?:{words})\b\s*', re.IGNORECASE) if words else None

  def spec(self, local: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of the arrays `tokens` adds to a per-process batch."""
    return {'tokens': ((local, self.max_len), np.dtype(np.int32)),
            'tokens_mask': ((local, self.max_len), np.dtype(bool))}

  def pick(self, example: dict, index: int, k: int) -> str:
    """The caption of dataset example `index` shown in global batch k ('' if it has none)."""
    value = example[self.key]
    options = [value] if isinstance(value, (str, bytes)) else list(np.asarray(value).reshape(-1))
    if not options:
      return ''
    rng = np.random.default_rng([self.seed, int(k), int(index)])
    return _as_str(options[int(rng.integers(len(options)))])

  def greyed(self, index: int, k: int) -> bool:
    """Whether dataset example `index` is shown colour-blind in global batch k."""
    if not self.colour_blind:
      return False
    return bool(np.random.default_rng([self.seed, int(k), int(index), 1]).random()
                < self.colour_blind)

  def without_colours(self, caption: str) -> str:
    """`caption` without its colour words ('A large red star.' -> 'A large star.')."""
    text = self._colour_words.sub('', caption)
    text = re.sub(r'\b([Aa])n (?=[^\W\daeiouAEIOU])', r'\1 ', text)  # 'an orange star'
    text = re.sub(r'\b([Aa]) (?=[aeiouAEIOU])', r'\1n ', text)  # 'a red oval'
    return text[:1].upper() + text[1:] if caption[:1].isupper() else text

  def tokens(self, examples: list[dict], indices_L: np.ndarray, k: int,
             batch: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """{'tokens': LxT int32, 'tokens_mask': LxT bool} for decoded examples at `indices_L`, and
    {'image'} of `batch` with its colour-blind rows greyed when there are any."""
    grey_L = np.array([self.greyed(i, k) for i in indices_L], bool)
    if grey_L.any() and batch is None:
      raise ValueError('colour-blind views need the batch whose images they grey')
    texts = [self.without_colours(self.pick(ex, i, k)) if g else self.pick(ex, i, k)
             for ex, i, g in zip(examples, indices_L, grey_L)]
    ids_LxT, mask_LxT = self.tokenizer.encode(texts, self.max_len)
    out = {'tokens': ids_LxT, 'tokens_mask': mask_LxT}
    if grey_L.any():
      image_LxRxRxC = batch['image'].copy()
      value_LxRxRx1 = image_LxRxRxC[grey_L].max(-1, keepdims=True)
      image_LxRxRxC[grey_L] = np.broadcast_to(value_LxRxRx1, value_LxRxRx1.shape[:-1] +
                                              image_LxRxRxC.shape[-1:])
      out['image'] = image_LxRxRxC
    return out
