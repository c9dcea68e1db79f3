"""The demo's spread: run `transfusion demo` N times with different seeds and report, per metric, the
minimum, median and maximum (a target is met when the worst run meets it).

Usage: ``python benchmarks/demo_spread.py [--runs 3] [--minutes 15] [--dataset shapes] [--out spread]
[--set key=value ...] [--only SEED]``. Writes OUT/seed-K/ (each a whole demo run with its report), OUT/spread.json
and OUT/spread.md (a table to paste into the README); runs already finished in OUT are kept, so a
stopped spread continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HEADLINE = (
    "train_steps", "vae_psnr_val", "geneval_blank_rate", "geneval_blank_rate_single_object",
    "geneval_single_object", "geneval_two_objects", "geneval_counting", "geneval_colors", "geneval_position",
    "geneval_color_attr", "geneval_overall", "geneval_position_objects", "geneval_position_axis",
    "geneval_position_order", "geneval_position_as_written", "geneval_position_order_as_written",
    "geneval_overall_as_written", "caption_accuracy", "caption_accuracy_strict", "caption_relation_order",
    "caption_cider_d", "fd_project_classifier",
    "precision_project_classifier", "recall_project_classifier", "geneval_well_formed",
    "fashion_generation_accuracy", "fashion_caption_accuracy", "fashion_classifier_test_accuracy", "minutes",
)  # fmt: skip


def spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for key in HEADLINE:
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "runs": vals}
    return out


def table(s: dict[str, dict[str, float]], seeds: list[int]) -> str:
    lines = ["| metric | " + " | ".join(f"seed {k}" for k in seeds) + " | median | range |",
             "| --- |" + " --- |" * (len(seeds) + 2)]  # fmt: skip
    for key, v in s.items():
        fmt = (lambda x: f"{x:.0%}") if "blank" in key else (lambda x: f"{x:.3g}")  # noqa: E731
        lines.append(f"| {key} | " + " | ".join(fmt(x) for x in v["runs"]) +
                     f" | {fmt(v['median'])} | {fmt(v['min'])} - {fmt(v['max'])} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    from transfusion.demo import run_demo

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="demo runs, seeds 0 .. RUNS-1 (default 3)")
    p.add_argument(
        "--minutes", type=float, default=15.0, help="each run's budget, as `demo --minutes` (default 15)"
    )
    p.add_argument(
        "--dataset", default="shapes", choices=["shapes", "fashion_mnist"], help="as `demo --dataset`"
    )
    p.add_argument(
        "--out", default="spread", help="directory of the runs and the tables; finished runs are kept"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="as `demo --set` (repeatable)"
    )
    p.add_argument(
        "--only", type=int, default=None, metavar="SEED",
        help="run just this seed and stop (to run seeds side by side; a last call without it makes the tables)",
    )  # fmt: skip
    args = p.parse_args()
    if args.runs < 1 or args.minutes <= 0:
        p.error("--runs must be at least 1 and --minutes positive")
    out = Path(args.out)
    runs = []
    for seed in range(args.runs) if args.only is None else [args.only]:
        d = out / f"seed-{seed}"
        if not (d / "metrics.json").is_file():
            result = run_demo(d, args.minutes, seed, source=args.dataset, overrides=args.set)
            (d / "timings.json").write_text(json.dumps(result["timings"], indent=2))
        metrics = json.loads((d / "metrics.json").read_text())
        timings = json.loads((d / "timings.json").read_text()) if (d / "timings.json").is_file() else {}
        runs.append({**metrics, "minutes": timings.get("total", float("nan")) / 60})
    if args.only is not None:
        return
    s = spread(runs)
    (out / "spread.json").write_text(
        json.dumps({"runs": runs, "spread": s, "settings": vars(args)}, indent=2)
    )
    (out / "spread.md").write_text(table(s, list(range(args.runs))) + "\n")
    print(table(s, list(range(args.runs))))


if __name__ == "__main__":
    main()
