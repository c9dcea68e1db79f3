"""benchmarks/demo_spread.py: finished runs are read back, not rerun, and the table is their spread."""

import json
import sys

import pytest

from helpers import load_benchmark


def test_spread_of_finished_runs(tmp_path, monkeypatch, capsys):
    spread = load_benchmark("demo_spread")
    scores = {0: (0.9, 0.0), 1: (0.5, 0.25), 2: (0.7, 0.5)}
    for seed, (overall, blank) in scores.items():
        d = tmp_path / f"seed-{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"geneval_overall": overall, "geneval_blank_rate": blank}))
        (d / "timings.json").write_text(json.dumps({"total": 60.0 * (14 + seed)}))
    monkeypatch.setattr("transfusion.demo.run_demo", lambda *a, **k: pytest.fail("a finished run was rerun"))
    monkeypatch.setattr(sys, "argv", ["demo_spread.py", "--runs", "3", "--out", str(tmp_path)])
    spread.main()
    result = json.loads((tmp_path / "spread.json").read_text())["spread"]
    assert result["geneval_overall"] == {"min": 0.5, "median": 0.7, "max": 0.9, "runs": [0.9, 0.5, 0.7]}
    assert result["minutes"]["median"] == 15.0 and result["geneval_blank_rate"]["max"] == 0.5
    table = (tmp_path / "spread.md").read_text()
    assert "| geneval_overall | 0.9 | 0.5 | 0.7 | 0.7 | 0.5 - 0.9 |" in table
    assert "| geneval_blank_rate | 0% | 25% | 50% | 25% | 0% - 50% |" in table
    assert table in capsys.readouterr().out
