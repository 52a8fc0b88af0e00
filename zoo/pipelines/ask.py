"""`zoo ask`: questions about an image (or its caption) from a VLM run's checkpoint.

The image is read as the data pipeline reads the run's dataset (center-cropped, resized to
the model's resolution, in [-1, 1]); questions are tokenized with the tokenizer the run saved
in its workdir and answered with the task's greedy or beam decoding (KV cache, one jit).
"""

import jax
import jax.numpy as jnp
import numpy as np

from data import qa
from data import text_tokenizers
from zoo import embedding
from zoo import runs

DECODINGS = ('greedy', 'beam')


def ask(workdir, image_path, questions, *, decoding='greedy', step=None, use_ema=True):
  """The answers of the run in `workdir` to `questions` about the image at `image_path`.

  A captioning run takes no question: pass [''] (or nothing) to get the caption.
  """
  if decoding not in DECODINGS:
    raise ValueError(f'--decoding={decoding!r}; allowed: {list(DECODINGS)}')
  config, s, state = runs.load(workdir, step)
  task = s.task
  if config.task.name != 'vlm':
    raise ValueError(f'{workdir} holds a {config.task.name!r} run; zoo ask needs a vlm run')
  questions = list(questions) or ['']
  if config.task.objective == 'caption' and questions != ['']:
    raise ValueError(f'{workdir} is a captioning run: it takes no question')
  if config.task.objective == 'vqa' and not all(q.strip() for q in questions):
    raise ValueError(f'{workdir} is a VQA run: ask a question')
  tokenizer = text_tokenizers.load_from_workdir(workdir, task.text_cfg)
  image = embedding.load_image(image_path, config.data.resolution, task.model.in_channels)
  ids, prompt_len = qa.encode_prompts(tokenizer, questions, task.max_len)
  images = jnp.asarray(np.repeat(image[None], len(questions), axis=0))
  params = jax.device_put(state['ema_params' if use_ema else 'params'], jax.devices()[0])
  tokens = task.predict[decoding](params, images, jnp.asarray(ids), jnp.asarray(prompt_len))
  return [tokenizer.decode(row) for row in np.asarray(tokens)]
