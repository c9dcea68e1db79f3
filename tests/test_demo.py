"""End to end: the demo with a small budget writes a report and metrics that hold numbers."""

import json

import pytest

from transfusion import cli


@pytest.mark.slow
def test_demo_small_budget(tmp_path):
    out = tmp_path / "demo"
    assert (
        cli.main(["demo", "--out", str(out), "--minutes", "1", "--prompts-per-kind", "2", "--captions", "6"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "geneval_overall",
        "caption_accuracy",
        "caption_cider_d",
        "text_bits_per_byte",
        "fd_project_classifier",
    ):
        assert isinstance(metrics[key], float), key
    assert 0 <= metrics["geneval_overall"] <= 1 and metrics["text_bits_per_byte"] > 0
    page = (out / "report.html").read_text()
    assert "<svg" in page and "geneval_overall" in page and "data:image/png;base64," in page


def test_demo_help_and_bad_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "--minutes" in capsys.readouterr().out
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--minutes", "0"]) == 2
