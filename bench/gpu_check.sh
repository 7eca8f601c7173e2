#!/usr/bin/env bash
# SDXL LoRA at 1024 px on one NVIDIA GPU (issue 12, item 4): it/s and torch.cuda.max_memory_allocated for the
# low-memory recipe (--fp8_base --gradient_checkpointing, target <= 8 GB) and the default; bf16, SDPA, cached
# latents and text-encoder outputs, UNet-only LoRA, batch 1. No network; ~4-6 min in all (each recipe is capped
# at 210 s). Results: $GPU_CHECK_JSON (default /tmp/gpu_check.json) (and one JSON line per recipe on stdout).
#   usage: bash bench/gpu_check.sh [--dry]      # --dry: tiny SDXL model at 64 px on the CPU (plumbing check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" != "--dry" ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)'
exec timeout 470 "$PY" bench/gpu_check.py --json "${GPU_CHECK_JSON:-/tmp/gpu_check.json}" "$@"
