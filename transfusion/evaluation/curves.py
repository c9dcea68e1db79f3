"""Reference loss curves: the default demo's training and validation losses over several fresh runs,
as median and range per step, so that a user can tell whether their own run is healthy.

``aggregate`` reads the runs' ``metrics.jsonl`` (training losses every ``log_every`` steps, averaged in
bins of ``bin_steps``; validation losses where they were measured), keeps the steps every run reached,
and returns median, min and max per step. ``python benchmarks/demo_curves.py`` writes them to
``docs/demo_curves.json`` and draws ``docs/demo_curves.svg``; ``compare`` places a run against them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from transfusion.evaluation.report import read_metrics_log

SERIES = {
    "train_text_loss": "text_loss",
    "train_image_loss": "image_loss",
    "val_text_loss": "val_text_loss",
    "val_image_loss": "val_image_loss",
}
"""Curve name -> the key in metrics.jsonl."""


def run_series(records: list[dict], bin_steps: int = 50) -> dict[str, dict[int, float]]:
    """{curve: {step: value}} of one run. Training losses (logged every few steps, noisy) are the mean
    of each bin of ``bin_steps`` steps, labelled with the bin's last step; validation losses are kept
    at the steps they were measured."""
    out: dict[str, dict[int, float]] = {name: {} for name in SERIES}
    bins: dict[str, dict[int, list[float]]] = {name: {} for name in SERIES if name.startswith("train_")}
    for r in records:
        for name, key in SERIES.items():
            if not isinstance(r.get(key), (int, float)):
                continue
            if name in bins:
                label = -(-r["step"] // bin_steps) * bin_steps  # the bin's last step
                bins[name].setdefault(label, []).append(float(r[key]))
            else:
                out[name][int(r["step"])] = float(r[key])
    for name, by_label in bins.items():
        out[name] = {step: statistics.fmean(v) for step, v in sorted(by_label.items())}
    return out


def aggregate(run_dirs: list[Path], bin_steps: int = 50) -> dict[str, Any]:
    """Median, min and max over runs at every step all of them reached, per curve. A run is a
    directory holding ``metrics.jsonl`` (a training run) or ``model/metrics.jsonl`` (a demo)."""
    runs = []
    for d in run_dirs:
        log = d / "metrics.jsonl" if (d / "metrics.jsonl").is_file() else d / "model" / "metrics.jsonl"
        records = read_metrics_log(log)
        if not records:
            raise ValueError(
                f"{d}: no metrics.jsonl with logged steps (give a demo or training run directory)"
            )
        runs.append(run_series(records, bin_steps))
    curves: dict[str, Any] = {}
    for name in SERIES:
        common = sorted(set.intersection(*(set(r[name]) for r in runs))) if runs else []
        curves[name] = {
            "step": common,
            "median": [statistics.median(r[name][s] for r in runs) for s in common],
            "min": [min(r[name][s] for r in runs) for s in common],
            "max": [max(r[name][s] for r in runs) for s in common],
        }
    return {"runs": len(runs), "bin_steps": bin_steps, "curves": curves}


def compare(reference: dict[str, Any], run_dir: Path, slack: float = 0.1) -> list[str]:
    """Where a run's losses lie against the reference range, one line per curve: the share of common
    steps inside [min, max] widened by ``slack`` of the range's median, and the last step's value."""
    mine = aggregate([run_dir], reference["bin_steps"])["curves"]
    lines = []
    for name, ref in reference["curves"].items():
        at = dict(zip(mine[name]["step"], mine[name]["median"]))
        steps = [s for s in ref["step"] if s in at]
        if not steps:
            lines.append(f"{name}: no step in common with the reference")
            continue
        inside = 0
        for s in steps:
            i = ref["step"].index(s)
            pad = slack * ref["median"][i]
            inside += ref["min"][i] - pad <= at[s] <= ref["max"][i] + pad
        last, i = steps[-1], ref["step"].index(steps[-1])
        lines.append(f"{name}: {inside}/{len(steps)} steps within the reference range; at step {last} "
                     f"{at[last]:.4f} against {ref['median'][i]:.4f} [{ref['min'][i]:.4f}-{ref['max'][i]:.4f}]")  # fmt: skip
    return lines
