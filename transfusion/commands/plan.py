"""`transfusion plan`: what a training run holds on each GPU, and the largest micro-batch that fits.

Per GPU: weights, gradients, AdamW's state and the EMA (fp32; sharded by FSDP2, whole under DDP),
the activations autograd saves (counted per block and position from what the code saves: two
RMSNorms, q/k/v/output and logsumexp of attention, the SwiGLU's hidden tensors; a checkpointed block
keeps only its input), and the transient buffers at the peak (cross-entropy's fp32 gradients or a
block's backward, FSDP2's gathered weights, autocast's bf16 weight copies). Parameters are counted
on the meta device, so nothing is allocated: a 7B plan takes seconds on a laptop. Example::

    transfusion plan --preset 7B --gpus 8 --gpu-memory 80 --seq-len 4096 --micro-batch 1 \\
        --parallel fsdp --activation-checkpointing full
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from transfusion.config import Config, load_config, preset
from transfusion.training.plan import DEFAULT_RESERVE_GIB, format_plan, memory_plan

FLAGS = {  # flag -> config key it sets
    "seq_len": "train.seq_len",
    "micro_batch": "train.batch_size",
    "activation_checkpointing": "train.activation_checkpointing",
    "parallel": "train.parallel",
    "dtype": "train.dtype",
    "attention": "model.attention",
}


EPILOG = "\n\n".join(
    textwrap.fill(paragraph, 100)
    for paragraph in (
        "Activation model: per block and position, the tensors autograd saves for the backward pass in "
        "eager mode (two RMSNorms, attention's q/k/v/output and logsumexp, the SwiGLU's four hidden "
        "tensors; SDPA adds an L-long mask row per layer); a checkpointed block keeps only its input and "
        "the backward recomputes one block at a time; the peak adds cross-entropy's fp32 gradients or "
        "one block's backward working set.",
        "The configuration is Config() (or --config FILE), then --preset (which replaces the model section), "
        "then every --set, then the flags; what a flag leaves unset is the configuration's, as `transfusion "
        "train` with the same --config/--preset/--set would run it ('auto' dtype is bf16 and 'auto' attention "
        "FlexAttention: the plan is for GPUs). The total sums every part (each gradient counted as held at "
        "the activation peak: exact from the second micro-batch of an accumulation, an upper bound by the "
        "gradients otherwise) and counts eager execution (torch.compile saves less). "
        "benchmarks/plan_check.py compares it with measured peaks.",
    )
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("--preset", default=None, help="model preset: tiny, small, 0.16B, 0.37B, 0.76B, 1.4B, 7B")
    p.add_argument(
        "--config", default=None, help="a JSON or TOML config file (as `transfusion train --config`)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.patcher=unet (repeatable)")  # fmt: skip
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs the run uses, one process each (default 1: no wrapper)"
    )
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory of one GPU in GiB (default 80: an A100/H100 80GB)")  # fmt: skip
    p.add_argument("--reserve", type=float, default=DEFAULT_RESERVE_GIB, metavar="GIB",
                   help=f"GiB kept free for the CUDA context, NCCL and fragmentation (default {DEFAULT_RESERVE_GIB:g})")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=None, help="positions per row (train.seq_len)")
    p.add_argument(
        "--micro-batch", type=int, default=None, help="rows per GPU per micro-step (train.batch_size)"
    )
    p.add_argument("--activation-checkpointing", default=None, metavar="MODE",
                   help="none, full or every:K: blocks 0, K, 2K, ... keep only their input and are recomputed "
                   "in the backward pass (train.activation_checkpointing)")  # fmt: skip
    p.add_argument("--parallel", choices=["fsdp", "ddp"], default=None,
                   help="with --gpus > 1: fsdp (FSDP2 shards weights, gradients, AdamW and EMA) or ddp "
                   "(everything whole on each GPU) (train.parallel, default ddp)")  # fmt: skip
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="bf16 (autocast; FSDP2 gathers bf16 weights) or fp32 (train.dtype; default bf16)")  # fmt: skip
    p.add_argument("--attention", choices=["flex", "sdpa"], default=None,
                   help="flex (FlexAttention, the CUDA default: O(L) saved) or sdpa (a dense mask: an L x L "
                   "additive mask saved per layer) (model.attention)")  # fmt: skip
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="count an fp32 EMA of the weights (default: when train.ema_decay > 0)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the plan as JSON to FILE")


def build_config(args: argparse.Namespace) -> Config:
    """Defaults, --config, --preset, every --set, then the flags (as `transfusion train` builds it),
    with the text side fixed by a tokenizer or pretrained LLM the configuration names."""
    from transfusion.training.setup import resolve_text_side

    for flag in ("seq_len", "micro_batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    cfg = load_config(args.config) if args.config else Config()
    if args.preset:
        cfg.model = preset(args.preset)
    overrides = list(args.set or [])
    overrides += [
        f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag) is not None
    ]
    return resolve_text_side(cfg.override(overrides))


def hints(cfg: Config, args: argparse.Namespace, plan: dict[str, Any]) -> list[str]:
    """When the plan does not fit: what the same run would need with FSDP2 or full checkpointing."""
    if plan["fits"] or plan["max_micro_batch"] is None:
        return []
    changes = []
    if plan["mode"] == "ddp":
        changes.append(("--parallel fsdp", ["train.parallel=fsdp"]))
    if plan["activation_checkpointing"] != "full":
        changes.append(("--activation-checkpointing full", ["train.activation_checkpointing=full"]))
    if len(changes) == 2:
        changes.append(("both", [c for _, o in changes for c in o]))
    out = []
    for what, overrides in changes:
        other = memory_plan(cfg.override(overrides), args.gpus, args.gpu_memory, args.ema, args.reserve)
        out.append(f"hint: with {what}: {other['gib']['total']:.2f} GiB per GPU, "
                   f"largest micro-batch {other['max_micro_batch']}")  # fmt: skip
    return out


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    plan = memory_plan(cfg, args.gpus, args.gpu_memory, args.ema, args.reserve)
    text = json.dumps(plan, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
        return 0
    advice = hints(cfg, args, plan)
    print("\n".join([format_plan(plan), *([""] + advice if advice else [])]))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0
