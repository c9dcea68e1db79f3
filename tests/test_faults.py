"""The fault matrix of multi-process training: what real runs meet, on 2 and 4 gloo ranks, under DDP and
FSDP2. Every case ends in a finished run equal to a one-process reference, or in a one-line error;
never in a hang (every launch runs under a hard timeout).

- text-only micro-batches on one rank, on every rank, and alternating between ranks;
- a non-finite loss on one rank: the step is skipped on every rank and training goes on;
- the global gradient norm logged, equal to one process's;
- a rank killed with SIGKILL in the middle of a step, then ``--resume``;
- gradient accumulation against one big batch, and FSDP2's reduce-scatters counted
  (``tests/distributed_step.py``);
- resuming 1 -> 2 -> 4 -> 1 processes through one-process and sharded checkpoints;
- node-local run directories, and the device each rank takes.
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from transfusion import training as T
from transfusion.autoencoders import load_vae
from transfusion.checkpoint import load_model, resolve_checkpoint
from transfusion.config import Config
from transfusion.data.loader import BatchLoader
from transfusion.diffusion import make_schedule
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.tokenizer import ByteTokenizer
from transfusion.training.loop import draw_sample_grid

from distributed_run import ranks_at, text_only
from test_distributed import HERE, config, launch, ranks_output

STEPS = 6


def schedule_of_faults(world: int) -> dict:
    """Step 1: text-only on rank 0 alone; 2: on every rank; 3 and 4: alternating between ranks; 5: a
    NaN loss on the last rank; 6: plain."""
    return {
        "text_only": {
            "1": [0],
            "2": list(range(world)),
            "3": [r for r in range(world) if r % 2 == 0],
            "4": [r for r in range(world) if r % 2 == 1],
        },
        "nan": {"5": [world - 1]},
    }


def fault_config(parallel: str) -> Config:
    cfg = config(parallel)
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.keep_last, cfg.train.sample_every = STEPS, 2, 3, 4
    return cfg


def reference(cfg: Config, vae_dir: Path, world: int, faults: dict) -> tuple[dict, dict]:
    """One process reading every rank's data stream, each step's faults applied to the streams of the
    ranks they name; a step with a non-finite loss anywhere is skipped by construction (no forward, no
    update). Returns {step: (text, image, grad norm)} for the steps that updated, and the weights."""
    torch.manual_seed(cfg.train.seed)
    model = Transfusion(cfg.model)
    opt = T.make_optimizer(model, cfg.train)
    encode = T.image_encoder(load_vae(vae_dir), torch.device("cpu"))
    loaders = [BatchLoader(cfg, ByteTokenizer(), encode, r, world) for r in range(world)]
    schedule, pad, out = make_schedule(cfg.diffusion), ByteTokenizer().pad_id, {}
    for step in range(1, cfg.train.steps + 1):
        batches = [next(loader) for loader in loaders]
        if ranks_at(faults.get("nan", {}), step):
            continue
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step - 1, cfg.train)
        text = image = 0.0
        for r, b in enumerate(batches):
            b = text_only(b, pad) if r in ranks_at(faults.get("text_only", {}), step) else b
            losses = training_loss(model, b, schedule, cfg.diffusion)
            (losses.total / world).backward()
            text, image = text + losses.text.item() / world, image + losses.image.item() / world
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
        opt.step()
        opt.zero_grad()
        out[step] = (text, image, norm)
    return out, model.state_dict()


def metrics(out: Path) -> dict[int, dict]:
    return {x["step"]: x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(out, use_ema=False).model.state_dict()


def run_with_faults(tmp_path: Path, parallel: str, world: int, faults: dict, *flags: str, name: str = "run"):
    cfg = fault_config(parallel)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    out = tmp_path / name
    r = launch(world, cfg_file, out, "--faults", json.dumps(faults), *flags)
    return cfg, cfg_file, out, r


@pytest.mark.parametrize("parallel,world", [("ddp", 2), ("fsdp", 2), ("ddp", 4), ("fsdp", 4)])
def test_text_only_micro_batches_and_a_nan_on_one_rank_finish_like_one_process(
    tmp_path, parallel, world, monkeypatch
):
    """Text-only micro-batches on some ranks and a NaN loss on one: the run finishes; every step's
    losses and logged (global) gradient norm equal the one-process reference's, the NaN step is
    skipped on every rank (no update, training goes on) and the final weights equal the reference's,
    which skipped that step by construction. Before: gloo's "distributed collective mismatch" at
    the first text-only micro-batch, under DDP and FSDP2 alike. FSDP2's ranks run with PyTorch's
    collective checker on (``TORCH_DISTRIBUTED_DEBUG=DETAIL``: every collective's kind and shapes
    compared across ranks before it runs), so ranks out of step fail at once, by name (DDP's
    constructor segfaults under it on gloo in torch 2.13: DDP's own reducer checks instead)."""
    if parallel == "fsdp":
        monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    faults = schedule_of_faults(world)
    cfg, _, out, r = run_with_faults(tmp_path, parallel, world, faults)
    assert f"step 5: non-finite loss on rank {world - 1}, update skipped on every rank" in r.stderr
    got, (want, ref_weights) = metrics(out), reference(cfg, out / "vae", world, faults)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(want) == [1, 2, 3, 4, 6]
    assert math.isnan(got[5]["text_loss"]) and got[5]["bad_steps_total"] == 1
    for step, (text, image, norm) in want.items():
        g = got[step]
        assert abs(g["text_loss"] - text) < 1e-5 and abs(g["image_loss"] - image) < 1e-5, (
            step,
            g,
            text,
            image,
        )
        assert abs(g["grad_norm"] - norm) < 1e-5 * max(1.0, norm), (step, g["grad_norm"], norm)
    final = weights(out)
    assert max(float((final[k] - v).abs().max()) for k, v in ref_weights.items()) < 1e-5
    grid = out / "samples" / "step_0000004.png"
    if parallel == "fsdp":
        assert not grid.exists() and "no sample grids under FSDP2" in r.stderr
    else:  # every rank drew its share of the prompts: the grid one process draws from the same weights
        alone = tmp_path / "alone.png"
        step4 = load_model(out / "checkpoints" / "step_0000004", use_ema=False)
        draw_sample_grid(step4.model, ByteTokenizer(), step4.config, load_vae(out / "vae"), alone)
        a, b = (np.asarray(PILImage.open(p), dtype=np.int16) for p in (grid, alone))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()
    if world == 2:
        killed_mid_step_then_resumed(tmp_path, parallel, out, final)


def killed_mid_step_then_resumed(tmp_path: Path, parallel: str, straight: Path, final: dict) -> None:
    """From the straight run's checkpoint at step 2, rank 1 is killed with SIGKILL in the middle of
    step 3: the other rank ends within seconds and torchrun's report names rank 1; ``--resume`` goes
    on from the last complete checkpoint (step 2) to the straight run's weights, bit for bit."""
    run = tmp_path / "killed"
    shutil.copytree(straight, run)
    for later in ("step_0000004", "step_0000006"):
        shutil.rmtree(run / "checkpoints" / later)
    (run / "latest").write_text("checkpoints/step_0000002\n")
    faults = {**schedule_of_faults(2), "kill": [3, 1]}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "distributed_run.py"), str(tmp_path / "cfg.json"), str(run), "--resume", "--faults", json.dumps(faults)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    started = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - started
    assert r.returncode != 0 and "rank 1: killed with SIGKILL in step 3" in r.stderr, ranks_output(r.stderr)
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", r.stderr), ranks_output(
        r.stderr
    )
    assert took < 60, f"the surviving rank took {took:.0f} s to end"
    assert resolve_checkpoint(run).name == "step_0000002"  # nothing half-written became `latest`
    launch(2, tmp_path / "cfg.json", run, "--resume", "--faults", json.dumps(schedule_of_faults(2)))
    resumed = weights(run)
    assert all(torch.equal(resumed[k], v) for k, v in final.items())


@pytest.mark.parametrize("world", [2, 4])
def test_accumulation_equals_one_big_batch_with_one_reduce_scatter_per_step(tmp_path, world):
    """``tests/distributed_step.py``: 4 micro-batches a rank equal one batch of every rank's rows (to
    1e-6) under DDP and FSDP2, the step's norm is the one-process norm, FSDP2 reduce-scatters once per
    group per step (before: once per micro-batch, 4x), and bf16 under FSDP2 computes like DDP with
    fp32 RoPE tables in the blocks."""
    out = tmp_path / "step.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(HERE / "distributed_step.py"), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, ranks_output(r.stderr)
    report = json.loads(out.read_text())
    assert report["fsdp"]["reduce_scatters"] == report["fsdp_groups"] == 3
    assert report["bf16"]["gap"] < 1e-3 and report["bf16"]["rope_dtypes"] == ["torch.float32"]


def test_resume_through_one_two_four_and_one_processes(tmp_path, capsys):
    """A run of 4 data streams resumed 1 -> 2 -> 4 -> 1 processes, under DDP and FSDP2, through a
    one-process checkpoint (1 -> 2: before, ``KeyError: 'state.0.step'`` on every FSDP2 rank) and
    sharded ones (the 2-process save written in the background): after each load every rank's
    weights, EMA and Adam moments equal the saved ones exactly (``--check-restore``), and every
    step's losses equal the uninterrupted one-process run's to 1e-5. Then the one-line errors: three
    processes for four streams, another model's configuration, a missing shard file."""
    cfg = config("ddp")
    cfg.train.steps, cfg.train.grad_accum, cfg.train.ckpt_every, cfg.train.log_every = 8, 4, 2, 1
    files = {}
    for parallel, background in (("ddp", False), ("fsdp", False), ("fsdp", True)):
        cfg.train.parallel, cfg.train.async_checkpoint = parallel, background
        files[parallel, background] = tmp_path / f"{parallel}{'-async' if background else ''}.json"
        files[parallel, background].write_text(cfg.to_json())
    launch(1, files["ddp", False], tmp_path / "straight")
    launch(1, files["ddp", False], tmp_path / "first", "--stop-after", "2")  # a one-process checkpoint
    want = metrics(tmp_path / "straight")
    for parallel in ("ddp", "fsdp"):
        run = tmp_path / parallel
        shutil.copytree(tmp_path / "first", run)
        for procs, stop, background in ((2, 4, True), (4, 6, False), (1, None, False)):
            cfg_file = files[parallel, background and parallel == "fsdp"]
            r = launch(
                procs,
                cfg_file,
                run,
                "--resume",
                "--check-restore",
                *(["--stop-after", str(stop)] if stop else []),
            )
            assert "restored exactly" in r.stderr and f"on {procs} process(es)" in r.stderr, ranks_output(
                r.stderr
            )
        got = metrics(run)
        assert sorted(got) == list(range(1, 9))
        worst = max(abs(got[s][k] - want[s][k]) for s in want for k in ("text_loss", "image_loss"))
        assert worst < 1e-5, (parallel, worst)
    saved = tmp_path / "fsdp"
    before = sorted(p.name for p in saved.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                        "-m", "transfusion", "train", "--out", str(saved), "--resume", "--no-progress"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "divides 4 (1, 2, 4), not 3" in r.stderr
    assert sorted(p.name for p in saved.rglob("*")) == before
    from transfusion import cli

    (tmp_path / "fsdp" / "latest").write_text("checkpoints/step_0000006\n")  # the 4-process, sharded one
    capsys.readouterr()
    assert cli.main(["train", "--out", str(saved), "--resume", "--set", "model.dim=128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another model: model.dim=64 (now 128)" in err
    next((saved / "checkpoints" / "step_0000006" / "shards").iterdir()).unlink()
    assert cli.main(["train", "--out", str(saved), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is incomplete: its shard file shard-" in err
    with pytest.raises(ValueError, match="is incomplete: its shard file shard-"):
        load_model(saved)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_local_run_directories_are_a_one_line_error_in_seconds(tmp_path):
    """Two "nodes" (two torchrun launchers, one rank each) given separate --out roots, as node-local
    disks would be: both stop within seconds with one line naming the directory, and leave nothing.
    Before: the run went on, and rank 0 marked checkpoints complete that lacked the other node's shards
    (or the latent cache build waited 24 hours for rank 0's files)."""
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(fault_config("fsdp").to_json())
    port, procs = free_port(), []
    started = time.time()
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "transfusion", "train", "--config", str(cfg_file),
               "--out", str(tmp_path / f"node{node}" / "run"), "--vae", "random", "--no-progress"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        )
    errs = [p.communicate(timeout=120)[1] for p in procs]
    took = time.time() - started
    for node, (p, err) in enumerate(zip(procs, errs)):
        lines = [x for x in err.splitlines() if "is not one shared directory" in x]
        assert p.returncode != 0 and len(lines) == 1, err[-3000:]
        assert (
            f"the run directory (--out) {tmp_path / f'node{node}' / 'run'} is not one shared directory"
            in lines[0]
        )
        assert not (tmp_path / f"node{node}").exists()  # nothing left: not even the parent it made
    assert took < 60, f"{took:.0f} s"


def test_the_device_each_rank_takes(monkeypatch):
    """Local rank k takes cuda:k when the machine shows every local rank a GPU; cuda:0 when each rank is
    shown one GPU of its own (SLURM --gpus-per-task=1, one-GPU pods: before, every rank but 0 was
    refused); exactly cuda:K when asked (before, silently ignored); two ranks on one GPU are a one-line
    error naming them; too few GPUs for the local ranks, as before, say what to do."""
    from transfusion import distributed as D

    pick = D.pick_device
    assert pick("auto", 1, 2, 2) == torch.device("cuda:1") and pick("cuda", 3, 4, 8) == torch.device("cuda:3")
    assert pick("auto", 1, 2, 1) == torch.device("cuda:0") and pick("auto", 5, 8, 1) == torch.device("cuda:0")
    assert pick("cuda:1", 0, 2, 2) == torch.device("cuda:1") and pick("cuda:0", 1, 2, 1) == torch.device(
        "cuda:0"
    )
    assert pick("auto", 0, 4, 0) == torch.device("cpu") and pick("cpu", 1, 2, 8) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"nproc_per_node=2.*train\.device=cpu"):
        pick("auto", 2, 4, 2)
    with pytest.raises(ValueError, match=r"sees 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        pick("cuda:2", 0, 1, 2)
    with pytest.raises(ValueError, match="sees no GPU"):
        pick("cuda", 0, 1, 0)
    D.check_distinct_gpus([("a", "GPU-0"), ("a", "GPU-1"), ("b", "GPU-0")])
    with pytest.raises(ValueError, match="ranks 0 and 2 on host a were given the same GPU"):
        D.check_distinct_gpus([("a", "GPU-0"), ("a", "GPU-1"), ("a", "GPU-0")])
    # D.init in one process with CUDA faked (nothing touches a device): a one-GPU-per-rank launch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(D, "use_tf32", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert D.init("auto").device == torch.device("cuda:0")
