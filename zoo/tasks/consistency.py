"""Consistency distillation: a student that maps any point of a teacher's ODE path to its end.

Legend: B batch; k skip (teacher timesteps per DDIM step); M = T // k grid points.

Song et al. (2023) "Consistency Models", in the latent-consistency (LCM, Luo et al. 2023) form
for discrete-time ε (or v, x0) teachers. The student f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t)
reads its network output as `config.task.prediction_type` (x̂0 from `to_eps_and_x0`; 'v' is
well-conditioned at the top of a cosine schedule, where ε's x̂0 = (x - σε̂)/α divides by α ≈ 0;
the weights start from the teacher's whatever it predicts) and meets the boundary condition
f(x, 0) = x through c_skip = σ_d² / ((10t)² + σ_d²), c_out = 10t /
sqrt((10t)² + σ_d²), σ_d = 0.5 (LCM's timestep scaling 10). Training points lie on the grid
t_j = (j+1)·k - 1: for t = t_j and t' = max(t - k, 0),

  z_t = α_t x + σ_t ε;  ẑ_t' = one DDIM step of the guided teacher from z_t;
  loss = d(f_θ(z_t, t), stopgrad f_θ(ẑ_t', t')),  d = squared error or pseudo-Huber.

The student starts from the teacher's weights, or (`student_from`) from the student of a
progressive-distillation run: a v-student of an ε-teacher otherwise starts from weights that
read the wrong quantity, and the consistency targets, bootstrapped from the boundary t = 0
through the whole grid, then take far longer to become meaningful than a short run gives them.

The target network is the student itself under stop-gradient (θ⁻ = θ, as improved consistency
training found best) rather than a separate EMA copy, so params stay {'teacher', 'student'}.
Guidance is distilled in (`teacher_guidance`): the student samples at guidance 1.

Sampling ('consistency', multistep consistency sampling): from pure noise at the top of the
grid, x̂ = f(x, t_0); then for each later t_i, re-noise x̂ to t_i with fresh noise and apply f
again. `steps` = NFE; the timesteps are every (M // steps)-th grid point from the top, as LCM's
scheduler picks them.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from zoo import config as zoo_config
from zoo import diffusion
from zoo import models
from zoo.tasks import diffusion as diffusion_task
from zoo.tasks import distill

SAMPLER = 'consistency'
LOSSES = ('l2', 'huber')
SCHEMA = diffusion_task.SCHEMA | {'teacher_from': str, 'teacher_guidance': float, 'skip': int,
                                  'distance': str, 'huber_c': float, 'student_from': str}
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_coefficients(t_B):
  """(c_skip, c_out) at integer timesteps t_B: (1, 0) at t = 0, so f(x, 0) = x."""
  scaled = jnp.asarray(t_B, jnp.float32) * TIMESTEP_SCALING
  norm = jnp.square(scaled) + SIGMA_DATA**2
  return SIGMA_DATA**2 / norm, scaled / jnp.sqrt(norm)


def sampling_timesteps(num_timesteps, skip, steps):
  """The `steps` descending timesteps of multistep sampling: every (M // steps)-th grid point."""
  grid = np.arange(1, num_timesteps // skip + 1) * skip - 1
  if not 1 <= steps <= len(grid):
    raise ValueError(f'steps={steps} must lie in [1, {len(grid)}] (num_timesteps // skip)')
  return grid[::-1][::len(grid) // steps][:steps].astype(np.int32)


class ConsistencyDistillationTask(distill._Distillation):
  """`init`, `loss`, `predict['sample']` of a consistency-distilled student."""

  @staticmethod
  def check_config(config):
    task = config.task
    zoo_config.check_keys(task, 'task', SCHEMA)
    zoo_config.check_choice(task.schedule, diffusion.SCHEDULES, 'config.task.schedule')
    zoo_config.check_choice(task.prediction_type, diffusion.PREDICTION_TYPES,
                            'config.task.prediction_type')
    zoo_config.check_choice(task.distance, LOSSES, 'config.task.distance')
    zoo_config.check_choice(config.model.get('name', None), diffusion_task.DENOISERS,
                            'config.model.name')
    models.check_config(config.model, config.data.resolution)
    if config.model.get('learn_sigma', False):
      raise ValueError('config.model.learn_sigma=True: a consistency student is deterministic')
    distill.check_student_sampling(task, SAMPLER)
    if not 1 <= task.skip <= task.num_timesteps // 2:
      raise ValueError(f'config.task.skip={task.skip} must lie in [1, num_timesteps // 2]')
    sampling_timesteps(task.num_timesteps, task.skip, task.sample_steps)
    if not task.teacher_from:
      raise ValueError('config.task.teacher_from must name the teacher run')
    if os.path.isfile(os.path.join(task.teacher_from, 'config.json')):
      _check_teacher(config, distill.teacher_run_config(task.teacher_from))
    if task.student_from and os.path.isfile(os.path.join(task.student_from, 'config.json')):
      _check_student_run(config, _student_run_config(task.student_from))

  def __init__(self, config):
    super().__init__(config, student_from=config.task.student_from)
    _check_teacher(config, self.teacher_config)
    if self.student_from:
      _check_student_run(config, _student_run_config(self.student_from))
    k = config.task.skip
    self.grid = jnp.asarray(np.arange(1, config.task.num_timesteps // k + 1) * k - 1, jnp.int32)

  def consistency_fn(self, student, x, t_B, labels_B, train=False, rng=None):
    """f(x, t) = c_skip·x + c_out·x̂0: the student's estimate of the path's end."""
    raw = self.model.apply({'params': student}, x, t_B, labels_B=labels_B, train=train,
                           rngs={'dropout': rng} if rng is not None else {})
    _, x0 = diffusion.to_eps_and_x0(self.cfg.prediction_type, self.schedule, x, t_B,
                                    raw.astype(jnp.float32))
    c_skip, c_out = (c.reshape((-1,) + (1,) * (x.ndim - 1)) for c in boundary_coefficients(t_B))
    return c_skip * x + c_out * x0

  def loss(self, params, batch, rng, train=True):
    """Distance between the student at t and (stop-gradient) at the teacher's DDIM step t-k."""
    x0 = batch['image']
    rng_j, rng_noise, rng_dropout = jax.random.split(rng, 3)
    t = self.grid[jax.random.randint(rng_j, x0.shape[:1], 0, self.grid.shape[0])]
    t_prev = jnp.maximum(t - self.cfg.skip, 0)
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    z_t = diffusion.q_sample(self.schedule, x0, t, noise)
    labels = self._labels(batch)
    ab = self.schedule.alphas_cumprod
    z_prev = self.teacher_ddim(self.teacher_fn(params, labels), z_t, t, ab[t], ab[t_prev])
    target = jax.lax.stop_gradient(self.consistency_fn(
        params['student'], jax.lax.stop_gradient(z_prev), t_prev, labels))
    pred = self.consistency_fn(params['student'], z_t, t, labels, train=train, rng=rng_dropout)
    err = jnp.square(pred - target)
    if self.cfg.distance == 'huber':
      c = self.cfg.huber_c
      loss = jnp.mean(jnp.sqrt(err + c * c) - c)
    else:
      loss = jnp.mean(err)
    return loss, {'loss': loss, 'mse': jnp.mean(err)}

  def sample(self, params, rng, labels_B=None, *, num=None, sampler=None, steps=None,
             guidance_scale=None, eta=None):
    """Images in [0, 1] (BxHxWxC) in `steps` consistency steps (default config.task's)."""
    del eta  # Multistep consistency sampling has no η.
    if (sampler or SAMPLER) != SAMPLER:
      raise ValueError(f'sampler={sampler!r}: a consistency student samples with {SAMPLER!r}')
    if guidance_scale not in (None, 1.0):
      raise ValueError(f'guidance_scale={guidance_scale}: guidance is distilled into the '
                       'student; sample at 1.0')
    labels_B, num = self._check_labels(labels_B, num)
    ts = sampling_timesteps(self.cfg.num_timesteps, self.cfg.skip, steps or self.cfg.sample_steps)
    return _sample(self, params['student'], rng, labels_B, num=num, timesteps=tuple(ts.tolist()))

  __hash__ = object.__hash__


def _check_teacher(config, teacher):
  distill.check_teacher(config, teacher, allowed=('diffusion',))


def _student_run_config(workdir):
  return zoo_config.run_config(
      workdir, 'config.task.student_from',
      'train a progressive student first (experiments/progressive_distill_shapes.py)')


def _check_student_run(config, run):
  """student_from: a distillation run of this architecture whose student predicts as ours."""
  where = f'config.task.student_from={config.task.student_from!r}'
  if run.task.name not in distill.TEACHER_TASKS[1:]:
    raise ValueError(f'{where} is a {run.task.name!r} run; it must be a distillation run '
                     f'({distill.TEACHER_TASKS[1:]})')
  if models.kwargs(run.model) != models.kwargs(config.model):
    raise ValueError(f'{where} trained another model than config.model')
  if run.task.prediction_type != config.task.prediction_type:
    raise ValueError(f'{where} predicts {run.task.prediction_type!r}, config.task.'
                     f'prediction_type is {config.task.prediction_type!r}')


@functools.partial(jax.jit, static_argnames=('task', 'num', 'timesteps'))
def _sample(task, student, rng, labels_B, *, num, timesteps):
  rng_init, rng_loop = diffusion.split_keys(rng)
  x = diffusion.normal(rng_init, (num, *task.image_shape))
  t_B = jnp.zeros((num,), jnp.int32)
  x0 = None
  for i, t in enumerate(timesteps):  # NFE is small: an unrolled loop.
    if x0 is not None:
      noise = diffusion.normal(diffusion.fold_in_keys(rng_loop, i), x.shape)
      x = diffusion.q_sample(task.schedule, x0, t_B + t, noise)
    x0 = jnp.clip(task.consistency_fn(student, x, t_B + t, labels_B), -1.0, 1.0)
  return (x0 + 1.0) / 2.0
