"""`transfusion plan` against the measured peak of a real training step on this CPU.

For each configuration, the plan's parts (``transfusion.training.plan.memory_plan``: fp32 or bf16,
SDPA, one process or FSDP2 over gloo in two) beside the peak of a real step: the model made ready by
``training.parallelize``, ``training.train_step`` with ``make_optimizer`` on a batch built by
``transfusion.bench.synthetic_batch``, measured on the second step, once AdamW's moments exist
(several processes: the largest rank's peak; they are started with torchrun). The measurement is PyTorch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``): a ``TorchDispatchMode`` that follows every storage
created while it is on, plus the model's weights, gradients and optimizer state, and records the
peak of live bytes by category. The CPU has no allocator statistics (``max_memory_allocated`` is
CUDA's) and the peak resident set size counts Python, the libraries and the free memory glibc
keeps, so tensors are counted instead.

Usage: ``python benchmarks/plan_check.py [--configs small-none small-full ...] [--out plan_check.json]``
(about three minutes on two cores).
Prints a markdown table; writes the numbers as JSON. A ratio within 0.8-1.2 passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MIB = 2**20
CONFIGS: dict[str, dict[str, Any]] = {
    "small-none": {"preset": "small", "seq_len": 2048, "rows": 2, "checkpointing": "none", "dtype": "fp32"},
    "small-full": {"preset": "small", "seq_len": 2048, "rows": 2, "checkpointing": "full", "dtype": "fp32"},
    "small-every2": {"preset": "small", "seq_len": 2048, "rows": 2, "checkpointing": "every:2", "dtype": "fp32"},
    "tiny-bf16": {"preset": "tiny", "seq_len": 256, "rows": 4, "checkpointing": "none", "dtype": "bf16"},
    "tiny-fsdp-bf16": {"preset": "tiny", "seq_len": 256, "rows": 4, "checkpointing": "none", "dtype": "bf16",
                       "gpus": 2, "parallel": "fsdp"},
    "small-fsdp-full": {"preset": "small", "seq_len": 2048, "rows": 2, "checkpointing": "full", "dtype": "fp32",
                        "gpus": 2, "parallel": "fsdp"},
}  # fmt: skip
DEFAULT = ["small-none", "small-full", "small-every2", "tiny-bf16", "tiny-fsdp-bf16", "small-fsdp-full"]


def build_config(
    preset: str, seq_len: int, rows: int, checkpointing: str, dtype: str, gpus: int = 1, parallel: str = "ddp"
) -> Any:
    """The Config of a CPU run: SDPA, the preset's RoPE table at least ``seq_len`` long."""
    from transfusion.config import Config
    from transfusion.config import preset as model_preset

    cfg = Config(model=model_preset(preset, attention="sdpa"))
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq_len)
    return cfg.override([
        f"train.seq_len={seq_len}", f"train.batch_size={rows}", f"train.activation_checkpointing={checkpointing}",
        f"train.dtype={dtype}", "train.compile=false", "train.device=cpu", f"train.parallel={parallel}",
    ])  # fmt: skip


def measure_peak(cfg: Any) -> dict[str, float]:
    """Peak bytes of the second training step of ``cfg`` on the CPU, in all and by MemTracker's
    categories (Parameter, Buffer, Gradient, Activation, Temp, Optstate); under torchrun, this
    process's (every rank trains on the same rows)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from transfusion import distributed as D
    from transfusion.bench import synthetic_batch
    from transfusion.diffusion import make_schedule
    from transfusion.model import Transfusion
    from transfusion.training import make_optimizer, train_step
    from transfusion.training.parallelize import parallelize

    torch.manual_seed(0)
    model = Transfusion(cfg.model)
    parallel = parallelize(model, cfg, D.init("cpu"))
    batch = synthetic_batch(cfg.model, cfg.train.batch_size, cfg.train.seq_len)
    optimizer = make_optimizer(model, cfg.train)
    schedule = make_schedule(cfg.diffusion)

    def step() -> None:
        train_step(parallel.step_model, optimizer, [batch], schedule, cfg.diffusion, lr=cfg.train.lr,
                   grad_clip=cfg.train.grad_clip, autocast=parallel.autocast())  # fmt: skip

    step()  # AdamW's moments exist from here on, as in every step after the first
    tracker = MemTracker()
    tracker.track_external(
        model, optimizer, *[v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    )
    with tracker:
        step()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    out = {str(getattr(k, "value", k)): float(v) for k, v in peak.items()}
    out["images"] = batch.num_images
    return out


def measure_with_torchrun(name: str, gpus: int) -> dict[str, float]:
    """``measure_peak`` in ``gpus`` processes (gloo): the rank with the largest peak."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                   __file__, "--worker", name, "--out", str(out)]  # fmt: skip
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        return json.loads(out.read_text())


def worker(name: str, out: str) -> None:
    """One process of a multi-process measurement (started by torchrun)."""
    from transfusion import distributed as D

    peak = measure_peak(build_config(**CONFIGS[name]))
    peaks = D.all_gather_object(peak)
    if D.init("cpu").is_main:
        Path(out).write_text(json.dumps(max(peaks, key=lambda p: p["Total"])))
    D.cleanup()


def check(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from transfusion.training.plan import memory_plan

    cfg = build_config(**spec)
    gpus = spec.get("gpus", 1)
    plan = memory_plan(cfg, gpus=gpus)
    start = time.perf_counter()
    measured = measure_peak(cfg) if gpus == 1 else measure_with_torchrun(name, gpus)
    return {
        "config": name, **spec, "predicted_bytes": plan["bytes"], "measured_bytes": measured,
        "ratio": plan["bytes"]["total"] / measured["Total"], "peak_moment": plan["peak_moment"],
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| configuration | weights | grads | AdamW | activations | transient | predicted | measured "
            "| ratio | measured activations / temp |")  # fmt: skip
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        p, m = r["predicted_bytes"], r["measured_bytes"]
        procs = f", {r['parallel']} x {r['gpus']}" if r.get("gpus", 1) > 1 else ""
        what = f"{r['config']}: {r['preset']} {r['dtype']}{procs}, {r['rows']} x {r['seq_len']}, ckpt {r['checkpointing']}"
        cells = [
            p[k] / MIB for k in ("parameters", "gradients", "optimizer", "activations", "transient", "total")
        ]
        lines.append(
            f"| {what} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {m['Total'] / MIB:.1f} | "
            f"{r['ratio']:.3f} | {m['Activation'] / MIB:.1f} / {m['Temp'] / MIB:.1f} |"
        )
    return (
        "\n".join(lines) + "\n\n(MiB per process; predicted = the plan's sum; measured = MemTracker's peak)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT, choices=sorted(CONFIGS),
                   help=f"configurations to check (default: {' '.join(DEFAULT)})")  # fmt: skip
    p.add_argument("--out", default="plan_check.json", help="where the JSON goes (default plan_check.json)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a process started by torchrun
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.out)
        return 0
    rows = []
    for name in args.configs:
        rows.append(check(name, CONFIGS[name]))
        print(f"{name}: ratio {rows[-1]['ratio']:.3f} ({rows[-1]['seconds']} s)", file=sys.stderr)
    print(table(rows))
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(0.8 <= r["ratio"] <= 1.2 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
