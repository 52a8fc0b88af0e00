"""Diffusion as pure functions: schedules, forward process and losses, samplers, guidance."""

from zoo.diffusion.objectives import PREDICTION_TYPES, loss, q_sample, target, to_eps_and_x0
from zoo.diffusion.samplers import (
  SAMPLERS,
  TIMESTEP_SPACINGS,
  classifier_free_guidance,
  sample,
  timesteps_for,
)
from zoo.diffusion.schedules import SCHEDULES, Schedule, make_betas

__all__ = [
  'PREDICTION_TYPES',
  'SAMPLERS',
  'SCHEDULES',
  'TIMESTEP_SPACINGS',
  'Schedule',
  'classifier_free_guidance',
  'loss',
  'make_betas',
  'q_sample',
  'sample',
  'target',
  'timesteps_for',
  'to_eps_and_x0',
]
