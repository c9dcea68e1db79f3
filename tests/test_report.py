"""The report is one self-contained page that renders in headless Chromium."""

import json
import shutil
import subprocess

import pytest
from PIL import Image

from transfusion.data.shapes import eval_prompts
from transfusion.evaluation.report import svg_curve, write_report


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
    assert page.count("<svg") == 4 and "text loss (train)" in page and "image loss (validation)" in page
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
    assert svg_curve([], "x", "red").startswith("<p")


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (make system installs it)")
    run, details, metrics = fake_run(tmp_path)
    page = write_report(tmp_path / "report.html", run, metrics, details)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]  # fmt: skip
    r = subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shot.is_file(), r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "CONSOLE" not in r.stderr
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert "Metrics" in dom.stdout and dom.stdout.count("<svg") == 4
