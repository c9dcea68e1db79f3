"""Training: loss goes down, exact resume, kill -9 recovery, atomic checkpoints, NaN skipping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transfusion import cli
from transfusion import losses as losses_mod
from transfusion import train as T
from transfusion.checkpoint import load_model, resolve_checkpoint
from transfusion.config import Config, TrainConfig, VAEConfig, tiny


def small_cfg(steps=8, **train):
    model = tiny()
    vae = VAEConfig(image_size=16, base_channels=8)
    t = {"steps": steps, "batch_size": 2, "seq_len": 64, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
         "ckpt_every": 4, "keep_last": 2, **train}  # fmt: skip
    cfg = Config(model=model, vae=vae, train=TrainConfig(**t))
    cfg.data.image_size = 16
    return cfg


def weights(run: Path) -> dict:
    return load_file(resolve_checkpoint(run) / "model.safetensors")


def curve(run: Path) -> list:
    return [json.loads(line)["text_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule():
    tc = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert T.lr_at(0, tc) == pytest.approx(1e-4) and T.lr_at(9, tc) == pytest.approx(1e-3)
    assert T.lr_at(10, tc) == pytest.approx(1e-3) and T.lr_at(100, tc) == pytest.approx(1e-5)
    assert 1e-5 < T.lr_at(55, tc) < 1e-3


def test_loss_goes_down(tmp_path):
    cfg = small_cfg(steps=60, lr=3e-3, ckpt_every=60)
    T.train(cfg, tmp_path / "run", vae="random", progress=False)
    c = curve(tmp_path / "run")
    assert sum(c[-5:]) / 5 < 0.7 * sum(c[:5]) / 5


def test_resume_is_bit_identical(tmp_path):
    cfg = small_cfg(steps=8, ema_decay=0.9)
    T.train(cfg, tmp_path / "straight", vae="random", progress=False)
    T.train(cfg, tmp_path / "split", vae="random", progress=False, stop_after=4)
    assert (tmp_path / "split" / "latest").read_text().strip().endswith("step_0000004")
    T.train(cfg, tmp_path / "split", vae="random", progress=False, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert curve(tmp_path / "straight") == curve(tmp_path / "split")
    ema_a = load_file(resolve_checkpoint(tmp_path / "straight") / "ema.safetensors")
    ema_b = load_file(resolve_checkpoint(tmp_path / "split") / "ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # keep_last=2: only the two newest checkpoints remain
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == [
        "step_0000004",
        "step_0000008",
    ]
    # the checkpoint loads for inference without the trainer
    loaded = load_model(tmp_path / "split")
    assert loaded.meta["step"] == 8


def test_existing_run_needs_resume(tmp_path):
    cfg = small_cfg(steps=2, ckpt_every=2)
    T.train(cfg, tmp_path / "r", vae="random", progress=False)
    with pytest.raises(ValueError, match="--resume"):
        T.train(cfg, tmp_path / "r", vae="random", progress=False)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg(steps=8, ckpt_every=4)
    T.train(cfg, tmp_path / "r", vae="random", progress=False, stop_after=4)
    before = weights(tmp_path / "r")

    def broken(path, tensors):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(T.ckpt, "save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        T.train(cfg, tmp_path / "r", vae="random", progress=False, resume=True)
    assert (tmp_path / "r" / "latest").read_text().strip() == "checkpoints/step_0000004"
    after = weights(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    T.train(cfg, tmp_path / "r", vae="random", progress=False, resume=True)  # and the run goes on
    assert json.loads((resolve_checkpoint(tmp_path / "r") / "meta.json").read_text())["step"] == 8


def test_nan_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    real = losses_mod.text_loss
    calls = {"n": 0}

    def flaky(logits, targets):
        calls["n"] += 1
        out = real(logits, targets)
        return out * float("nan") if calls["n"] in (3, 4) else out

    monkeypatch.setattr(losses_mod, "text_loss", flaky)
    cfg = small_cfg(steps=6, ckpt_every=100)
    T.train(cfg, tmp_path / "r", vae="random", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["bad_steps_total"] == 2
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r").values())
    monkeypatch.setattr(losses_mod, "text_loss", lambda lg, tg: real(lg, tg) * float("nan"))
    with pytest.raises(T.TrainingStopped, match="non-finite"):
        T.train(small_cfg(steps=20, max_bad_steps=2), tmp_path / "r2", vae="random", progress=False)


def test_cli_help_and_bad_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out
    assert cli.main(["train", "--out", "x", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key" in err and len(err.strip().splitlines()) == 1


def test_sigkill_then_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "transfusion", "train", "--preset", "tiny", "--out", str(out), "--vae", "random",
           "--steps", "400", "--no-progress", "--set", "train.batch_size=2", "--set", "train.seq_len=64",
           "--set", "train.ckpt_every=5", "--set", "train.eval_every=0", "--set", "train.warmup_steps=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "latest").is_file():
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads((resolve_checkpoint(out) / "meta.json").read_text())["step"]
    assert 0 < step < 400
    cfg = Config.from_json((out / "config.json").read_text()).override(["train.steps=" + str(step + 5)])
    result = T.train(cfg, out, resume=True, progress=False)
    assert result["step"] == step + 5


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "transfusion", "train", "--preset", "tiny", "--out", str(out), "--vae", "random",
           "--steps", "100000", "--no-progress", "--set", "train.batch_size=2", "--set", "train.seq_len=64",
           "--set", "train.ckpt_every=100000", "--set", "train.eval_every=0", "--set", "train.log_every=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    step = json.loads((resolve_checkpoint(out) / "meta.json").read_text())["step"]
    assert 0 < step < 100000
