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


def test_fashion_evaluation_runs_on_a_tiny_model(tmp_path):
    """Class-conditional generation and caption accuracy on Fashion-MNIST (skipped without the package)."""
    import torch

    from transfusion.config import Config, DataConfig, VAEConfig, tiny
    from transfusion.data.sources import FashionMNIST
    from transfusion.evaluation.fashion import evaluate_fashion
    from transfusion.model import Transfusion
    from transfusion.tokenizer import ByteTokenizer
    from transfusion.vae import KLVAE

    cfg = Config(
        model=tiny(),
        vae=VAEConfig(image_size=16, base_channels=8),
        data=DataConfig(source="fashion_mnist", image_size=16),
    )
    try:
        FashionMNIST(cfg.data, "test")
    except ValueError:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    torch.manual_seed(0)
    metrics, details = evaluate_fashion(Transfusion(cfg.model), ByteTokenizer(), KLVAE(cfg.vae).eval(), cfg, tmp_path,
                                        per_class=1, n_captions=4, steps=2, classifier_steps=30)  # fmt: skip
    assert 0 <= metrics["fashion_generation_accuracy"] <= 1 and 0 <= metrics["fashion_caption_accuracy"] <= 1
    assert metrics["fashion_classifier_test_accuracy"] > 0.3  # 30 steps: far above chance (0.1)
    assert len(details["composition"]) == 10 and (tmp_path / "metrics.json").is_file()
