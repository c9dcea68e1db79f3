"""`transfusion <command>`: the single entry point.

Each command is a module of ``transfusion.commands`` with ``add_arguments(parser)`` and
``run(args) -> int``; the work itself is done by the library below. Modules are imported only when
their command is chosen, so ``--help`` is fast and a missing optional extra only affects the command
that needs it. Errors the user can fix print as one line (``TRANSFUSION_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from transfusion.errors import UserError

# command -> (module under transfusion.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "demo",
        "train a tokenizer, a VAE and a Transfusion model on built-in data, evaluate, write report.html",
    ),
    "train": ("train", "train a Transfusion model (one process, or many under torchrun)"),
    "train-vae": ("train_vae", "train the image autoencoder and compute its latent scale"),
    "train-vq": ("train_vq", "train the VQ image tokenizer of the Chameleon-style baseline"),
    "train-tokenizer": ("train_tokenizer", "train a byte-level BPE tokenizer.json on a data source's text"),
    "encode": ("encode", "pre-encode a dataset through the VAE into latent shards that training streams"),
    "generate": ("generate", "generate text, images or both from a prompt"),
    "caption": ("caption", "describe image files with a trained model"),
    "eval": ("eval", "evaluate a checkpoint and write metrics.json"),
    "export": (
        "export",
        "write a self-describing model directory (or the text side in the Hugging Face layout)",
    ),
    "serve": ("serve", "a playground page and an HTTP API, every request batched into one running decoder"),
    "bench": ("bench", "measure speed and memory; print a table and write JSON"),
    "plan": (
        "plan",
        "per-GPU memory of a training run before it starts, and the largest micro-batch that fits",
    ),
    "experiment": (
        "experiment",
        "reproduce one of the paper's findings in miniature (vs-chameleon, attention, ...)",
    ),
}


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: transfusion <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `transfusion <command> --help` for the options of one command."]
    return "\n".join(lines)


def _module(name: str):
    return importlib.import_module(f"transfusion.commands.{COMMANDS[name][0]}")


def parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one command (``name`` a key of ``COMMANDS``), as ``main`` uses it."""
    text = COMMANDS[name][1]
    module = _module(name)
    about = (module.__doc__ or "").strip().split("\n\n")[0]
    built = argparse.ArgumentParser(
        prog=f"transfusion {name}",
        description=f"{text[0].upper()}{text[1:]}." + (f"\n\n{about}" if about else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(built)
    return built


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"transfusion: unknown command {name!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    args = parser(name).parse_args(rest)
    module = _module(name)
    try:
        return int(module.run(args) or 0)
    except (UserError, ValueError, OSError, ModuleNotFoundError) as e:  # the user's to fix: one line
        if os.environ.get("TRANSFUSION_DEBUG"):
            raise
        print(f"transfusion {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"transfusion {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
