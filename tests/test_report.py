"""The report is one self-contained page that renders in headless Chromium."""

import json

import pytest
from PIL import Image

from transfusion.data.shapes import eval_prompts
from transfusion.evaluation.report import log_ticks, loss_svg, write_report


def fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"dim": 64}}))
    lines = [
        {"step": s, "text_loss": 5 / s, "image_loss": 1 / s, "val_text_loss": 6 / s, "val_image_loss": 2 / s}
        for s in range(1, 30)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    prompts = eval_prompts(1)
    details = {
        "pairs": [(p, p.image) for p in prompts],
        "composition": [
            {"prompt": p.text, "kind": p.meta["kind"], "correct": i % 2 == 0} for i, p in enumerate(prompts)
        ],
        "captions": [
            {
                "caption": "a red circle",
                "truth": "a red circle",
                "correct": True,
                "image": Image.new("RGB", (32, 32)),
            }
        ],
    }
    metrics = {"geneval_single_object": 0.5, "geneval_overall": 0.5, "geneval_blank_rate": 0.25,
               "geneval_blank_rate_single_object": 0.25, "caption_accuracy": 1.0, "eval_sampler": "ddim"}  # fmt: skip
    return run, details, metrics


def test_report_holds_curves_images_metrics(tmp_path):
    run, details, metrics = fake_run(tmp_path)
    page = write_report(
        tmp_path / "report.html", run, metrics, details, timings={"training": 12.0}
    ).read_text()
    assert (
        page.count("<svg") == 2
        and ">text loss<" in page
        and ">image loss<" in page
        and ">validation<" in page
    )
    # every generated image, the caption's, and each kind's failures beside its successes (up to 4 + 4)
    kinds = {r["kind"] for r in details["composition"]}
    shown = sum(min(4, sum(r["correct"] == ok for r in details["composition"] if r["kind"] == k))
                for k in kinds for ok in (True, False))  # fmt: skip
    assert page.count("data:image/png;base64,") == len(details["pairs"]) + 1 + shown
    assert "geneval_overall" in page and "a red circle" in page and "<script" not in page
    # the headline: per-kind scores and the share of blank images
    head = page.split("<h2>Headline</h2>")[1].split("<h2>")[0]
    assert "single object" in head and "blank images" in head and "25%" in head
    assert "failed</p>" in page and "of " in page.split("Where it fails")[1]
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from outside
    assert loss_svg([], "x", "loss").startswith("<p")
    curves = page.split("<h2>Loss curves</h2>")[1].split("<h2>")[0]
    assert curves.count("<svg") == 2 and "training step (log scale)" in curves
    assert "nats per text token (log scale)" in curves and "MSE per latent value (log scale)" in curves


def test_loss_curves_use_log_axes_with_ticks_and_a_shaded_range():
    import re

    assert log_ticks(1, 1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert log_ticks(0.7, 1.6) == pytest.approx([0.7, 0.8, 0.9, 1.0])  # under a decade: every digit
    svg = loss_svg(
        [("runs", "red", [(1, 5.0, 4.0, 6.0), (10, 2.0, 1.8, 2.4), (100, 1.0, 0.9, 1.1)])], "t", "loss"
    )
    assert svg.count("<polygon") == 1 and svg.count("<path") == 1
    # on log axes equal ratios take equal room: steps 1 -> 10 and 10 -> 100 are as wide
    x = {
        t: float(v)
        for v, t in re.findall(
            r'<text x="([\d.]+)" y="\d+" font-size="10" text-anchor="middle">(\d+)</text>', svg
        )
    }
    assert abs((x["10"] - x["1"]) - (x["100"] - x["10"])) < 0.2 and x["10"] - x["1"] > 50
    lone = loss_svg([("run", "red", [(1, 5.0, 5.0, 5.0), (10, 2.0, 2.0, 2.0)])], "t", "loss")
    assert "<polygon" not in lone  # one run: no range to shade
