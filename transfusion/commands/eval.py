"""`transfusion eval`: evaluate a checkpoint with the paper's kinds of metric and write metrics.json.

For a model trained on the shape scenes: GenEval-style composition of generated images (with the
share of blank images), caption accuracy and CIDEr-D, held-out text bits per byte, and an FD; for
Fashion-MNIST: class-conditional generation and caption accuracy. Images are sampled with the
checkpoint's settings (the paper's: DDPM, 250 steps, guidance 3) unless the options say otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transfusion.commands.generate import (
    add_guidance_interval_option,
    add_relation_wording_option,
    guidance_max_t,
)
from transfusion.commands.options import (
    add_adapter_option,
    add_checkpoint_option,
    add_device_option,
    out_dir,
    pick_device,
)
from transfusion.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_option(p)
    add_adapter_option(p)
    p.add_argument(
        "--out", default=None, help="where to write metrics.json (default: the checkpoint directory)"
    )
    p.add_argument(
        "--prompts-per-kind", type=int, default=10,
        help="held-out prompts per GenEval kind (per class for Fashion-MNIST) (default 10)",
    )  # fmt: skip
    p.add_argument("--captions", type=int, default=60, help="held-out images to caption (default 60)")
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the config's, 250 as the paper)"
    )
    p.add_argument(
        "--sampler", choices=["ddpm", "ddim", "flow"], default=None,
        help="default: the config's (ddpm, ancestral, as the paper; flow for flow models)",
    )  # fmt: skip
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the config's, 3)")
    add_guidance_interval_option(p)
    add_relation_wording_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-inception", default=None, help="a local TorchScript Inception file for real FID")
    add_device_option(p)


def run(args: argparse.Namespace) -> int:
    from transfusion.evaluation import evaluate_checkpoint

    if args.prompts_per_kind < 1 or args.captions < 1:
        raise UserError("--prompts-per-kind and --captions must be >= 1")
    from transfusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.checkpoint, pick_device(args.device), adapters=args.adapter)
    if pipe.vae is None:
        raise UserError(f"{args.checkpoint}: evaluation needs a VAE to see images, and {pipe.missing_vae()}")
    out = out_dir(args.out) if args.out else Path(pipe.path)
    metrics, _ = evaluate_checkpoint(pipe, out, args.prompts_per_kind, args.captions, args.steps, args.sampler,
                                     args.cfg, args.seed, args.fid_inception, guidance_max_t(args),
                                     args.relation_wording)  # fmt: skip
    for k, v in metrics.items():
        print(f"{k:40s} {v}")
    print(f"wrote {out / 'metrics.json'}")
    return 0
