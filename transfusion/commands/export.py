"""`transfusion export`: write a checkpoint's text side in the Hugging Face Llama / Qwen2 layout, or
(``--consolidate``) a sharded checkpoint as one file.

``AutoModelForCausalLM.from_pretrained(OUT)`` then gives the same text logits; the image side is not
part of the export (keep the Transfusion checkpoint for it). ``--consolidate`` turns a checkpoint written
by several processes into the one-process layout (``model.safetensors``, ``ema.safetensors``,
``meta.json``), which every command also reads directly; the optimizer state stays behind.
"""

from __future__ import annotations

import argparse

from transfusion.checkpoint import consolidate, load_model
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
    p.add_argument(
        "--consolidate", action="store_true",
        help="write a sharded checkpoint (several processes) as one model.safetensors (+ ema) in --out, "
        "instead of the Hugging Face export",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Export a trained checkpoint's text side to the Hugging Face layout (or consolidate it)."""
    if args.consolidate:
        out = consolidate(args.checkpoint, out_dir(args.out))
        print(
            f"wrote {out}: one-process checkpoint (weights{', EMA' if (out / 'ema.safetensors').is_file() else ''})"
        )
        return 0
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
