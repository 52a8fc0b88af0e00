"""Diffusion as pure functions: schedules, forward process and losses, samplers, guidance."""

from zoo.diffusion.inpaint import (
  INPAINT_SAMPLERS,
  MODES as INPAINT_MODES,
  check_mask,
  inpaint,
  outpaint_canvas,
  repaint_schedule,
)
from zoo.diffusion.objectives import (
  PREDICTION_TYPES,
  ddpm_learned_variance_step,
  discretized_gaussian_log_likelihood,
  learned_range_variance,
  loss,
  q_sample,
  snr_weights,
  target,
  to_eps_and_x0,
  vlb_loss,
)
from zoo.diffusion.samplers import (
  SAMPLERS,
  TIMESTEP_SPACINGS,
  classifier_free_guidance,
  fold_in_keys,
  normal,
  sample,
  split_keys,
  timesteps_for,
)
from zoo.diffusion.schedules import SCHEDULES, Schedule, make_betas

__all__ = [
  'INPAINT_MODES',
  'INPAINT_SAMPLERS',
  'check_mask',
  'inpaint',
  'outpaint_canvas',
  'repaint_schedule',
  'PREDICTION_TYPES',
  'SAMPLERS',
  'fold_in_keys',
  'normal',
  'split_keys',
  'SCHEDULES',
  'TIMESTEP_SPACINGS',
  'Schedule',
  'classifier_free_guidance',
  'ddpm_learned_variance_step',
  'discretized_gaussian_log_likelihood',
  'learned_range_variance',
  'loss',
  'make_betas',
  'q_sample',
  'sample',
  'snr_weights',
  'target',
  'timesteps_for',
  'to_eps_and_x0',
  'vlb_loss',
]
