"""`transfusion demo`: the whole recipe on built-in data within a time budget, ending in report.html.

Trains a tokenizer, a VAE and a Transfusion model on caption/image pairs of synthetic shape scenes
(or Fashion-MNIST), generates images for held-out prompts, captions held-out images, scores both and
writes ``report.html``; the pipeline is ``transfusion.demo``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transfusion.commands.options import new_out_dir, note
from transfusion.demo import demo_config, run_demo
from transfusion.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default runs/demo-<date>-<time>)")
    p.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="total time budget; stages scale to fit, evaluation needing about 1-2 min of it (default 15)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the data, the models and the sampling (default 0)"
    )
    p.add_argument(
        "--calibrate", action="store_true",
        help="fit the step counts to this machine's measured speed (default: the reference machine's, so that "
        "the same budget trains the same steps everywhere and runs compare)",
    )  # fmt: skip
    p.add_argument(
        "--dataset",
        choices=["shapes", "fashion_mnist"],
        default="shapes",
        help="built-in shape scenes (default) or Fashion-MNIST from Debian's package",
    )
    p.add_argument(
        "--prompts-per-kind", type=int, default=30, help="held-out prompts per GenEval kind (default 30)"
    )
    p.add_argument("--captions", type=int, default=100, help="held-out images to caption (default 100)")
    p.add_argument(
        "--edit", nargs="?", type=float, const=5.0, default=0.0, metavar="MINUTES",
        help="then fine-tune the model on image edits (LoRA on shape-scene edits) for MINUTES more (default 5) "
        "and add an editing section to report.html (shape scenes only)",
    )  # fmt: skip
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change the demo's configuration, e.g. --set model.patcher=linear (repeatable; see `train --help`)",
    )


def run(args: argparse.Namespace) -> int:
    out = new_out_dir(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if args.minutes <= 0:
        raise UserError("--minutes must be > 0")
    demo_config(1, args.seed, args.dataset, None, None, args.set)  # bad --set values fail before any work
    if args.edit and args.dataset != "shapes":
        raise UserError("--edit fine-tunes on shape-scene edits: it goes with --dataset shapes")
    if args.edit < 0:
        raise UserError("--edit MINUTES must be > 0")
    result = run_demo(
        out,
        args.minutes,
        args.seed,
        args.prompts_per_kind,
        args.captions,
        args.dataset,
        args.set,
        args.calibrate,
        args.edit,
    )
    if args.out is None:
        link_latest(out)
    m = result["metrics"]
    if args.dataset == "fashion_mnist":
        print(f"\nreport: {result['report']}\nclass-conditional generation accuracy {m['fashion_generation_accuracy']:.2f} "
              f"(its judge on real test images: {m['fashion_classifier_test_accuracy']:.2f}), "
              f"caption accuracy {m['fashion_caption_accuracy']:.2f}, {result['timings']['total'] / 60:.1f} min")  # fmt: skip
        return 0
    print(
        f"\nreport: {result['report']}\n"
        f"composition overall {m['geneval_overall']:.2f} (single object {m['geneval_single_object']:.2f}, "
        f"blank images {m['geneval_blank_rate']:.0%}), "
        f"caption accuracy {m['caption_accuracy']:.2f}, CIDEr-D {m['caption_cider_d']:.2f}, "
        f"text {m['text_bits_per_byte']:.2f} bits/byte, VAE PSNR {m['vae_psnr_val']:.1f} dB, "
        f"{result['timings']['total'] / 60:.1f} min"
    )
    if args.edit:
        print(f"editing: edit {m['edit_edit']:.2f}, kept {m['edit_kept']:.2f}, exact {m['edit_exact']:.2f} "
              f"on held-out edits after {m['edit_steps']} LoRA steps")  # fmt: skip
    return 0


def link_latest(out: Path) -> None:
    """``runs/demo`` -> the demo run just finished (a relative symlink, replaced atomically): so that
    ``Pipeline.from_pretrained("runs/demo/model")``, as the README's Python section writes it, loads the
    newest demo's model. Where links cannot be made, a note says so and nothing else changes."""
    link = out.parent / "demo"
    if link.exists() and not link.is_symlink():
        note(f"note: {link} exists and is not a link; the newest demo is {out}")
        return
    tmp = out.parent / ".demo-link.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(out.name)
        tmp.replace(link)
    except OSError as e:
        note(f"note: could not point {link} at {out} ({e.strerror or e})")
