"""Hugging Face `transformers` state dicts -> zoo params (NUMERICS.md Multimodal 4.3).

The input is `{name: numpy array}`, as `safetensors.numpy.load_file` returns it: nothing is
unpickled. Names: `encoder.layers.3.mlp.fc1.weight` -> `encoder/layers_3/mlp/fc1/kernel` (an
integer joins the module before it); linear W -> W.T, LayerNorm `weight` -> `scale`, embedding
`weight` -> `embedding`.
"""

import numpy as np

from zoo.convert import diffusers

TEXT_PREFIX = 'text_model.'
TEXT_MODULES = ('embeddings', 'encoder', 'final_layer_norm')
TEXT_PROJECTION = 'text_projection.weight'
# Modules whose 2-D `weight` is a lookup table, not a linear map.
EMBEDDINGS = ('token_embedding', 'position_embedding')
# Non-parameter buffers some checkpoints carry.
BUFFERS = ('position_ids',)


def from_hf_clip_text(state_dict) -> dict:
  """zoo TextTransformer params from an HF CLIP state dict.

  Accepts `CLIPTextModel` (keys `text_model.*` as on the Hub, or bare `embeddings.*`,
  `encoder.*`, `final_layer_norm.*` as transformers>=5 saves it), `CLIPTextModelWithProjection`
  or a full `CLIPModel` state dict. Only the text tower and `text_projection.weight` are read;
  the vision tower, `logit_scale` and buffers are ignored.
  """
  items = []
  for key, value in state_dict.items():
    name = key.removeprefix(TEXT_PREFIX)
    if key == TEXT_PROJECTION:
      items.append((('text_projection', 'kernel'), np.asarray(value).T))
    elif name.split('.')[0] in TEXT_MODULES and name.rsplit('.', 1)[-1] not in BUFFERS:
      items.append(diffusers.convert_key(name, value, embeddings=EMBEDDINGS))
  if not any(path[0] != 'text_projection' for path, _ in items):
    raise ValueError(f'no CLIP text-tower keys ({TEXT_PREFIX}* or {TEXT_MODULES}) in the state '
                     f'dict; got e.g. {sorted(state_dict)[:5]}')
  return diffusers.nest(items)
