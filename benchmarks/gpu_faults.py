"""The multi-process fault matrix on two GPUs (NCCL), for ``benchmarks/gpu.sh``: what the gloo tests
prove on the CPU, run where NCCL's own behaviour (timeouts, reduce-scatters, bf16) is the real one.

1. DDP and FSDP2 runs of the tiny model with text-only micro-batches (one rank, both, alternating) and
   a NaN loss on rank 1 at step 5 (``tests/distributed_run.py --faults``): each must finish, skip
   step 5 on both ranks and log finite losses after it; the wall time of each run.
2. ``tests/distributed_step.py`` on the GPUs: gradient accumulation equal to one big batch (fp32),
   FSDP2's reduce-scatters per step (one per group), the global norm, and bf16 under FSDP2 against
   DDP with fp32 RoPE tables in the blocks.

Writes ``gpu_faults.json`` and prints one line per check. Usage: ``python benchmarks/gpu_faults.py
--out DIR`` on a machine with 2 or more GPUs (the package installed, run from the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULTS = {"text_only": {"1": [0], "2": [0, 1], "3": [0], "4": [1]}, "nan": {"5": [1]}}


def torchrun(script: str, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / script), *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT)}
    started = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.time() - started


def fault_run(out: Path, parallel: str) -> dict:
    from transfusion.config import Config, TrainConfig, VAEConfig, tiny

    cfg = Config(model=tiny(), vae=VAEConfig(image_size=16, base_channels=8),
                 train=TrainConfig(steps=6, batch_size=2, seq_len=64, warmup_steps=1, log_every=1, eval_every=0,
                                   ckpt_every=3, parallel=parallel, device="cuda"))  # fmt: skip
    cfg.data.image_size = 16
    cfg_file = out / f"{parallel}.json"
    cfg_file.write_text(cfg.to_json())
    run = out / f"run-{parallel}"
    r, took = torchrun("distributed_run.py", str(cfg_file), str(run), "--faults", json.dumps(FAULTS))
    lines = (
        [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if r.returncode == 0 else []
    )
    ok = (
        r.returncode == 0
        and "step 5: non-finite loss on rank 1, update skipped on every rank" in r.stderr
        and len(lines) == 6
        and all(math.isfinite(x["text_loss"]) for x in lines if x["step"] != 5)
    )
    return {"ok": ok, "seconds": round(took, 1), "losses": [(x["step"], x["text_loss"], x["image_loss"]) for x in lines],
            "error": "" if ok else r.stderr[-2000:]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-faults")
    args = p.parse_args()
    import torch

    if torch.cuda.device_count() < 2:
        print("gpu_faults: needs 2 GPUs; skipped")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {parallel: fault_run(out, parallel) for parallel in ("ddp", "fsdp")}
    r, took = torchrun("distributed_step.py", str(out / "step.json"), "cuda")
    step = json.loads((out / "step.json").read_text()) if r.returncode == 0 else {}
    report["step"] = {"ok": r.returncode == 0, "seconds": round(took, 1), **step,
                      "error": "" if r.returncode == 0 else r.stderr[-2000:]}  # fmt: skip
    for parallel in ("ddp", "fsdp"):
        x = report[parallel]
        print(
            f"{parallel}: text-only micro-batches and a NaN on rank 1: {'finished' if x['ok'] else 'FAILED'} in {x['seconds']} s"
        )
    s = report["step"]
    if s["ok"]:
        print(f"accumulation 4 = one big batch: max gradient gap {s['fsdp']['max_grad_diff']:.1e} (FSDP2), "
              f"{s['ddp']['max_grad_diff']:.1e} (DDP); FSDP2 reduce-scatters per step {s['fsdp']['reduce_scatters']} "
              f"for {s['fsdp_groups']} groups; bf16 DDP vs FSDP2 loss gap {s['bf16']['gap']:.1e}, RoPE tables {s['bf16']['rope_dtypes']}")  # fmt: skip
    else:
        print("distributed_step: FAILED\n" + s["error"])
    (out / "gpu_faults.json").write_text(json.dumps(report, indent=2))
    if not all(report[k]["ok"] for k in ("ddp", "fsdp", "step")):
        sys.exit(1)


if __name__ == "__main__":
    main()
