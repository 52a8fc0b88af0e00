r"""Consistency distillation of a shapes diffusion run: 1 to 4 step sampling.

The student learns to map every point of the guided teacher's DDIM path (steps of `skip`
timesteps) to the path's end, starting from the teacher's weights (zoo/tasks/consistency.py,
the LCM recipe); it samples by multistep consistency sampling in `steps` evaluations. Model, data
and schedule are copied from the teacher run.

  zoo train --config experiments/shapes_diffusion.py --workdir workdirs/shapes
  zoo train --config experiments/progressive_distill_shapes.py:teacher=workdirs/shapes,steps=8 \
      --workdir workdirs/pd8
  zoo train \
      --config experiments/consistency_distill_shapes.py:teacher=workdirs/shapes,init=workdirs/pd8 \
      --workdir workdirs/cd
  zoo sample --workdir workdirs/cd --num 16 --label 3 --steps 2 --out cd2.png

Smoke (seconds; trains its own tiny teacher first):
  zoo train --config experiments/shapes_diffusion.py:smoke=True --workdir /tmp/shapes_smoke
  zoo train --config experiments/consistency_distill_shapes.py:smoke=True --workdir /tmp/cd_smoke

Arguments: teacher (the teacher workdir; default workdirs/shapes, smoke /tmp/shapes_smoke), init
(a progressive-distillation run of the same teacher whose v-student this one starts from; default
'': the teacher's weights, which an ε teacher makes a poor start for the v student),
steps (sampling steps of the evaluators and `zoo sample`, default 4), skip (teacher timesteps per
DDIM step, default 20 as LCM), guidance (the teacher's guidance, distilled in), distance ('l2'
or 'huber'), train_steps (0 = default), smoke (bool).
"""

from zoo import config as zoo_config

ConfigDict = zoo_config.ConfigDict


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, teacher='', init='', steps=4, skip=20, guidance=2.0,
                             distance='l2', train_steps=0, smoke=False)
  config = zoo_config.sibling(__file__, 'progressive_distill_shapes').student_config(
      arg, 'consistency_distillation')
  config.task.prediction_type = 'v'  # Well-conditioned at the top of the cosine schedule.
  config.task.sampler = 'consistency'
  config.task.sample_steps = arg.steps
  config.task.skip = arg.skip
  config.task.distance = arg.distance
  config.task.huber_c = 0.001
  config.task.student_from = arg.init
  if not arg.smoke:
    # The stop-gradient target follows the student at once: at 1e-4 it drifted to noise here.
    config.optim.lr = 1e-5
  config.evals.samples.sampler = 'consistency'
  config.evals.samples.steps = arg.steps
  return config
