"""Reference loss curves: per-run bins, median and range over runs, a run placed against them."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from transfusion.evaluation.curves import aggregate, compare, run_series

ROOT = Path(__file__).resolve().parent.parent


def write_run(d: Path, scale: float, last: int = 300) -> Path:
    """A run logging losses every 10 steps (decaying with the step, times ``scale``) and validation
    every 100; a demo's layout (model/metrics.jsonl)."""
    (d / "model").mkdir(parents=True)
    lines = []
    for step in range(10, last + 1, 10):
        r = {"step": step, "text_loss": scale * 100 / step, "image_loss": scale * 10 / step}
        if step % 100 == 0:
            r.update(val_text_loss=scale * 50 / step, val_image_loss=scale * 5 / step)
        lines.append(json.dumps(r))
    (d / "model" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_bins_median_and_range_over_the_steps_every_run_reached(tmp_path):
    runs = [
        write_run(tmp_path / f"r{i}", s, last)
        for i, (s, last) in enumerate([(1.0, 300), (2.0, 250), (1.5, 300)])
    ]
    one = run_series([json.loads(x) for x in (runs[0] / "model" / "metrics.jsonl").read_text().splitlines()])
    # steps 10..50 form the first bin: its mean, labelled 50
    assert one["train_text_loss"][50] == pytest.approx(
        statistics.fmean(100 / s for s in (10, 20, 30, 40, 50))
    )
    assert one["val_image_loss"] == {100: 0.05, 200: 0.025, 300: 5 / 300}
    ref = aggregate(runs)
    text = ref["curves"]["train_text_loss"]
    assert text["step"] == [50, 100, 150, 200, 250]  # run 1 stopped at 250
    i = text["step"].index(100)  # bins: run values scale x the same mean -> median is the 1.5 run
    base = statistics.fmean(100 / s for s in (60, 70, 80, 90, 100))
    assert (text["min"][i], text["median"][i], text["max"][i]) == pytest.approx((base, 1.5 * base, 2 * base))
    assert ref["curves"]["val_text_loss"]["step"] == [100, 200] and ref["runs"] == 3
    # a healthy run lies inside; one with twice the loss of the worst does not
    inside = compare(ref, write_run(tmp_path / "mine", 1.2))
    assert all(line.split(":")[1].strip().startswith(f"{n}/{n}") for line, n in zip(inside, (5, 5, 2, 2)))
    outside = compare(ref, write_run(tmp_path / "bad", 4.0))
    assert all(" 0/" in line for line in outside)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        aggregate([tmp_path / "nothing"])


def test_the_script_writes_the_json_and_the_figure(tmp_path):
    runs = [str(write_run(tmp_path / f"r{i}", 1 + i / 10)) for i in range(3)]
    script = ROOT / "benchmarks" / "demo_curves.py"
    subprocess.run([sys.executable, str(script), *runs, "--out", str(tmp_path / "docs")], check=True)
    ref = json.loads((tmp_path / "docs" / "demo_curves.json").read_text())
    assert ref["curves"]["val_image_loss"]["step"] == [100, 200, 300]
    svg = (tmp_path / "docs" / "demo_curves.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<path") == 4 and "validation" in svg
    assert svg.count("<polygon") == 4 and svg.count("(log scale)") == 4  # ranges shaded, log-log axes
    assert "nats per text token" in svg and "MSE per latent value" in svg
    out = subprocess.run([sys.executable, str(script), "--check", runs[0], "--out", str(tmp_path / "docs")],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert "train_text_loss: 6/6 steps within the reference range" in out
