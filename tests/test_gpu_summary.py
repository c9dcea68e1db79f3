"""``benchmarks/gpu_summary.py`` turns what gpu.sh wrote into one markdown table, and says which steps did
not end cleanly instead of printing numbers for them; ``benchmarks/gpu_faults.py`` skips on fewer than
two GPUs."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import load_benchmark

ROOT = Path(__file__).parents[1]


def test_the_summary_shows_what_ran_and_flags_what_did_not(tmp_path, capsys, monkeypatch):
    (tmp_path / "0.16B").mkdir()
    (tmp_path / "0.16B" / "bench.json").write_text(json.dumps({
        "machine": {"cuda": "NVIDIA H200", "torch": "2.13.0"},
        "rows": [{"config": "0.16B", "batch": "8x2048", "dtype": "bf16-autocast", "compiled": True,
                  "tokens_per_s": 123456, "mfu": 0.39, "cuda_max_alloc_mb": 20480, "image_s_250steps": 2.5}]}))  # fmt: skip
    (tmp_path / "faults").mkdir()
    step = {
        "ok": True,
        "fsdp": {"max_grad_diff": 3e-8, "reduce_scatters": 3},
        "fsdp_groups": 3,
        "bf16": {"gap": 8e-5},
    }
    (tmp_path / "faults" / "gpu_faults.json").write_text(json.dumps({
        "ddp": {"ok": True, "seconds": 12.5}, "fsdp": {"ok": False, "seconds": 600}, "step": step}))  # fmt: skip
    (tmp_path / "summary.txt").write_text("gpu-tests: exit 0\n0.76B: exit 124\nmulti-gpu-faults: exit 1\n")
    monkeypatch.setattr(sys, "argv", ["gpu_summary.py", str(tmp_path)])
    load_benchmark("gpu_summary").main()
    out = capsys.readouterr().out
    assert "NVIDIA H200, torch 2.13.0" in out
    assert (
        "| 0.16B: 0.16B 8x2048 bf16-autocast compiled | 123,456 tok/s, MFU 39%, 20.0 GiB, one image 2.50 s |"
        in out
    )
    assert "2 GPUs ddp: text-only micro-batches, NaN on rank 1 | finished in 12.5 s" in out
    assert "2 GPUs fsdp: text-only micro-batches, NaN on rank 1 | FAILED in 600 s" in out
    assert "3 per step (3 groups)" in out
    assert "not clean: 0.76B: exit 124, multi-gpu-faults: exit 1" in out


def test_gpu_faults_skips_without_two_gpus(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_faults.py"), "--out", str(tmp_path / "f")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "needs 2 GPUs; skipped" in r.stdout and not (tmp_path / "f").exists()
