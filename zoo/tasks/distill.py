"""Progressive distillation: a v-prediction student takes one DDIM step where its teacher takes two.

Legend: B batch; N student steps; 2N teacher steps; α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t).

Salimans & Ho (2022), "Progressive Distillation for Fast Sampling of Diffusion Models". Params
are {'teacher', 'student'}: the teacher is the EMA denoiser of `teacher_from` (a `diffusion`
run, or a `progressive_distillation` run: the previous round's student), frozen; the student has
the teacher's architecture and starts from its weights. A round trains the student to sample
in N = `student_steps` deterministic DDIM steps on the 'trailing' grid t_i = round(T - i·T/N) - 1,
whose every step i spans two steps of the teacher's 2N grid (the grids nest). For a training
image x and t = t_i:

  z_t = α_t x + σ_t ε;   z'' = two DDIM steps of the teacher, t_i -> t_(2i+1) -> t_(i+1);
  x̃ = (z'' - (σ''/σ_t) z_t) / (α'' - (σ''/σ_t) α_t)   (the x0 whose one DDIM step lands on z'');
  loss = |v̂ - ṽ|² with ṽ = (α_t z_t - x̃) / σ_t,

i.e. the x-space error weighted by 1 + SNR (the paper's "SNR+1" weighting): the student is
parameterised by v because an x0 or ε student is ill-conditioned at the first step, where α ≈ 0.
The last step lands on x0 (ᾱ = 1, so x̃ = z'').

Rounds chain runs: round r+1 sets `teacher_from` to round r's workdir and halves N
(experiments/progressive_distill_shapes.py). A class-conditional teacher is guided with
`teacher_guidance` and the student learns the guided result (Meng et al. 2023, guided
distillation): students sample at guidance 1, with their labels.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from zoo import checkpoint
from zoo import config as zoo_config
from zoo import diffusion
from zoo import models
from zoo.diffusion import samplers
from zoo.tasks import diffusion as diffusion_task

TEACHER_TASKS = ('diffusion', 'progressive_distillation', 'consistency_distillation')
SCHEMA = diffusion_task.SCHEMA | {'teacher_from': str, 'teacher_guidance': float,
                                  'student_steps': int}


def teacher_run_config(workdir):
  """The config of the teacher run `workdir`."""
  return zoo_config.run_config(workdir, 'config.task.teacher_from',
                               'train the teacher first (experiments/shapes_diffusion.py)')


def check_teacher(config, teacher, allowed=TEACHER_TASKS[:2]):
  """ValueError unless `teacher` (a run's config) is a denoiser of config.model's architecture
  on config.task's schedule."""
  where = f'config.task.teacher_from={config.task.teacher_from!r}'
  if teacher.task.name not in allowed:
    raise ValueError(f'{where} is a {teacher.task.name!r} run; a teacher is one of {allowed}')
  if teacher.model.name != config.model.name:
    raise ValueError(f'{where} trained a {teacher.model.name!r}; the student (config.model) is '
                     f'a {config.model.name!r}: it starts from the teacher\'s weights')
  ours = models.fields(config.model.name) | models.kwargs(config.model)
  theirs = models.fields(teacher.model.name) | models.kwargs(teacher.model)
  differ = [f'model.{k}' for k in ours if k not in ('remat', 'dtype') and ours[k] != theirs[k]]
  differ += [f'task.{k}' for k in ('schedule', 'num_timesteps')
             if config.task[k] != teacher.task[k]]
  if differ:
    raise ValueError(f'config differs from the teacher {where} in {differ}')
  if teacher.data.resolution != config.data.resolution:
    raise ValueError(f'config.data.resolution={config.data.resolution} but the teacher {where} '
                     f'generates {teacher.data.resolution}x{teacher.data.resolution}')


def check_student_sampling(task, sampler):
  """Students sample at guidance 1 (guidance is distilled in) with their own sampler."""
  if task.guidance_scale != 1.0:
    raise ValueError(f'config.task.guidance_scale={task.guidance_scale}: a distilled student '
                     'learned the guided teacher; sample it at guidance_scale=1.0 (set '
                     'teacher_guidance instead)')
  if task.label_dropout != 0.0:
    raise ValueError(f'config.task.label_dropout={task.label_dropout}: the student learns the '
                     'guided teacher and needs no null class; set it to 0.0')
  if task.sampler != sampler:
    raise ValueError(f'config.task.sampler={task.sampler!r}: this student samples with '
                     f'{sampler!r}')


class _Distillation(diffusion_task.DiffusionTask):
  """A student denoiser of config.model under a frozen teacher run of the same architecture."""

  def __init__(self, config, student_from=''):
    super().__init__(config)
    self.teacher_config = teacher_run_config(config.task.teacher_from)
    teacher_task = self.teacher_config.task
    self.teacher_prediction = teacher_task.prediction_type
    # A distilled teacher already carries its guidance: it is called with labels alone.
    self.teacher_scale = (config.task.teacher_guidance if teacher_task.name == 'diffusion'
                          else 1.0)
    subtree = '' if teacher_task.name == 'diffusion' else 'student'
    self.frozen = ('teacher',)
    self.pretrained = {'teacher': checkpoint.Source(config.task.teacher_from, subtree)}
    self.predict = {'sample': self.sample}
    # The student starts from the teacher, or from the student of another distillation run.
    self.student_from = student_from
    if self.student_from:
      self.pretrained['student'] = checkpoint.Source(self.student_from, 'student')

  def init(self, rng, batch):
    """Boxed params {'teacher', 'student'} (the teacher's are replaced by the checkpoint's)."""
    params = super().init(rng, batch)
    return {'teacher': params, 'student': params}

  def after_pretrained(self, params):
    """Once the teacher is loaded, the student starts as a copy of it (unless student_from)."""
    if self.student_from:
      return params
    return {**params, 'student': jax.tree.map(jnp.copy, params['teacher'])}

  def denoiser(self, params, labels_B, guidance_scale):
    """The student's model_fn(x_t, t_B) (DiffusionTask's sampling runs the student)."""
    return super().denoiser(params['student'], labels_B, guidance_scale)

  def teacher_fn(self, params, labels_B):
    """The frozen teacher's model_fn(x_t, t_B), guided by teacher_guidance where it applies."""
    teacher = jax.lax.stop_gradient(params['teacher'])
    scale = self.teacher_scale if labels_B is not None else 1.0
    return diffusion_task.DiffusionTask.denoiser(self, teacher, labels_B, scale)

  def teacher_ddim(self, model_fn, z, t_B, ab_t, ab_prev):
    """One deterministic DDIM step of the teacher from z at t_B to ᾱ_prev (1 = onto x0)."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    return samplers.reverse_step(
        model_fn, self.schedule, z, t_B, ab_t.reshape(shape), ab_prev.reshape(shape), None,
        sampler='ddim', eta=0.0, prediction_type=self.teacher_prediction,
        clip_x0=self.cfg.clip_x0)

  __hash__ = object.__hash__


def x0_target(z_t, z_prev, ab_t, ab_prev):
  """x̃: the x0 prediction whose deterministic DDIM step from z_t (at ᾱ_t) lands on z_prev."""
  shape = (-1,) + (1,) * (z_t.ndim - 1)
  a, s = jnp.sqrt(ab_t).reshape(shape), jnp.sqrt(1.0 - ab_t).reshape(shape)
  a2, s2 = jnp.sqrt(ab_prev).reshape(shape), jnp.sqrt(1.0 - ab_prev).reshape(shape)
  ratio = s2 / s
  return (z_prev - ratio * z_t) / (a2 - ratio * a)


class ProgressiveDistillationTask(_Distillation):
  """`init`, `loss`, `predict['sample']` of one round of progressive distillation."""

  @staticmethod
  def check_config(config):
    task = config.task
    diffusion_task.check_denoiser_task(config, SCHEMA, diffusion_task.DENOISERS)
    if task.prediction_type != 'v':
      raise ValueError(f'config.task.prediction_type={task.prediction_type!r}: the progressive '
                       "student predicts v ('v')")
    if config.model.get('learn_sigma', False):
      raise ValueError('config.model.learn_sigma=True: a distilled student is deterministic')
    check_student_sampling(task, 'ddim')
    if task.student_steps < 1 or task.sample_steps != task.student_steps:
      raise ValueError(f'config.task.sample_steps={task.sample_steps} must equal student_steps='
                       f'{task.student_steps} (>= 1)')
    ts_2n = samplers.timesteps_for(task.num_timesteps, 2 * task.student_steps, 'trailing')
    if not np.array_equal(ts_2n[1::2], samplers.timesteps_for(
        task.num_timesteps, task.student_steps, 'trailing')):
      raise ValueError(f'the {task.student_steps}- and {2 * task.student_steps}-step grids over '
                       f'num_timesteps={task.num_timesteps} do not nest: pick a power of two')
    if not task.teacher_from:
      raise ValueError('config.task.teacher_from must name the teacher run')
    if os.path.isfile(os.path.join(task.teacher_from, 'config.json')):
      teacher = teacher_run_config(task.teacher_from)
      check_teacher(config, teacher)
      _check_halving(config, teacher)

  def __init__(self, config):
    super().__init__(config)
    check_teacher(config, self.teacher_config)
    _check_halving(config, self.teacher_config)
    self.timestep_spacing = 'trailing'
    n = config.task.student_steps
    ts = samplers.timesteps_for(config.task.num_timesteps, 2 * n, 'trailing')[::-1].copy()
    ab = np.asarray(self.schedule.alphas_cumprod)
    # Teacher grid t_0 > ... > t_(2N-1), then x0 (ᾱ = 1); student step i spans 2i -> 2i+2.
    self.grid_2n = jnp.asarray(np.append(ts, 0), jnp.int32)
    self.ab_2n = jnp.asarray(np.append(ab[ts], 1.0), jnp.float32)

  def loss(self, params, batch, rng, train=True):
    """|v̂ - ṽ|² of the student against two guided DDIM steps of the teacher."""
    x0 = batch['image']
    rng_i, rng_noise, rng_dropout = jax.random.split(rng, 3)
    i = jax.random.randint(rng_i, x0.shape[:1], 0, self.cfg.student_steps)
    t, t_mid = self.grid_2n[2 * i], self.grid_2n[2 * i + 1]
    ab_t, ab_mid, ab_prev = self.ab_2n[2 * i], self.ab_2n[2 * i + 1], self.ab_2n[2 * i + 2]
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    z_t = diffusion.q_sample(self.schedule, x0, t, noise)
    labels = self._labels(batch)
    teacher = self.teacher_fn(params, labels)
    z_mid = self.teacher_ddim(teacher, z_t, t, ab_t, ab_mid)
    z_prev = self.teacher_ddim(teacher, z_mid, t_mid, ab_mid, ab_prev)
    x_tilde = jax.lax.stop_gradient(x0_target(z_t, z_prev, ab_t, ab_prev))
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a, s = jnp.sqrt(ab_t).reshape(shape), jnp.sqrt(1.0 - ab_t).reshape(shape)
    v_target = (a * z_t - x_tilde) / s
    v = self.model.apply({'params': params['student']}, z_t, t, labels_B=labels, train=train,
                         rngs={'dropout': rng_dropout}).astype(jnp.float32)
    loss = jnp.mean(jnp.square(v - v_target))
    x_mse = jnp.mean(jnp.square(s * (v - v_target)))  # The same error in x space.
    return loss, {'loss': loss, 'x_mse': x_mse}

  __hash__ = object.__hash__


def _check_halving(config, teacher):
  """A distilled teacher must sample in exactly twice the student's steps."""
  if teacher.task.name == 'progressive_distillation' and (
      teacher.task.student_steps != 2 * config.task.student_steps):
    raise ValueError(f'config.task.student_steps={config.task.student_steps}: the teacher '
                     f'{config.task.teacher_from!r} samples in {teacher.task.student_steps} '
                     f'steps; a round halves them (student_steps='
                     f'{teacher.task.student_steps // 2})')
