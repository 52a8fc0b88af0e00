#!/usr/bin/env bash
# The speed suite on one GPU within 8 minutes: bench sizes only, batches x8, an 8192² peak
# matmul, 3 repeats, sweeps timed where a step is estimated under 2 s. Run from the repository
# root on a machine whose jax sees the GPU (jax[cuda12] installed in the active environment).
# PyTorch peers run on the GPU when the installed torch has CUDA; a CPU-only torch would not be
# a fair peer there, so they are skipped. Writes JSON, BENCHMARKS_gpu.md and a plot to $OUT.
set -euo pipefail
OUT=${OUT:-bench_gpu}
mkdir -p "$OUT"
python -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()'
torch_flag=--no-torch
if python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  torch_flag=
fi
timeout 470 python -m zoo.bench.perf --sizes bench --batch-scale 8 --matmul-n 8192 --repeats 3 \
  --max-sweep-seconds 2 $torch_flag --out "$OUT/bench_gpu.json" \
  --markdown "$OUT/BENCHMARKS_gpu.md" --plot "$OUT/bench_gpu.png"
