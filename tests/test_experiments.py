"""The experiment runner: verdicts from seed ranges, the parity FLOP ratio, plans sized to the budget,
and (slow) a whole experiment at a tiny budget writing results.json and its page, then resumed."""

import json

import pytest

from transfusion import cli
from transfusion.experiments import EXPERIMENTS, Finding
from transfusion.experiments.page import judge, parity_ratio, plot_svg, summarise
from transfusion.experiments.runner import loop_speed


def cell(flops, **metrics):
    c = {"flops": {"mean": flops, "min": flops, "max": flops, "n": 2}}
    for m, (lo, hi) in metrics.items():
        c[m] = {"mean": (lo + hi) / 2, "median": (lo + hi) / 2, "min": lo, "max": hi, "n": 2}
    return c


def test_verdicts_follow_the_seed_ranges():
    f = Finding("fd", "a", "b", higher_is_better=False, paper="x")
    disjoint = {
        "a": {"1": cell(1, fd=(1, 2)), "2": cell(2, fd=(1, 2))},
        "b": {"1": cell(1, fd=(3, 4)), "2": cell(2, fd=(3, 4))},
    }
    assert judge(f, disjoint)["verdict"] == "reproduced"
    reverse = {"a": {"1": cell(1, fd=(5, 6))}, "b": {"1": cell(1, fd=(3, 4))}}
    assert judge(f, reverse)["verdict"] == "not reproduced"
    overlap = {"a": {"1": cell(1, fd=(1, 3.5))}, "b": {"1": cell(1, fd=(3, 4))}}
    assert judge(f, overlap)["verdict"] == "inconclusive at this budget"
    # holds at the largest budget but reversed at a smaller one: not a clean reproduction
    mixed = {
        "a": {"1": cell(1, fd=(5, 6)), "2": cell(2, fd=(1, 2))},
        "b": {"1": cell(1, fd=(3, 4)), "2": cell(2, fd=(3, 4))},
    }
    assert judge(f, mixed)["verdict"] == "inconclusive at this budget"
    up = Finding("acc", "a", "b", higher_is_better=True, paper="x")
    assert (
        judge(up, {"a": {"1": cell(1, acc=(0.8, 0.9))}, "b": {"1": cell(1, acc=(0.5, 0.6))}})["verdict"]
        == "reproduced"
    )


def test_parity_flop_ratio_interpolates_the_other_curve():
    # Chameleon reaches FD 100 at 1e12 and 50 at 4e12 FLOPs; Transfusion has FD 50 at 1e12: parity ratio 1/4
    summary = {
        "chameleon": {
            "1": cell(1e12, fd_project_classifier=(100, 100)),
            "4": cell(4e12, fd_project_classifier=(50, 50)),
        },
        "transfusion": {
            "1": cell(1e12, fd_project_classifier=(50, 50)),
            "4": cell(4e12, fd_project_classifier=(10, 10)),
        },
    }
    out = parity_ratio(summary, "fd_project_classifier")
    assert out["1"]["ratio"] == pytest.approx(0.25)
    assert "ratio_at_most" in out["4"]  # FD 10: not reached by Chameleon within its budgets
    summary["transfusion"]["1"] = cell(1e12, fd_project_classifier=(75, 75))  # half-way, log-linearly: 2e12
    assert parity_ratio(summary, "fd_project_classifier")["1"]["ratio"] == pytest.approx(0.5)


def test_summary_means_and_ranges_over_seeds():
    exp = EXPERIMENTS["noise-limit"]
    pts = [{"arm": "limit-500", "budget": 1.0, "seed": s, "flops": 10, "metrics": {"caption_accuracy": v, "by_cfg": {}}}
           for s, v in ((0, 0.5), (1, 0.7))]  # fmt: skip
    s = summarise(exp, pts)["limit-500"]["1"]["caption_accuracy"]
    assert (s["mean"], s["min"], s["max"], s["n"]) == (pytest.approx(0.6), 0.5, 0.7, 2)
    assert "<svg" in plot_svg("m", "FLOPs", [("a", [(1e9, 0.6, 0.5, 0.7), (2e9, 0.7, 0.6, 0.8)])], True)


def test_loop_speed_counts_the_logged_steps_after_the_first_log():
    """The plan's speed is the training loop's own: GFLOP and seconds between the first and the last
    logged step (the first steps, with the allocator warming up, are left out)."""
    rows = [{"step": 10, "elapsed_s": 9.0, "flops_seen": 10e9, "text_loss": 1.0},
            {"step": 20, "elapsed_s": 10.0, "flops_seen": 20e9},
            {"step": 20, "val_loss": 1.0},  # a row without timing is skipped
            {"step": 40, "elapsed_s": 12.0, "flops_seen": 40e9}]  # fmt: skip
    assert loop_speed(rows) == (pytest.approx(1.0), pytest.approx(0.1))
    with pytest.raises(ValueError, match="CALIBRATION_STEPS"):
        loop_speed(rows[:1])


def test_every_experiment_names_real_arms_and_metrics():
    for exp in EXPERIMENTS.values():
        names = {a.name for a in exp.arms}
        for f in exp.findings:
            assert f.better in names and f.worse in names and f.metric in exp.metrics


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["experiment", "attention", "--minutes", "0", "--out", str(tmp_path / "e")]) == 2
    assert cli.main(["experiment", "attention", "--resume", "--out", str(tmp_path / "missing")]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_experiment_writes_results_and_its_page_then_resumes(tmp_path):
    out = tmp_path / "e"
    args = ["experiment", "noise-limit", "--minutes", "4", "--seeds", "2", "--budgets", "1", "--prompts-per-kind", "1",
            "--captions", "4", "--sample-steps", "5", "--set", "model.dim=32", "--set", "model.n_layers=1",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["points"]) == 4 and {p["arm"] for p in results["points"]} == {"limit-500", "no-limit"}
    assert all(p["flops"] > 0 and "caption_accuracy" in p["metrics"] for p in results["points"])
    # the FLOPs a point spent are those the plan gave it (speeds measured on other batches of the stream)
    assert all(abs(p["flops"] / 1e9 / p["gflop"] - 1) < 0.2 for p in results["points"])
    # one scene pool per seed, encoded once before training (points of the two seeds used to
    # re-encode one shared cache in turn)
    pools = {
        d.name: json.loads((d / "index.json").read_text())["source"]
        for d in (out / "shared").glob("latents-*")
    }
    assert sorted(pools) == ["latents-kl-s0", "latents-kl-s1"] and "seed=1" in pools["latents-kl-s1"]
    assert all(
        d.stat().st_mtime < (out / "plan.json").stat().st_mtime for d in (out / "shared").glob("latents-*/*")
    )
    assert results["summary"]["no-limit"]["1"]["caption_accuracy"]["n"] == 2
    assert [v["verdict"] for v in results["verdicts"]][0] in (
        "reproduced",
        "not reproduced",
        "inconclusive at this budget",
    )
    page = (out / "experiment.html").read_text()
    assert "Verdicts" in page and ("<svg" in page or "data:image/png" in page)
    stamp = (out / "points" / "limit-500-b1-s0" / "point.json").stat().st_mtime
    assert (
        cli.main(["experiment", "noise-limit", "--resume", "--out", str(out)]) == 0
    )  # nothing trained again
    assert (out / "points" / "limit-500-b1-s0" / "point.json").stat().st_mtime == stamp
