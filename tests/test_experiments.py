"""The experiment runner: verdicts from seed ranges, the parity FLOP ratio, plans sized to the budget,
and (slow) a whole experiment at a tiny budget writing results.json and its page, then resumed."""

import json

import pytest

from transfusion import cli
from transfusion.experiments import EXPERIMENTS, Finding
from transfusion.experiments.definitions import BESIDE_FD
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
    assert judge(f, {"a": {"1": cell(1)}, "b": {"1": cell(1)}})["verdict"] == "not measured"
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


def test_the_page_reads_like_the_papers_figure(tmp_path):
    """Verdict table first with numbers for people, the parity ratio as a table and a plot, each
    sample under its prompt, the plan as a table."""
    from PIL import Image

    from transfusion.experiments.page import human, write_results

    assert [human(x) for x in (1690.4, 169.4, 16.94, 1.694, 0.1694, 0.01694, 0)] == [
        "1,690", "169", "16.9", "1.69", "0.169", "0.0169", "0"]  # fmt: skip
    exp, out = EXPERIMENTS["vs-chameleon"], tmp_path / "e"
    fd = {("transfusion", 1): (1450, 1490), ("transfusion", 2): (1200, 1260), ("chameleon", 1): (1690, 1750),
          ("chameleon", 2): (1460, 1480)}  # fmt: skip
    plan = {"points": [], "shared_seconds": 90.0, "speeds": {"transfusion": {"gflops": 41.5}}}
    for (arm, budget), values in fd.items():
        for seed, v in enumerate(values):
            d = out / "points" / f"{arm}-b{budget}-s{seed}"
            d.mkdir(parents=True)
            metrics = {"fd_project_classifier": v, "geneval_overall": 0.1 * budget, "by_cfg": {}}
            point = {"id": d.name, "arm": arm, "budget": float(budget), "seed": seed, "flops": budget * 1e13,
                     "metrics": metrics}  # fmt: skip
            (d / "point.json").write_text(json.dumps(point))
            grid = Image.new("RGB", (128, 64), "black")
            grid.paste(Image.new("RGB", (64, 64), "red"), (0, 0))
            grid.save(d / "samples.png")
            (d / "samples.json").write_text(json.dumps(["a red square", "two blue circles"]))
            plan["points"].append({"id": d.name, "steps": 12345, "gflop": budget * 1e4,
                                   "train_seconds_est": 600, "eval_seconds_est": 60})  # fmt: skip
    results = write_results(exp, out, plan)
    page = (out / "experiment.html").read_text()
    assert page.index("<h2>Verdicts</h2><table>") < page.index("<h2>Plots</h2>")
    # FD: Transfusion 1,470 [1,450-1,490] against 1,720 at x1; reproduced (ranges apart at both budgets)
    assert "1,470 [1,450-1,490]<br>vs 1,720 [1,690-1,750]" in page and "1.69e+03" not in page
    fd_verdict = next(v for v in results["verdicts"] if v["finding"]["metric"] == "fd_project_classifier")
    assert fd_verdict["verdict"] == "reproduced" and "<b>reproduced</b>" in page
    # parity: Transfusion's FD at x1 (1,470) is Chameleon's at x2: ratio 1e13 / 2e13
    assert results["parity_flop_ratio"]["fd_project_classifier"]["1"]["ratio"] == pytest.approx(0.5, abs=0.02)
    assert "<th>Chameleon-style TFLOP needed</th>" in page and '"ratio"' not in page
    assert page.count("<figcaption>a red square</figcaption>") == 2  # one per arm, first seed
    assert "image-rendering:pixelated" in page and "<td>12,345</td>" in page


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
            beside = {m + f.metric.removeprefix(m) for m, _ in BESIDE_FD}  # read beside an FD finding
            assert f.better in names and f.worse in names and (f.metric in exp.metrics or f.metric in beside)
        fd = [f for f in exp.findings if f.metric.startswith("fd_")]
        for f in fd:  # every FD finding has precision, recall and well-formedness beside it, same arms
            suffix = f.metric.removeprefix("fd_project_classifier")
            for m, up in BESIDE_FD:
                assert any(g.metric == m + suffix and (g.better, g.worse, g.higher_is_better) == (f.better, f.worse, up)
                           for g in exp.findings)  # fmt: skip
    mot = EXPERIMENTS["mot"]
    assert {a.name for a in mot.arms} == {"shared", "mot"} and len(mot.budgets) >= 2 and mot.text_corpus
    assert {"fd_project_classifier", "geneval_overall", "caption_cider_d", "caption_accuracy",
            "fortune_bits_per_byte"} <= {f.metric for f in mot.findings}  # fmt: skip
    assert EXPERIMENTS["vs-chameleon"].interval_reading == 700


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


def test_the_interval_reading_draws_again_with_guidance_only_below_max_t(monkeypatch, tmp_path):
    """Diffusion arms: images drawn again with guidance_max_t set, read as <metric>_interval; VQ-code
    arms have no timesteps, so their first reading is copied."""
    from types import SimpleNamespace

    from transfusion.evaluation import shapes
    from transfusion.experiments import runner

    seen = []

    def composition(dec, vae, n, gen, size, seed):
        seen.append((gen.guidance_max_t, gen.cfg_scale, seed))
        return {"overall": 0.5, "blank_rate": 0.1, "well_formed": 0.9}, [], ["pairs"]

    monkeypatch.setattr(shapes, "composition", composition)
    monkeypatch.setattr(
        shapes,
        "frechet",
        lambda pairs, *a: {"fd_project_classifier": 7.0, "precision_project_classifier": 0.2},
    )
    settings = runner.Settings(1, 1, [1.0], 2, 4, [], 5)

    class Dec:
        def __init__(self, kind):
            self.model = SimpleNamespace(cfg=SimpleNamespace(image_tokens=kind))

        def settings(self, gen):
            return gen

    vae = SimpleNamespace(config=SimpleNamespace(image_size=32))
    d = tmp_path / "points" / "p"
    got = runner.interval_reading(700, Dec("continuous"), vae, 5.0, d, settings, {})
    assert seen == [(700, 5.0, 100)]  # the main evaluation's prompts, its guidance weight
    assert got == {"geneval_overall_interval": 0.5, "geneval_blank_rate_interval": 0.1,
                   "geneval_well_formed_interval": 0.9, "fd_project_classifier_interval": 7.0,
                   "precision_project_classifier_interval": 0.2}  # fmt: skip
    first = {"geneval_overall": 0.3, "fd_project_classifier": 9.0, "caption_accuracy": 1.0}
    got = runner.interval_reading(700, Dec("discrete"), vae, 5.0, d, settings, first)
    assert got == {"geneval_overall_interval": 0.3, "fd_project_classifier_interval": 9.0} and len(seen) == 1
