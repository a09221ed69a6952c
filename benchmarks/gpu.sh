#!/usr/bin/env bash
# The GPU rows in one command: fp32, channels_last, AMP (bf16/fp16) for ResNet-18/50 at 224 px (and 128 px),
# fused inference (trace-freeze, torch.compile) at 224 px, the matmul limit of the GPU, and DDP with nccl
# over every GPU of this node when there is more than one.
# Writes reports/bench-gpu.json (and reports/bench-gpu-ddp.json); see docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m benchmarks --gpu --out reports/bench-gpu.json "$@"
N=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$N" -gt 1 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$N" -m benchmarks.ddp_speed --out reports/bench-gpu-ddp.json
else
    echo "one GPU: no DDP row"
fi
