#!/usr/bin/env bash
# Everything the GPU paths need measured, in one run on one CUDA GPU (about 10 minutes on an H100/H200):
#   1. the GPU-only tests (graph decoding on the model's device, the frozen-row mask, the compiled
#      block mask), which skip themselves on a CPU;
#   2. training throughput, MFU and peak memory of the paper's 0.16B (8 x 2048): compiled (the default),
#      eager, FSDP2 with its bf16/fp32 mixed-precision policy (a process group of one), and activation
#      checkpointing full; 0.76B (4 x 2048) compiled; decoding and sampling speed of 0.16B;
#   3. `transfusion plan` for the same 0.16B configurations, to set beside the measured peaks;
#   4. how long a checkpoint stops training, synchronous against train.async_checkpoint (0.16B);
#   5. the loader's images/s on this machine's cores (JPEG WebDataset with 0-8 workers, latent shards);
#   6. the side-by-side with transfusion-pytorch (needs PyPI; skipped where there is no network);
#   7. modality-specific weights (small against small-mot) and `transfusion serve` under 16 clients;
#   8. with 2 GPUs or more, the multi-process fault matrix on NCCL (benchmarks/gpu_faults.py): DDP and
#      FSDP2 through text-only micro-batches and a NaN on rank 1, accumulation against one big batch,
#      FSDP2's reduce-scatters per step, bf16 under FSDP2 against DDP (the GPU-only tests of step 1
#      already cover CUDA graphs on cuda:1 and uploads encoded while a capture runs).
# At the end, benchmarks/gpu_summary.py prints one screen of the numbers, to paste into RESULTS.md.
# Usage: benchmarks/gpu.sh [OUT]   (default bench-gpu/); needs the package installed (make venv).
# Each step has its own time limit and a failed step does not stop the others; the summary at the
# end says which ran.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
py=${PYTHON:-.venv/bin/python}
$py -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA GPU'" || exit 1
mkdir -p "$out"
status=()
step() {  # step NAME SECONDS COMMAND...: run, tee to OUT/NAME.txt, remember how it ended
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  status+=("$name: exit ${PIPESTATUS[0]}")
}
bench=("$py" -m transfusion bench --device cuda --repeat 10)

step gpu-tests 300 $py -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_generate.py tests/test_compile.py
step 0.16B 240 "${bench[@]}" --configs 0.16B --batch-size 8 --seq-len 2048 --image-steps 250 --out "$out/0.16B"
step 0.16B-eager 120 "${bench[@]}" --configs 0.16B --batch-size 8 --seq-len 2048 --no-sampling --compile off --out "$out/0.16B-eager"
step 0.16B-fsdp 180 "${bench[@]}" --configs 0.16B --batch-size 8 --seq-len 2048 --no-sampling --parallel fsdp --out "$out/0.16B-fsdp"
step 0.16B-ac-full 180 "${bench[@]}" --configs 0.16B --batch-size 8 --seq-len 2048 --no-sampling \
    --activation-checkpointing full --out "$out/0.16B-ac-full"
step 0.76B 240 "${bench[@]}" --configs 0.76B --batch-size 4 --seq-len 2048 --no-sampling --out "$out/0.76B"
for ac in none full; do
  step "plan-0.16B-$ac" 60 $py -m transfusion plan --preset 0.16B --seq-len 2048 --micro-batch 8 --gpu-memory 141 \
      --activation-checkpointing $ac --json --out "$out/plan-0.16B-$ac.json"
done
step mot 180 "${bench[@]}" --configs small small-mot --no-sampling --out "$out/mot"
step serve-load 300 $py benchmarks/serve_load.py --device cuda --out "$out/serve"
step save-time 240 $py benchmarks/save_time.py --preset 0.16B --device cuda --out "$out"
step data-rate 300 $py benchmarks/data_rate.py --workers 0 1 2 4 8 --out "$out"
step compare 300 $py benchmarks/compare_transfusion_pytorch.py --device cuda --width 1024 --heads 16 --text 64 \
    --latent-size 16 --their-depth 12 --rounds 2 --steps 10 --sample-steps 50 --out "$out"
gpus=$($py -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  step multi-gpu-faults 600 $py benchmarks/gpu_faults.py --out "$out/faults"
else
  echo "=== multi-gpu-faults: skipped (one GPU)"
  status+=("multi-gpu-faults: skipped (one GPU)")
fi
echo "=== summary"
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
$py benchmarks/gpu_summary.py "$out" | tee "$out/summary.md"
