#!/usr/bin/env bash
# GPU readiness in one run on one GPU, under 8 minutes: full-size SD 1.5, SDXL, SDXL-Turbo (eager, then with
# torch.compile) and FLUX.1-schnell (if it fits), random weights built on the GPU from embedded configs (no
# download), served through CareCanvas's own worker (claim → batch → store, bf16, SDPA). Prints a markdown
# table: burst img/s, pipeline busy fraction, MFU of the denoiser, p50/p95 under Poisson arrivals.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
# The FLOP table first (meta device, seconds), then the served families; the suite stops starting new ones
# after --budget-seconds so the whole script stays under 8 minutes.
timeout 470 "$PYTHON" -m bench.bench_gpu --flops-only
timeout 470 "$PYTHON" -m bench.bench_gpu --suite sdxl-turbo,sd15,sdxl,flux-schnell --compile sdxl-turbo \
  --budget-seconds 330 --burst 32 --poisson-seconds 15 "$@"
