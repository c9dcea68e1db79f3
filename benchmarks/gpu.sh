#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md, on one CUDA GPU, in under 8 minutes on an H100/H200:
#   1. training throughput and MFU of the paper's 0.16B (8 x 2048) and 0.76B (4 x 2048) presets, with
#      the training defaults (bf16 autocast, compiled blocks), against a bf16 matmul peak measured in
#      the same run; decoding and sampling speed of 0.16B;
#   2. the side-by-side with transfusion-pytorch at matched parameters (about 0.26B each).
# Usage: benchmarks/gpu.sh [OUT]   (default bench-gpu/); needs the package installed (make venv).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
py=${PYTHON:-.venv/bin/python}
$py -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA GPU'"
mkdir -p "$out"
$py -m transfusion bench --device cuda --configs 0.16B --batch-size 8 --seq-len 2048 --repeat 10 \
    --image-steps 250 --out "$out/0.16B" | tee "$out/0.16B.txt"
$py -m transfusion bench --device cuda --configs 0.76B --batch-size 4 --seq-len 2048 --repeat 10 \
    --no-sampling --out "$out/0.76B" | tee "$out/0.76B.txt"
$py -m transfusion bench --device cuda --configs 0.16B --batch-size 8 --seq-len 2048 --repeat 10 \
    --no-sampling --compile off --out "$out/0.16B-eager" | tee "$out/0.16B-eager.txt"
$py benchmarks/compare_transfusion_pytorch.py --device cuda --width 1024 --heads 16 --text 64 \
    --latent-size 16 --their-depth 12 --rounds 2 --steps 10 --sample-steps 50 --out "$out" | tee "$out/compare.txt"
