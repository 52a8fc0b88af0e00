"""zoo: a JAX/Flax model zoo for diffusion and multimodal vision models."""

import os

# XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK by default, whose weight gradients run at
# 12-42 GFLOP/s on this project's CPU where XLA's own (Eigen) path reaches 39-123 (`python -m
# zoo.bench.profile`, PROFILE.md). `ZOO_CPU_CONV=eigen` keeps YNNPACK for dots only. Opt-in until
# the test suite is checked with it (Eigen's float32 sums depend on the batch size in their last
# bits). Takes effect if zoo is imported before JAX creates its CPU backend; a user's own setting
# of the flag is left alone.
YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
if (os.environ.get('ZOO_CPU_CONV') == 'eigen'
    and 'xla_cpu_experimental_ynn_fusion_type' not in os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + YNN_FLAG).strip()
