"""How long a checkpoint stops training: a synchronous save against ``train.async_checkpoint`` (the
state copied to host memory, then written by a background thread), on one device.

    python benchmarks/save_time.py [--preset 0.16B --device cuda --rounds 2 --out save-time]

Builds the preset with AdamW state (one step) and an EMA, then saves through the training loop's
``Checkpointer`` (``training.checkpointer``), alternating synchronous and background saves; reports the
stall (until ``save`` returns and training may go on) and the time until the checkpoint is complete.
Prints a markdown table and writes ``save_time.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="0.16B", help="model preset (default 0.16B)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--rounds", type=int, default=2, help="saves per mode, alternating (default 2)")
    p.add_argument("--out", default="save-time", help="directory for save_time.json")
    args = p.parse_args()
    from transfusion.bench import synthetic_batch
    from transfusion.config import Config, DiffusionConfig, TrainConfig, preset
    from transfusion.diffusion import make_schedule
    from transfusion.distributed import DistInfo
    from transfusion.model import Transfusion
    from transfusion.tokenizer import ByteTokenizer
    from transfusion.training.checkpointer import Checkpointer
    from transfusion.training.step import make_optimizer, train_step

    device = torch.device(args.device)
    cfg = Config(model=preset(args.preset), train=TrainConfig(keep_last=1))
    model = Transfusion(cfg.model).to(device)
    opt = make_optimizer(model, cfg.train)
    batch = synthetic_batch(cfg.model, 1, cfg.model.patches_per_image + 64).to(device)
    train_step(
        model, opt, [batch], make_schedule(DiffusionConfig()), DiffusionConfig(), lr=1e-4, grad_clip=1.0
    )
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    state_mb = (sum(p.numel() for p in model.parameters()) * 4 * 4) / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for background in (False, True):
                cfg.train.async_checkpoint = background
                saver = Checkpointer(Path(tmp), cfg, ByteTokenizer(), DistInfo(device=device), streams=1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                saver.save(r * 2 + background + 1, model, opt, ema, [{}], {"tokens_seen": 0})
                stall = time.perf_counter() - t0
                saver.wait()
                rows.append({"async": background, "stall_s": stall, "complete_s": time.perf_counter() - t0})
    print(f"{args.preset} on {args.device}: {state_mb:,.0f} MiB of fp32 weights + AdamW + EMA; medians of "
          f"{args.rounds} saves per mode\n")  # fmt: skip
    print("| save | training stops for (s) | checkpoint complete after (s) |")
    print("| --- | --- | --- |")
    for background in (False, True):
        mine = [r for r in rows if r["async"] == background]
        print(f"| {'train.async_checkpoint' if background else 'synchronous'} | "
              f"{statistics.median(r['stall_s'] for r in mine):.2f} | {statistics.median(r['complete_s'] for r in mine):.2f} |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "save_time.json").write_text(
        json.dumps({"preset": args.preset, "device": args.device, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
