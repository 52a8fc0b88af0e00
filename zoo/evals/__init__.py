"""The evaluator registry: `config.evals.<name>.type` -> an evaluator with `run(state, step)`."""

from zoo import config as zoo_config
from zoo.evals import (accuracy, adherence, control, fd, inpaint, loss, reconstruction,
                       retrieval, sample_grid, vqa, zero_shot)

EVALUATORS = {
    'accuracy': accuracy.Accuracy,
    'dataset_accuracy': accuracy.DatasetAccuracy,
    'adherence': adherence.Adherence,
    'caption_bleu': vqa.Captioning,
    'control': control.ControlAdherence,
    'fd_zoo': fd.FDZoo,
    'inpaint': inpaint.InpaintQuality,
    'loss': loss.EvalLoss,
    'prompt_grid': sample_grid.PromptGrid,
    'reconstruction': reconstruction.Reconstruction,
    'retrieval': retrieval.Retrieval,
    'sample_grid': sample_grid.SampleGrid,
    'vqa': vqa.VQA,
    'zero_shot': zero_shot.ZeroShot,
}


def check_config(config):
  """Validates every `config.evals.<name>` against its evaluator's keys."""
  for name, cfg in config.evals.items():
    kind = cfg.get('type', None)
    zoo_config.check_choice(kind, EVALUATORS, f'config.evals.{name}.type')
    zoo_config.check_keys(cfg, f'evals.{name}', EVALUATORS[kind].SCHEMA)
    EVALUATORS[kind].check(cfg, config, f'config.evals.{name}')


def build(config, task, workdir):
  """{name: evaluator} for an experiment."""
  return {name: EVALUATORS[cfg.type](cfg, task=task, config=config, workdir=workdir)
          for name, cfg in config.evals.items()}
