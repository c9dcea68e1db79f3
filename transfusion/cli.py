"""`transfusion <command>`: the single entry point.

Each command lives in the module that does the work; that module exposes ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command is chosen, so ``--help`` is
fast and a missing optional extra only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "transfusion.demo",
        "train a tokenizer, a VAE and a Transfusion model on built-in data, evaluate, write report.html",
    ),
    "train": ("transfusion.train", "train a Transfusion model (one process, or many under torchrun)"),
    "train-vae": ("transfusion.vae_train", "train the image autoencoder and compute its latent scale"),
    "train-tokenizer": (
        "transfusion.tokenizer",
        "train a byte-level BPE tokenizer.json on a data source's text",
    ),
    "generate": ("transfusion.generate_cli", "generate text, images or both from a prompt"),
    "caption": ("transfusion.caption_cli", "describe image files with a trained model"),
    "eval": ("transfusion.evaluate", "evaluate a checkpoint and write metrics.json"),
    "export": (
        "transfusion.pretrained",
        "write a checkpoint's text side in the Hugging Face Llama / Qwen2 layout",
    ),
    "bench": ("transfusion.bench", "measure speed and memory; print a table and write JSON"),
}


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: transfusion <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `transfusion <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"transfusion: unknown command {name!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    about = (module.__doc__ or "").strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(
        prog=f"transfusion {name}",
        description=f"{text[0].upper()}{text[1:]}." + (f"\n\n{about}" if about else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
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
