"""`transfusion export`: write a checkpoint's text side in the Hugging Face Llama / Qwen2 layout.

``AutoModelForCausalLM.from_pretrained(OUT)`` then gives the same text logits; the image side is not
part of the export (keep the Transfusion checkpoint for it).
"""

from __future__ import annotations

import argparse

from transfusion.checkpoint import load_model
from transfusion.commands.options import add_checkpoint_option, out_dir
from transfusion.pretrained import ARCHITECTURES, export_hf
from transfusion.tokenizer import HFTokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_option(p)
    p.add_argument(
        "--out", required=True, help="directory for config.json, model.safetensors, tokenizer.json"
    )
    p.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), default=None,
        help="Hugging Face architecture (default: qwen2 for models with q/k/v biases, else llama)",
    )  # fmt: skip
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when EMA weights exist")


def run(args: argparse.Namespace) -> int:
    """Export a trained checkpoint's text side to the Hugging Face layout."""
    loaded = load_model(args.checkpoint, use_ema=not args.no_ema)
    if not isinstance(loaded.tokenizer, HFTokenizer):
        raise ValueError(
            f"{loaded.path} uses the byte tokenizer, which has no tokenizer.json to export; export works for "
            "models trained with --tokenizer or --init-from"
        )
    out = out_dir(args.out)
    arch = args.arch or ("qwen2" if loaded.config.model.qkv_bias else "llama")
    export_hf(loaded.model, loaded.config, loaded.tokenizer, out, arch=arch)
    print(f"wrote {out}: the text side of {loaded.path} as {ARCHITECTURES[arch]} "
          "(AutoModelForCausalLM.from_pretrained loads it; the image side stays in the checkpoint)")  # fmt: skip
    return 0
