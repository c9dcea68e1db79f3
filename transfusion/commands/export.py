"""`transfusion export`: a checkpoint as a self-describing model directory (the default), as the text
side in the Hugging Face Llama / Qwen2 layout (``--format hf``), or a sharded checkpoint as one file
(``--consolidate``).

The model directory (``transfusion.model_directory``) holds ``config.json``, ``model.safetensors`` (the EMA
weights when the run kept them; split with an index above ``--max-shard-gb``), the tokenizer, the VAE in
``vae/`` and a ``README.md`` model card with the run's training facts and evaluation; it can be
uploaded to a model hub as it is, and ``Pipeline.from_pretrained`` and every ``--checkpoint`` read it.
``--format hf``: ``AutoModelForCausalLM.from_pretrained(OUT)`` then gives the same text logits; the image
side is not part of that export. ``--consolidate`` turns a checkpoint written by several processes into
the one-process layout (``model.safetensors``, ``ema.safetensors``, ``meta.json``); the optimizer state
stays behind. ``--merge-adapter DIR`` folds a LoRA adapter (``train --lora-rank``'s ``adapter/``) into the
weights first; a LoRA run's own checkpoint is exported merged with its base.
"""

from __future__ import annotations

import argparse
import json

from transfusion.checkpoint import consolidate, load_model
from transfusion.commands.options import add_checkpoint_option, out_dir
from transfusion.pretrained import ARCHITECTURES, export_hf
from transfusion.tokenizer import HFTokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_option(p)
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument(
        "--format", choices=["model", "hf"], default="model",
        help="model: a self-describing model directory with a model card (default); hf: the text side in "
        "the Hugging Face layout (config.json, model.safetensors, tokenizer.json)",
    )  # fmt: skip
    p.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), default=None,
        help="with --format hf: the architecture (default: qwen2 for models with q/k/v biases, else llama)",
    )  # fmt: skip
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when EMA weights exist")
    p.add_argument(
        "--merge-adapter", action="append", default=[], metavar="DIR",
        help="fold this LoRA adapter directory into the weights before exporting (repeatable; each is "
        "checked against the weights it was trained on)",
    )  # fmt: skip
    p.add_argument(
        "--max-shard-gb",
        type=float,
        default=2.0,
        help="--format model: weights above this size are split into files of at most this size (default 2)",
    )
    p.add_argument(
        "--consolidate", action="store_true",
        help="write a sharded checkpoint (several processes) as one model.safetensors (+ ema) in --out, "
        "instead of an export",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Export a trained checkpoint (or consolidate it)."""
    if args.consolidate:
        if args.merge_adapter:
            raise ValueError(
                "--consolidate keeps the checkpoint's own weights; export with --merge-adapter instead"
            )
        out = consolidate(args.checkpoint, out_dir(args.out))
        print(
            f"wrote {out}: one-process checkpoint (weights{', EMA' if (out / 'ema.safetensors').is_file() else ''})"
        )
        return 0
    if args.arch and args.format != "hf":
        raise ValueError("--arch goes with --format hf (the Hugging Face layout of the text side)")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    if args.format == "model":
        from transfusion.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(
            args.checkpoint, "cpu", use_ema=not args.no_ema, adapters=args.merge_adapter
        )
        out = pipe.save_pretrained(out_dir(args.out), max_shard_bytes=int(args.max_shard_gb * 1e9))
        evaluated = "metrics" in json.loads((out / "config.json").read_text())
        card = "with the evaluation of its run" if evaluated else "no evaluation found beside the checkpoint"
        print(f"wrote {out}: a model directory (config.json, weights, tokenizer, {'vae/, ' if pipe.vae is not None else ''}"
              f"README.md model card, {card}); Pipeline.from_pretrained and --checkpoint read it")  # fmt: skip
        return 0
    loaded = load_model(args.checkpoint, use_ema=not args.no_ema, adapters=args.merge_adapter)
    if not isinstance(loaded.tokenizer, HFTokenizer):
        raise ValueError(
            f"{loaded.path} uses the byte tokenizer, which has no tokenizer.json to export; --format hf works "
            "for models trained with --tokenizer or --init-from"
        )
    out = out_dir(args.out)
    arch = args.arch or ("qwen2" if loaded.config.model.qkv_bias else "llama")
    export_hf(loaded.model, loaded.config, loaded.tokenizer, out, arch=arch)
    print(f"wrote {out}: the text side of {loaded.path} as {ARCHITECTURES[arch]} "
          "(AutoModelForCausalLM.from_pretrained loads it; the image side stays in the checkpoint)")  # fmt: skip
    return 0
