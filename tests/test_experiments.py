"""The experiment runner: verdicts from seed ranges, the parity FLOP ratio, plans sized to the budget,
and (slow) a whole experiment at a tiny budget writing results.json and its page, then resumed."""

import json
from pathlib import Path

import pytest

from transfusion import cli
from transfusion.experiments import EXPERIMENTS, Finding
from transfusion.experiments.definitions import BESIDE_FD, DENOISING, FASHION_METRICS, for_dataset
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
            beside = {m + f.metric.removeprefix(m) for m, _ in BESIDE_FD} | set(
                DENOISING
            )  # beside an FD finding
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


def test_the_denoising_loss_is_read_beside_every_fd_finding_between_diffusion_arms():
    attention = EXPERIMENTS["attention"]
    got = {(f.metric, f.better, f.worse, f.higher_is_better) for f in attention.findings}
    assert {("image_val_loss", "bidirectional", "causal", False),
            ("image_val_loss_early", "bidirectional", "causal", False)} <= got  # fmt: skip
    assert "image_val_loss" in attention.metrics
    chameleon = EXPERIMENTS["vs-chameleon"]  # VQ codes have no denoising loss: no finding on it
    assert not any(f.metric in DENOISING for f in chameleon.findings)
    patcher = {(f.metric, f.better, f.worse) for f in EXPERIMENTS["patcher"].findings}
    assert ("image_val_loss_early", "unet-causal", "linear-causal") in patcher


def test_on_fashion_mnist_every_finding_reads_the_judge():
    """The same arms and budgets; FD, precision and recall in the judge's features, composition as
    its class accuracy, CIDEr as caption accuracy (kept once); nothing of the scenes' own left."""
    for name, shapes in EXPERIMENTS.items():
        exp = for_dataset(shapes, "fashion_mnist")
        assert exp.arms == shapes.arms and exp.budgets == shapes.budgets and exp.dataset == "fashion_mnist"
        assert exp.interval_reading is None and exp.title.endswith("on Fashion-MNIST")
        for f in exp.findings:
            assert f.metric in set(FASHION_METRICS.values()), (name, f.metric)
        keys = [(f.metric, f.better, f.worse) for f in exp.findings]
        assert len(keys) == len(set(keys))
        assert all(m in set(FASHION_METRICS.values()) for m in exp.metrics)
        assert all(
            "geneval" not in m and "project_classifier" not in m and "cider" not in m for m in exp.metrics
        )
    chameleon = for_dataset(EXPERIMENTS["vs-chameleon"], "fashion_mnist")
    found = {(f.metric, f.better) for f in chameleon.findings}
    assert {("fd_judge", "transfusion"), ("class_accuracy", "transfusion"), ("caption_accuracy", "transfusion"),
            ("fortune_bits_per_byte", "transfusion"), ("precision_judge", "transfusion")} <= found  # fmt: skip
    attention = for_dataset(EXPERIMENTS["attention"], "fashion_mnist")
    assert [f.metric for f in attention.findings].count("caption_accuracy") == 1
    assert for_dataset(EXPERIMENTS["attention"], "shapes") is EXPERIMENTS["attention"]
    with pytest.raises(ValueError, match="fashion_mnist"):
        for_dataset(EXPERIMENTS["attention"], "mnist")


def test_the_page_plots_the_denoising_loss_by_timestep_and_patch(tmp_path):
    from transfusion.experiments.page import write_results

    exp, out = EXPERIMENTS["attention"], tmp_path / "e"
    for arm, shift in (("bidirectional", 0.0), ("causal", 0.1)):
        for seed in range(2):
            for budget in (1.0, 2.0):
                d = out / "points" / f"{arm}-b{budget:g}-s{seed}"
                d.mkdir(parents=True)
                by_patch = [0.3 + shift * (1 - i / 15) + 0.01 * seed + 0.1 / budget for i in range(16)]
                metrics = {"fd_project_classifier": 100.0, "loss_t_mids": [50, 150], "loss_by_t": [0.5 + shift, 0.2],
                           "loss_by_patch": by_patch, "image_val_loss": sum(by_patch) / 16,
                           "image_val_loss_early": sum(by_patch[:4]) / 4, "by_cfg": {}}  # fmt: skip
                (d / "point.json").write_text(json.dumps({"id": d.name, "arm": arm, "budget": budget, "seed": seed,
                                                          "flops": budget * 1e12, "metrics": metrics}))  # fmt: skip
    results = write_results(exp, out, {"points": [], "shared_seconds": 1.0, "speeds": {}})
    prof = results["denoising"]
    assert prof["causal"]["budget"] == 2.0 and prof["causal"]["t"] == [50, 150]
    assert prof["bidirectional"]["by_patch"][0]["min"] == pytest.approx(0.35)  # seed 0 at x2
    assert prof["bidirectional"]["by_patch"][0]["max"] == pytest.approx(0.36)
    early = next(v for v in results["verdicts"] if v["finding"]["metric"] == "image_val_loss_early")
    assert early["verdict"] == "reproduced"  # bidirectional's first patches lower at both budgets
    page = (out / "experiment.html").read_text()
    assert "Denoising loss on held-out images" in page and page.count("denoising loss by") == 2


def test_resuming_on_another_dataset_is_refused(tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    settings = {"minutes": 5, "seeds": 1, "budgets": [1.0], "prompts_per_kind": 1, "captions": 1, "overrides": [],
                "sample_steps": None, "dataset": "fashion_mnist"}  # fmt: skip
    (out / "plan.json").write_text(json.dumps({"settings": settings, "points": []}))
    assert cli.main(["experiment", "attention", "--resume", "--out", str(out)]) == 2
    assert "resume it with --dataset fashion_mnist" in capsys.readouterr().err
    assert cli.main(["experiment", "edit", "--dataset", "fashion_mnist", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_a_tiny_experiment_on_fashion_mnist_reads_the_judge_and_the_denoising_loss(tmp_path, monkeypatch):
    """The attention experiment on Fashion-MNIST end to end at a tiny budget (a judge of 100 steps):
    every point has the judge's metrics, the caption accuracy and the loss profile, and the page the
    verdicts on them."""
    from transfusion.data.sources import FASHION_DIRS
    from transfusion.experiments import runner

    if not any(Path(d).is_dir() for d in FASHION_DIRS):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    monkeypatch.setattr(runner, "JUDGE_STEPS", 100)
    out = tmp_path / "e"
    args = ["experiment", "attention", "--dataset", "fashion_mnist", "--minutes", "4", "--seeds", "1", "--budgets", "1",
            "--prompts-per-kind", "2", "--captions", "4", "--sample-steps", "5", "--set", "model.dim=32",
            "--set", "model.n_layers=1", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert json.loads((out / "plan.json").read_text())["settings"]["dataset"] == "fashion_mnist"
    for p in results["points"]:
        m = p["metrics"]
        assert 0 <= m["class_accuracy"] <= 1 and m["fd_judge"] > 0 and 0 <= m["caption_accuracy"] <= 1
        assert len(m["loss_by_t"]) == 10 and len(m["loss_by_patch"]) == 16 and m["image_val_loss"] > 0
        assert "geneval_overall" not in m
    assert {v["finding"]["metric"] for v in results["verdicts"]} >= {"fd_judge", "image_val_loss_early"}
    assert set(results["denoising"]) == {"bidirectional", "causal"}
    for arm in ("bidirectional", "causal"):  # each arm's model samples with its own mask (Pipeline reads it)
        from transfusion.pipeline import Pipeline

        assert (
            Pipeline.from_pretrained(
                out / "points" / f"{arm}-b1-s0" / "model", "cpu"
            ).model.cfg.image_attention
            == arm
        )
    assert "Denoising loss on held-out images" in (out / "experiment.html").read_text()


def test_a_resumed_plan_takes_a_larger_budget_and_a_seed_without_touching_its_points(monkeypatch):
    """``--resume --budgets 1 2 4 --seeds 3`` on a plan of budgets 1 2 and 2 seeds: the new points are
    sized with the plan's own FLOP unit and measured speeds, the old ones stay as they were."""
    from transfusion.experiments import runner
    from transfusion.experiments.runner import Settings, extend_plan, make_plan

    exp = EXPERIMENTS["attention"]
    settings = Settings(30, 2, [1.0, 2.0], 10, 50, [])
    speeds = {"bidirectional": (10.0, 0.1), "causal": (12.0, 0.12)}  # GFLOP, seconds per step
    monkeypatch.setattr(runner, "measure_arm", lambda e, arm, shared, s: speeds[arm.name])
    plan = make_plan(exp, Path("unused"), settings, spent=60.0)
    grown = extend_plan(exp, plan, [4.0], 3)
    old = {r["id"]: r for r in plan["points"]}
    new = {r["id"]: r for r in grown["points"]}
    assert len(old) == 8 and len(new) == 18  # (2 budgets x 2 seeds -> 3 budgets x 3 seeds) x 2 arms
    assert all(new[k] == v for k, v in old.items())
    unit = plan["unit_gflop"]
    assert new["causal-b4-s0"]["steps"] == round(4 * unit / 12.0)
    assert new["bidirectional-b2-s2"]["steps"] == old["bidirectional-b2-s0"]["steps"]
    assert grown["settings"]["budgets"] == [1.0, 2.0, 4.0] and grown["settings"]["seeds"] == 3
    assert [r["budget"] for r in grown["points"]] == sorted(
        r["budget"] for r in grown["points"]
    )  # cheap first


def test_the_attention_diagnosis_tables_read_the_caption_gain_and_guidance():
    """benchmarks/attention_diagnosis.py: what the caption is worth (unconditional minus conditional
    loss) and the metrics by guidance weight, mean [range] over seeds per arm."""
    from helpers import load_benchmark

    diag = load_benchmark("attention_diagnosis")
    point = {"t": [50, 950], "trajectory": [{"t": 999, "x_std": 1.0, "eps_std": 1.0},
                                                                {"t": 0, "x_std": 1.5, "eps_std": 0.25}]}  # fmt: skip
    points = {}
    for arm, gain in (("bidirectional", 0.01), ("causal", 0.03)):
        for seed in range(2):
            points[f"{arm}-s{seed}"] = {**point, "arm": arm, "seed": seed, "loss_by_t": [0.1, 0.7],
                                        "uncond_by_t": [0.1 + gain / 2, 0.7 + gain * 2], "image_val_loss": 0.4,
                                        "uncond_val_loss": 0.4 + gain + 0.01 * seed,
                                        "readings": {"guidance 1, clip 4": {"class_accuracy": 0.2 + seed / 10}}}  # fmt: skip
    text = diag.tables({"experiment": "attention", "dataset": "fashion_mnist", "budget": 4.0, "steps": 250,
                        "real_latent_std": 1.0, "points": points})  # fmt: skip
    assert "causal           0.400 [0.400-0.400]  0.435 [0.430-0.440]  0.035 [0.030-0.040]" in text
    assert "bidirectional     0.0050  0.0200" in text and "causal            0.0150  0.0600" in text
    assert "guidance 1, clip 4" in text and "causal 0.250 [0.200-0.300]" in text  # over the two seeds
    assert "std of x_t at t" in text and "  causal            1.000  1.500" in text
