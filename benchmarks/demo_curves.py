"""Reference loss curves of the default demo: median and range over several fresh runs.

    python benchmarks/demo_curves.py spread/seed-0 spread/seed-1 spread/seed-2   # write docs/demo_curves.*
    python benchmarks/demo_curves.py --check runs/demo                            # place a run against them

The runs are demo (or training) directories, e.g. those ``benchmarks/demo_spread.py`` writes. The
first form writes ``docs/demo_curves.json`` (median, min and max of the training losses, in bins of
50 steps, and of the validation losses, at every step all runs reached) and draws
``docs/demo_curves.svg``; ``--check`` prints, per curve, how many of a run's steps lie within the
reference range (widened by 10% of its median) and its last value against it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transfusion.evaluation.curves import aggregate, compare
from transfusion.evaluation.report import LOSS_UNITS, loss_svg

DOCS = Path(__file__).resolve().parent.parent / "docs"


def draw(ref: dict) -> str:
    """Two log-log panels side by side (text and image loss), training and validation: the median of the
    runs as a line, their range shaded."""
    c = ref["curves"]
    panels = []
    for kind, colors in (("text", ("#1f77b4", "#2ca02c")), ("image", ("#d62728", "#9467bd"))):
        series = [
            (f"training ({ref['bin_steps']}-step means)", colors[0], list(zip(c[f"train_{kind}_loss"]["step"],
                c[f"train_{kind}_loss"]["median"], c[f"train_{kind}_loss"]["min"], c[f"train_{kind}_loss"]["max"]))),
            ("validation", colors[1], list(zip(c[f"val_{kind}_loss"]["step"], c[f"val_{kind}_loss"]["median"],
                c[f"val_{kind}_loss"]["min"], c[f"val_{kind}_loss"]["max"]))),
        ]  # fmt: skip
        title = f"{kind} loss, median and range of {ref['runs']} demo runs"
        panels.append(loss_svg(series, title, LOSS_UNITS[kind], width=470, height=300))
    inner = "".join(p.replace("<svg ", f'<svg x="{i * 470}" ', 1) for i, p in enumerate(panels))
    return f'<svg width="940" height="300" xmlns="http://www.w3.org/2000/svg">{inner}</svg>\n'


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="*", type=Path, help="demo or training run directories")
    p.add_argument("--check", type=Path, default=None, help="a run to place against docs/demo_curves.json")
    p.add_argument("--out", type=Path, default=DOCS, help="where demo_curves.json/.svg go (default docs/)")
    p.add_argument("--redraw", action="store_true", help="draw demo_curves.svg again from demo_curves.json")
    args = p.parse_args()
    if args.redraw:
        (args.out / "demo_curves.svg").write_text(
            draw(json.loads((args.out / "demo_curves.json").read_text()))
        )
        print(f"wrote {args.out / 'demo_curves.svg'}")
        return
    if args.check is not None:
        ref = json.loads((args.out / "demo_curves.json").read_text())
        print("\n".join(compare(ref, args.check)))
        return
    if len(args.runs) < 2:
        p.error("give two runs or more (the reference is their median and range), or --check RUN")
    ref = aggregate(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_curves.json").write_text(json.dumps(ref, indent=1))
    (args.out / "demo_curves.svg").write_text(draw(ref))
    steps = ref["curves"]["val_image_loss"]["step"]
    print(
        f"wrote {args.out / 'demo_curves.json'} and demo_curves.svg: {ref['runs']} runs, validated at {steps}"
    )


if __name__ == "__main__":
    main()
