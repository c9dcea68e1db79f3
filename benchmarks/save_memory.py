"""Peak host memory of rank 0 while a 2-process FSDP2 run saves a checkpoint: the sharded save
(``training.checkpointer``: every rank writes its own part) against the gathering save the project
used before (the whole weights, AdamW state and EMA gathered on rank 0, then written by it),
measured side by side in one invocation (launches alternate: sharded, gathering, sharded, ...).

    python benchmarks/save_memory.py [--preset 0.16B --seq-len 320 --rounds 2 --out save-mem]

Each launch is ``torchrun --nproc_per_node=2`` on the CPU (gloo), builds the preset with an EMA,
trains one step (so AdamW's moments exist) and saves once; rank 0 reports its resident memory before
the save, the peak during it (``VmHWM``, reset through ``/proc/self/clear_refs``), and the bytes of
its own shard (weights + AdamW + EMA). Prints a markdown table and writes ``save_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def gathering_save(run, out: Path) -> None:
    """The save before sharded checkpoints: everything gathered whole on rank 0, then written."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from transfusion.io import save_tensors

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(run.parallel.model, options=opts)
    optimizer = get_optimizer_state_dict(run.parallel.model, run.optimizer, options=opts)
    ema = {k: v.full_tensor().cpu() for k, v in run.ema.items()}
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(out / "model.safetensors", weights)
        save_tensors(out / "ema.safetensors", ema)
        torch.save({"optimizer": optimizer}, out / "state.pt")


def worker(args: argparse.Namespace) -> None:
    """One launch (rank 0 reports)."""
    import torch
    import torch.distributed as dist

    from transfusion.config import Config, TrainConfig, VAEConfig, preset
    from transfusion.diffusion import make_schedule
    from transfusion.training.loop import save, start_run
    from transfusion.training.step import lr_at, train_step

    torch.set_num_threads(1)
    model = preset(args.preset, max_seq_len=max(args.seq_len, 512))
    cfg = Config(model=model, vae=VAEConfig(image_size=model.latent_size * 4, base_channels=8),
                 train=TrainConfig(steps=10, batch_size=1, seq_len=args.seq_len, parallel="fsdp", ema_decay=0.999,
                                   device="cpu", eval_every=0, warmup_steps=1))  # fmt: skip
    cfg.data.image_size = cfg.vae.image_size
    run = start_run(cfg, Path(args.run_dir), "random", resume=False)
    batches = [next(loader) for loader in run.loaders]
    train_step(run.parallel.step_model, run.optimizer, batches, make_schedule(cfg.diffusion), cfg.diffusion,
               lr=lr_at(0, cfg.train), grad_clip=1.0)  # fmt: skip
    local = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in
                [*run.parallel.model.parameters(), *run.ema.values(),
                 *(v for st in run.optimizer.state.values() for v in st.values() if torch.is_tensor(v))])  # fmt: skip
    full = sum(p.numel() * 4 for p in run.parallel.model.parameters()) * 4  # weights + 2 moments + EMA, fp32
    dist.barrier()
    before = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from here
    t0 = time.perf_counter()
    if args.mode == "sharded":
        run.step = 1
        save(run)
    else:
        gathering_save(run, Path(args.run_dir) / "gathered")
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    if dist.get_rank() == 0:
        row = {"mode": args.mode, "rss_before_mb": before, "peak_mb": peak, "save_extra_mb": peak - before,
               "own_shard_mb": local / MIB, "full_state_mb": full / MIB, "seconds": seconds}  # fmt: skip
        Path(args.report).write_text(json.dumps(row))
    dist.destroy_process_group()


def launch(args: argparse.Namespace, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--mode", mode, "--preset", args.preset, "--seq-len", str(args.seq_len),
               "--run-dir", str(Path(tmp) / "run"), "--report", str(report)]  # fmt: skip
        r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        return json.loads(report.read_text())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="0.16B", help="model preset (default 0.16B: a 2.6 GB full state)")
    p.add_argument("--seq-len", type=int, default=320, help="positions of the one training row (default 320)")
    p.add_argument("--rounds", type=int, default=2, help="launches per mode, alternating (default 2)")
    p.add_argument("--out", default="save-mem", help="directory for save_memory.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="sharded", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [launch(args, mode) for _ in range(args.rounds) for mode in ("sharded", "gathering")]
    med = {m: {k: statistics.median(r[k] for r in rows if r["mode"] == m) for k in rows[0] if k != "mode"}
           for m in ("sharded", "gathering")}  # fmt: skip
    print(f"rank 0 of 2 (FSDP2, gloo, CPU), preset {args.preset}, full state {med['sharded']['full_state_mb']:,.0f} MiB "
          f"(fp32 weights + AdamW + EMA); medians of {args.rounds} launch(es) per mode, alternating; load "
          f"{os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(
        "| save | RSS before (MiB) | peak during the save (MiB) | extra for the save (MiB) | own shard (MiB) | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for m, r in med.items():
        print(f"| {m} | {r['rss_before_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['save_extra_mb']:,.0f} | "
              f"{r['own_shard_mb']:,.0f} | {r['seconds']:.1f} |")  # fmt: skip
    cut = 1 - med["sharded"]["peak_mb"] / med["gathering"]["peak_mb"]
    print(
        f"\nsharded peak {100 * cut:.0f}% below the gathering save's; extra for the save "
        f"{med['sharded']['save_extra_mb'] / med['sharded']['own_shard_mb']:.2f}x the own shard"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "save_memory.json").write_text(
        json.dumps({"rows": rows, "medians": med, "peak_cut": cut}, indent=2)
    )


if __name__ == "__main__":
    main()
