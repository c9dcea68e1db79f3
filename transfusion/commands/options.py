"""Options and helpers every command shares, written once: the data source, the device, the output
directory, the checkpoint, progress, and notes (on stderr; results go to stdout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transfusion.errors import UserError
from transfusion.io import output_directory

DATA_SOURCES = ("shapes", "shape-edits", "fashion_mnist", "folder", "jsonl", "text", "webdataset", "latents")


def note(message: str) -> None:
    """A note for the person at the terminal (progress, what was chosen, warnings): stderr."""
    print(message, file=sys.stderr)


def add_data_options(
    p: argparse.ArgumentParser, default: str | None = "shapes", sources: tuple[str, ...] = DATA_SOURCES
) -> None:
    """``--data`` and ``--data-path``, described the same way by every command."""
    text = (
        "data source: shapes (the built-in scenes), shape-edits (edits of them: image, instruction, image), fashion_mnist (Debian's dataset-fashion-mnist), folder "
        "(images with .txt captions), jsonl (a manifest), text (.txt documents), webdataset (tar shards), "
        "latents (made by transfusion encode)"
    )
    shown = [s for s in DATA_SOURCES if s in sources]
    p.add_argument("--data", default=default, choices=shown, metavar="SOURCE",
                   help=f"{text}; one of {', '.join(shown)}" + (f" (default {default})" if default else ""))  # fmt: skip
    p.add_argument(
        "--data-path", default=None, help="the files of a file-based source (folder, jsonl, text, tar shards)"
    )


def add_adapter_option(p: argparse.ArgumentParser) -> None:
    """``--adapter DIR`` (repeatable): LoRA adapters merged into the --checkpoint's weights
    (``Pipeline.from_pretrained(adapters=...)``)."""
    p.add_argument(
        "--adapter", action="append", default=[], metavar="DIR",
        help="a LoRA adapter directory (train --lora-rank writes RUN/adapter) merged into the weights "
        "(repeatable; checked against the weights it was trained on)",
    )  # fmt: skip


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="cpu, cuda (or cuda:N), or auto: CUDA when available (default)"
    )


def pick_device(name: str) -> str:
    """The ``--device`` option as a device name (``pipeline.resolve_device``: 'auto' is CUDA when
    available, else the CPU; TF32 on for CUDA)."""
    from transfusion.pipeline import resolve_device

    try:
        return str(resolve_device(name))
    except UserError as e:
        raise UserError(f"--{e}") from None


def add_checkpoint_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint directory, or a run directory (its latest)"
    )


def add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output directory; an existing file at that path is an error that names the flag."""
    return output_directory(path, flag)


def new_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output directory that must not hold anything yet (nothing of a previous run is overwritten)."""
    path = out_dir(path, flag)
    if path.exists() and any(path.iterdir()):
        raise UserError(f"{flag} {path} exists and is not empty; choose another {flag}")
    return path
