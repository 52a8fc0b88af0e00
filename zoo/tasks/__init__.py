"""The task registry: `config.task.name` -> the training objective the loop runs."""

from zoo.tasks import classification
from zoo.tasks import consistency
from zoo.tasks import contrastive
from zoo.tasks import controlnet
from zoo.tasks import diffusion
from zoo.tasks import distill
from zoo.tasks import inpaint
from zoo.tasks import lora
from zoo.tasks import text_controlnet
from zoo.tasks import text_to_image
from zoo.tasks import vae
from zoo.tasks import vlm

TASKS = {
    'classification': classification.ClassificationTask,
    'consistency_distillation': consistency.ConsistencyDistillationTask,
    'contrastive': contrastive.ContrastiveTask,
    'controlnet': controlnet.ControlNetTask,
    'diffusion': diffusion.DiffusionTask,
    'inpaint': inpaint.InpaintTask,
    'progressive_distillation': distill.ProgressiveDistillationTask,
    'text_controlnet': text_controlnet.TextControlNetTask,
    'text_to_image': text_to_image.TextToImageTask,
    'vae': vae.VAETask,
    'vlm': vlm.VLMTask,
}


def _task_class(name):
  if name not in TASKS:
    raise ValueError(f'config.task.name={name!r} is not one of {sorted(TASKS)}')
  return TASKS[name]


def check_config(config):
  """Validates `config.task` and `config.model` (the task knows which models it drives)."""
  _task_class(config.task.get('name', None)).check_config(config)
  if 'lora' in config:
    lora.check_config(config)


def build(config):
  """The task object for an experiment: `init`, `loss` and named `predict` functions."""
  task = _task_class(config.task.name)(config)
  if 'lora' in config:
    return lora.LoRATask(task, config.lora)
  return task
