r"""Progressive distillation of a shapes diffusion run: each round halves the DDIM steps.

Round 1 distils the teacher's 2N-step guided DDIM sampler (N = `steps`) into an N-step
v-prediction student; each further round takes the last student as its teacher and halves N
again (Salimans & Ho 2022; zoo/tasks/distill.py). Model, data and schedule are copied from the
teacher run, so any class-conditional or unconditional `diffusion` run can be distilled.

  zoo train --config experiments/shapes_diffusion.py --workdir workdirs/shapes
  zoo train --config experiments/progressive_distill_shapes.py:teacher=workdirs/shapes,steps=8 \
      --workdir workdirs/pd8
  zoo train --config experiments/progressive_distill_shapes.py:teacher=workdirs/pd8,steps=4 \
      --workdir workdirs/pd4
  zoo train --config experiments/progressive_distill_shapes.py:teacher=workdirs/pd4,steps=2 \
      --workdir workdirs/pd2
  zoo train --config experiments/progressive_distill_shapes.py:teacher=workdirs/pd2,steps=1 \
      --workdir workdirs/pd1
  zoo sample --workdir workdirs/pd4 --num 16 --label 3 --out pd4.png

Smoke (seconds; trains its own tiny teacher first):
  zoo train --config experiments/shapes_diffusion.py:smoke=True --workdir /tmp/shapes_smoke
  zoo train --config experiments/progressive_distill_shapes.py:smoke=True --workdir /tmp/pd_smoke

Arguments: teacher (the teacher workdir; default workdirs/shapes, smoke /tmp/shapes_smoke),
steps (the student's DDIM steps N; the teacher samples in 2N), guidance (the
teacher's classifier-free guidance, distilled in; only for a `diffusion` teacher), train_steps
(0 = default), smoke (bool).
"""

from zoo import config as zoo_config

ConfigDict = zoo_config.ConfigDict


def student_config(arg, task_name):
  """The teacher's model, data and schedule (from its run, else shapes_diffusion's) with a
  student's optimiser, loop and evaluators."""
  teacher = arg.teacher or ('/tmp/shapes_smoke' if arg.smoke else 'workdirs/shapes')
  config = zoo_config.sibling(__file__, 'shapes_diffusion').get_config(f'smoke={arg.smoke}')
  run = zoo_config.existing_run_config(teacher)
  if run is not None:
    config.model, config.data = run.model, run.data
    for key in ('schedule', 'num_timesteps', 'prediction_type'):
      config.task[key] = run.task[key]
  config.task.name = task_name
  config.task.teacher_from = teacher
  config.task.teacher_guidance = arg.guidance
  config.task.guidance_scale = 1.0
  config.task.label_dropout = 0.0
  config.train.steps = arg.train_steps or (10 if arg.smoke else 2000)
  config.optim.lr = 1e-4 if not arg.smoke else 1e-3
  config.optim.warmup_steps = 2 if arg.smoke else 50
  if run is not None and 'samples' in run.get('evals', {}):
    config.evals.samples.labels = tuple(run.evals.samples.labels)  # The teacher's grid rows.
  if not config.model.get('num_classes', 0):
    config.evals.samples.labels = ()
  config.evals.samples.guidance_scale = 1.0
  del config.evals['val']  # The ε-loss evaluator does not apply to a student.
  return config


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, teacher='', steps=8, guidance=2.0, train_steps=0, smoke=False)
  config = student_config(arg, 'progressive_distillation')
  config.task.prediction_type = 'v'
  config.task.student_steps = arg.steps
  config.task.sampler = 'ddim'
  config.task.sample_steps = arg.steps
  config.evals.samples.sampler = 'ddim'
  config.evals.samples.steps = arg.steps
  return config
