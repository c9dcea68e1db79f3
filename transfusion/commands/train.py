"""`transfusion train`: train a Transfusion model (one process, or many under torchrun).

The configuration is built from defaults, a config file, a preset, the flags and every ``--set``, in
that order; ``--resume`` continues a run with the configuration it stored. The loop itself is
``transfusion.training.train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transfusion import distributed as D
from transfusion.commands.options import add_data_options, add_progress_option, out_dir
from transfusion.config import Config, load_config, preset
from transfusion.training import train


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config) if args.config else Config()
    if args.preset:
        cfg.model = preset(args.preset)
        if args.preset == "tiny":  # tiny latents (4x4) come from 16x16 images
            cfg.vae.image_size = cfg.data.image_size = cfg.model.latent_size * cfg.vae.downsample
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.data_path:
        overrides.append(f"data.path={json.dumps(args.data_path)}")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    if args.tokenizer:
        overrides.append(f"train.tokenizer={json.dumps(str(Path(args.tokenizer).resolve()))}")
    if args.init_from:
        overrides.append(f"train.init_from={json.dumps(args.init_from)}")
    if args.init_checkpoint:
        if args.preset:
            raise ValueError("--init-checkpoint brings its model; drop --preset")
        if not Path(args.init_checkpoint).exists():
            raise FileNotFoundError(f"--init-checkpoint {args.init_checkpoint} does not exist")
        overrides.append(f"train.init_checkpoint={json.dumps(str(Path(args.init_checkpoint).resolve()))}")
    if args.lora_rank is not None:
        overrides.append(f"train.lora_rank={args.lora_rank}")
    if args.freeze_text:
        overrides.append("train.freeze_text=true")
    if args.train_layers:
        overrides.append(f"train.train_layers=[{args.train_layers}]")
    if args.strict:
        overrides.append("data.strict=true")
    return cfg.override(overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from transfusion.config import config_keys_help

    p.epilog = (
        "The configuration is Config() (or --config FILE), then --preset (which replaces the model section), "
        "then the flags below and every --set, in order.\n\n" + config_keys_help()
    )
    p.add_argument("--out", required=True, help="run directory (created; holds config, metrics, checkpoints)")
    p.add_argument("--preset", default=None, help="model preset: tiny, small, 0.16B, 0.37B, 0.76B, 1.4B, 7B")
    p.add_argument(
        "--config",
        default=None,
        help="a JSON or TOML config file (sections model, diffusion, vae, data, train)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=1e-3 (repeatable)",
    )
    add_data_options(p, default=None)
    p.add_argument(
        "--vae",
        default=None,
        help="trained VAE directory (transfusion train-vae), or 'random' for smoke tests",
    )
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer.json (or its directory), e.g. from `transfusion train-tokenizer` (default: bytes)",
    )
    p.add_argument(
        "--init-from", default=None, help="start from a local Hugging Face Llama / Qwen2 directory"
    )
    p.add_argument(
        "--init-checkpoint",
        default=None,
        help="fine-tune a Transfusion checkpoint (a run directory, a checkpoint or a model directory): its "
        "weights, EMA, model config, tokenizer and VAE start a new run with a fresh optimizer and schedule",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="with --init-checkpoint: train rank-R adapters on the frozen model (train.lora_rank; "
        "train.lora_alpha, train.lora_targets, train.lora_modality, train.lora_patcher refine it)",
    )
    p.add_argument("--freeze-text", action="store_true", help="with --init-from: train only the image side")
    p.add_argument(
        "--train-layers", default=None, help="with --freeze-text: layers that still train, e.g. 10,11 or -1"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable data item (default: skip it with a warning and count it)",
    )
    add_progress_option(p)


def run(args: argparse.Namespace) -> int:
    stored = Path(args.out) / "config.json"
    if args.resume and stored.is_file():
        # a resumed run continues with the configuration it ran with; --steps and --set may change it
        fixed = [
            n
            for n in ("preset", "config", "data", "data_path", "tokenizer", "init_from", "init_checkpoint")
            if getattr(args, n)
        ]
        if fixed or args.freeze_text or args.train_layers or args.lora_rank is not None:
            flags = ", ".join("--" + n.replace("_", "-") for n in fixed) or "--freeze-text/--train-layers"
            raise ValueError(
                f"--resume continues with {stored}; drop {flags} (change single fields with --set)"
            )
        cfg = load_config(stored)
        overrides = list(args.set or []) + ([f"train.steps={args.steps}"] if args.steps else [])
        overrides += ["data.strict=true"] if args.strict else []
        cfg = cfg.override(overrides)
    else:
        cfg = build_config(args)
    result = train(cfg, out_dir(args.out), vae=args.vae, resume=args.resume, progress=not args.no_progress)
    D.print0(
        f"stopped at step {result['step']}; checkpoints in {Path(args.out) / 'checkpoints'}", file=sys.stdout
    )
    return 130 if result["interrupted"] else 0
