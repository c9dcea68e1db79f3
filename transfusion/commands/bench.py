"""`transfusion bench`: measure speed and memory; print a table and write JSON.

Training throughput and MFU (the step users run), cached decoding, whole images and single denoising
steps, each next to a matmul peak measured in the same run; see ``transfusion.bench``.
"""

from __future__ import annotations

import argparse
import json

import torch

from transfusion.bench import CONFIGS, format_table, run_benchmarks
from transfusion.commands.options import add_device_option, out_dir, pick_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--configs",
        nargs="+",
        default=["tiny", "small", "w512"],
        choices=sorted(CONFIGS),
        help="model configs to measure (default: tiny small w512)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per training step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="positions per row (default 128)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per number; the median is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    add_device_option(p)
    p.add_argument("--no-sampling", action="store_true", help="only the training numbers")
    p.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto",
        help="compile the training step's blocks: auto (the training default: on CUDA only), on, off",
    )  # fmt: skip
    p.add_argument(
        "--activation-checkpointing", default="none", metavar="MODE",
        help="none (default), full, or every:K: recompute blocks' activations in the backward pass",
    )  # fmt: skip
    p.add_argument(
        "--parallel", choices=["none", "fsdp"], default="none",
        help="fsdp: the model sharded by FSDP2 in a process group of one (its bf16 mixed-precision policy on CUDA)",
    )  # fmt: skip
    p.add_argument(
        "--image-steps", type=int, nargs="+", default=[250, 50],
        help="denoising steps of the whole-image timings (default 250 50: the paper's, and a fast setting)",
    )  # fmt: skip
    p.add_argument("--out", default="bench-out", help="directory for bench.json (default bench-out)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    result = run_benchmarks(
        args.configs, args.batch_size, args.seq_len, args.repeat, device, not args.no_sampling,
        tuple(args.image_steps), {"auto": None, "on": True, "off": False}[args.compile],
        args.activation_checkpointing, args.parallel,
    )  # fmt: skip
    print(format_table(result))
    out = out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'bench.json'}")
    return 0
