import json
import re

import pytest

from transfusion.config import Config, ModelConfig, TrainConfig, load_config, preset


def test_json_roundtrip_keeps_every_field():
    cfg = Config(model=preset("small", patch_size=4), train=TrainConfig(lr=1e-3, steps=7))
    again = Config.from_json(cfg.to_json())
    assert again == cfg
    assert again.model.patches_per_image == 4


def test_overrides_parse_values_and_reject_unknown_keys():
    cfg = Config().override(
        ["train.lr=0.001", "model.patcher=unet", "train.device=cpu", "data.cond_dropout=0.2"]
    )
    assert cfg.train.lr == 0.001 and cfg.model.patcher == "unet" and cfg.train.device == "cpu"
    with pytest.raises(ValueError, match="unknown config key"):
        Config().override(["train.learning_rate=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        Config().override(["lr"])
    with pytest.raises(ValueError, match="min_lr"):
        Config().override(["train.lr=1e-6"])


def test_load_json_and_toml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": {"dim": 128, "n_heads": 2}, "train": {"steps": 5}}))
    cfg = load_config(tmp_path / "c.json")
    assert cfg.model.dim == 128 and cfg.train.steps == 5 and cfg.data.source == "shapes"
    (tmp_path / "c.toml").write_text("[model]\ndim = 96\nn_heads = 3\n[diffusion]\nschedule = 'linear'\n")
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.model.dim == 96 and cfg.diffusion.schedule == "linear"
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"width": 1}}))
    with pytest.raises(ValueError, match="unknown key"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.json")


def test_llama_ffn_rule():
    assert ModelConfig(dim=4096, n_heads=32, multiple_of=256).ffn_dim == 11008
    assert ModelConfig(dim=768, n_heads=12, multiple_of=256).ffn_dim == 2048


def test_a_value_of_the_wrong_type_names_the_key_and_the_type(tmp_path, capsys):
    from transfusion import cli

    cases = {"model.dim=notanumber": "model.dim='notanumber': expected int",
             "train.lr=abc": "train.lr='abc': expected float",
             "train.compile=yes": "train.compile='yes': expected bool | null",
             "model.rope_2d=1": "model.rope_2d=1: expected bool",
             "train.train_layers=[1, \"a\"]": "expected list[int] | null"}  # fmt: skip
    for assignment, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            Config().override([assignment])
    cfg = Config().override(
        ["train.lr=1", "train.compile=null", "model.n_kv_heads=2", "train.train_layers=null"]
    )
    assert cfg.train.lr == 1 and cfg.model.kv_heads == 2  # an int fits a float field
    for command in (["train", "--preset", "tiny", "--vae", "random", "--out", str(tmp_path / "r")],
                    ["experiment", "noise-limit", "--out", str(tmp_path / "e")]):  # fmt: skip
        assert cli.main([*command, "--set", "model.dim=notanumber"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model.dim='notanumber': expected int" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()
