"""Training: loss goes down, exact resume, kill -9 recovery, atomic checkpoints, NaN skipping."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transfusion import checkpoint as ckpt_mod
from transfusion import cli
from transfusion import losses as losses_mod
from transfusion import training as T
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

    monkeypatch.setattr(ckpt_mod, "save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        T.train(cfg, tmp_path / "r", vae="random", progress=False, resume=True)
    assert (tmp_path / "r" / "latest").read_text().strip() == "checkpoints/step_0000004"
    after = weights(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    T.train(cfg, tmp_path / "r", vae="random", progress=False, resume=True)  # and the run goes on
    assert json.loads((resolve_checkpoint(tmp_path / "r") / "meta.json").read_text())["step"] == 8


def test_nan_and_inf_steps_are_skipped_counted_then_stop(tmp_path, monkeypatch):
    real_text, real_image = losses_mod.text_loss, losses_mod.image_loss
    calls = {"text": 0, "image": 0}

    def flaky_text(logits, targets):
        calls["text"] += 1
        out = real_text(logits, targets)
        return out * float("nan") if calls["text"] == 3 else out

    def flaky_image(pred, target, conditions=None):
        calls["image"] += 1
        out = real_image(pred, target, conditions)
        return out * float("inf") if calls["image"] == 4 else out

    monkeypatch.setattr(losses_mod, "text_loss", flaky_text)
    monkeypatch.setattr(losses_mod, "image_loss", flaky_image)
    cfg = small_cfg(steps=6, ckpt_every=100)
    T.train(cfg, tmp_path / "r", vae="random", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["bad_steps_total"] for x in lines] == [0, 0, 1, 2, 2, 2]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r").values())

    # every step from the 5th on is NaN: the run stops after max_bad_steps + 1 of them in a row, with
    # the checkpoint of step 4 (saved before the trouble) intact, and the CLI says so in one line
    calls["text"] = 0

    def nan_from_5(logits, targets):
        calls["text"] += 1
        out = real_text(logits, targets)
        return out * float("nan") if calls["text"] >= 5 else out

    monkeypatch.setattr(losses_mod, "image_loss", real_image)
    monkeypatch.setattr(losses_mod, "text_loss", nan_from_5)
    with pytest.raises(T.TrainingStopped, match="non-finite"):
        T.train(
            small_cfg(steps=20, max_bad_steps=2, ckpt_every=4), tmp_path / "r2", vae="random", progress=False
        )
    assert (tmp_path / "r2" / "latest").read_text().strip() == "checkpoints/step_0000004"
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r2").values())
    assert sorted(p.name for p in (tmp_path / "r2" / "checkpoints").iterdir()) == ["step_0000004"]


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_before_exiting(tmp_path, sig):
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
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    step = json.loads((resolve_checkpoint(out) / "meta.json").read_text())["step"]
    assert 0 < step < 100000


def test_cli_resume_continues_with_the_stored_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--out", out, "--vae", "random", "--no-progress"]
    sets = ["--set", "train.batch_size=2", "--set", "train.seq_len=64", "--set", "train.eval_every=0",
            "--set", "train.ckpt_every=2", "--set", "model.n_layers=3", "--set", "train.log_every=1"]  # fmt: skip
    assert cli.main(base + ["--preset", "tiny", "--steps", "2"] + sets) == 0
    first = (tmp_path / "run" / "config.json").read_text()
    # no --preset / --set repeated: the run's config.json is used, --steps extends it
    assert cli.main(base + ["--resume", "--steps", "4"]) == 0
    stored = Config.from_json((tmp_path / "run" / "config.json").read_text())
    assert stored.model.n_layers == 3 and stored.train.steps == 4
    assert Config.from_json(first).model == stored.model
    assert load_model(tmp_path / "run").meta["step"] == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    capsys.readouterr()
    assert cli.main(base + ["--resume", "--preset", "small"]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and len(err.strip().splitlines()) == 1


def test_resume_without_a_checkpoint_starts_over_and_drops_stale_log_lines(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "text_loss": 9.0}\n{"step": 2, "te')  # a crash mid-line
    T.train(small_cfg(steps=2, ckpt_every=2), run, vae="random", progress=False, resume=True)
    assert "no checkpoint" in capsys.readouterr().err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["text_loss"] != 9.0


def test_validation_sample_grids_and_config_checks(tmp_path):
    from PIL import Image as PILImage

    cfg = small_cfg(steps=6, eval_every=3, log_every=2, sample_every=4, ckpt_every=6, eval_batches=1)
    cfg.diffusion.sample_steps = 2
    T.train(cfg, tmp_path / "r", vae="random", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 3, 4, 6]  # logging steps plus validation steps
    val = [x for x in lines if "val_text_loss" in x]
    assert [x["step"] for x in val] == [3, 6]
    assert all(math.isfinite(x["val_text_loss"]) and x["val_image_loss"] > 0 for x in val)
    with PILImage.open(tmp_path / "r" / "samples" / "step_0000004.png") as grid:
        assert grid.size[0] == 96 * len(T.SAMPLE_PROMPTS)
    for bad in ("train.log_every=0", "train.ckpt_every=0", "train.eval_every=-1", "train.eval_batches=0"):
        with pytest.raises(ValueError):
            cfg.override([bad])


def test_weight_decay_on_matrices_only():
    from transfusion.model import Transfusion

    model = Transfusion(tiny())
    opt = T.make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_is_the_mean_of_its_micro_batches(tmp_path):
    """One step of grad_accum=2 equals a hand-written step on the first batch of each of the run's two
    data streams (stream s reads items s, s + 2, ...: the layout a 2-process run has, so the run can
    resume on 1 or 2 processes)."""
    from transfusion.autoencoders import load_vae
    from transfusion.data.loader import BatchLoader
    from transfusion.diffusion import make_schedule
    from transfusion.losses import training_loss
    from transfusion.model import Transfusion
    from transfusion.tokenizer import ByteTokenizer

    cfg = small_cfg(steps=1, grad_accum=2, ckpt_every=1, grad_clip=0.5)
    T.train(cfg, tmp_path / "r", vae="random", progress=False)
    torch.manual_seed(cfg.train.seed)
    model = Transfusion(cfg.model)
    opt = T.make_optimizer(model, cfg.train)
    encode = T.image_encoder(load_vae(tmp_path / "r" / "vae"), torch.device("cpu"))
    streams = [BatchLoader(cfg, ByteTokenizer(), encode, s, 2) for s in range(2)]
    schedule = make_schedule(cfg.diffusion)
    for g in opt.param_groups:
        g["lr"] = T.lr_at(0, cfg.train)
    for loader in streams:
        (training_loss(model, next(loader), schedule, cfg.diffusion).total / 2).backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5) > 0.5  # clipping acts
    opt.step()
    got = weights(tmp_path / "r")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5)
    assert load_model(tmp_path / "r").meta["tokens_seen"] == 2 * 2 * 64


def test_unreadable_items_are_skipped_and_counted_by_reason_in_the_log(tmp_path):
    import warnings

    from PIL import Image as PILImage

    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        PILImage.new("RGB", (16, 16), (40 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    (data / "bad.png").write_bytes(b"not a picture")
    (data / "bad.txt").write_text("a broken one")
    cfg = small_cfg(steps=2, ckpt_every=2)
    cfg.data.source, cfg.data.path, cfg.data.val_fraction = "folder", str(data), 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        T.train(cfg, tmp_path / "r", vae="random", progress=False)
    assert any("bad.png" in str(w.message) for w in caught)
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data_skipped"] >= 1 and last["data_skipped_by_reason"] == {
        "unreadable": last["data_skipped"]
    }
    assert last["data_skipped_items"] == 1  # one broken file, however often it is met


def test_async_checkpoints_equal_synchronous_ones(tmp_path):
    cfg = small_cfg(steps=6, ckpt_every=2, ema_decay=0.9)
    T.train(cfg, tmp_path / "sync", vae="random", progress=False)
    cfg.train.async_checkpoint = True
    T.train(cfg, tmp_path / "async", vae="random", progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(resolve_checkpoint(tmp_path / "sync") / name)
        b = load_file(resolve_checkpoint(tmp_path / "async") / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir()) == [
        "step_0000004",
        "step_0000006",
    ]


KILLED_DURING_SAVE = """
import sys, threading, time
from pathlib import Path
from transfusion import checkpoint
from transfusion.config import load_config
from transfusion.training import train

write = checkpoint.write_single

def slow_write(tmp, weights, ema):
    write(tmp, weights, ema)
    if tmp.name == ".step_0000004.tmp":  # the second save: on disk, but never finished
        Path(sys.argv[3]).write_text("writing")
        time.sleep(600)

checkpoint.write_single = slow_write
train(load_config(sys.argv[1]), sys.argv[2], vae="random", progress=False)
"""


def test_a_run_killed_during_an_async_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    cfg = small_cfg(steps=8, ckpt_every=2, async_checkpoint=True)
    T.train(cfg, tmp_path / "straight", vae="random", progress=False)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    script, marker, out = tmp_path / "run.py", tmp_path / "marker", tmp_path / "killed"
    script.write_text(KILLED_DURING_SAVE)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cfg.json"), str(out), str(marker)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the second save never started"
    time.sleep(1.0)  # training has gone on past step 4 meanwhile
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000002"
    assert (
        out / "checkpoints" / ".step_0000004.tmp" / "model.safetensors"
    ).is_file()  # written, not committed
    T.train(cfg, out, vae="random", progress=False, resume=True)
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoints" / ".step_0000004.tmp").exists()
