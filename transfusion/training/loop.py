"""Train a Transfusion model: one process on a CPU or GPU, or many under torchrun (DDP or FSDP2).

``train(config, out_dir, ...)`` is a plain loop, read top to bottom: build the run, restore it when
resuming, then ``train_step`` after ``train_step`` (``training.step``) with logging, validation,
sample grids and checkpoints on their own schedules. bf16 autocast on CUDA, fp32 on CPU. A run
directory holds::

    config.json             the configuration it ran with
    metrics.jsonl           one JSON object per logging step (losses, lr, tokens/s, cumulative FLOPs)
    checkpoints/step_N/     model.safetensors, ema.safetensors, meta.json, state.pt, loader.json
    latest                  the name of the newest complete checkpoint
    samples/step_N.png      sample grids with their prompts (when sample_every > 0)
    vae/                    the image autoencoder the latents came from

Resume (``--resume``) restores weights, optimizer, schedule, EMA, the data position and counters; with
deterministic settings on the CPU the resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transfusion import checkpoint as ckpt
from transfusion import distributed as D
from transfusion.config import Config
from transfusion.data.loader import BatchLoader
from transfusion.diffusion import make_schedule
from transfusion.flops import batch_train_flops
from transfusion.io import atomic_write_text, output_directory
from transfusion.losses import training_loss
from transfusion.training.checkpointer import Checkpointer
from transfusion.training.parallelize import Parallel, compiled_graphs, parallelize
from transfusion.training.setup import (
    build_model,
    check_consistency,
    load_or_make_vae,
    make_loaders,
    read_start,
    resolve_text_side,
)
from transfusion.training.step import BadSteps, StepResult, lr_at, make_optimizer, train_step

SAMPLE_PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle to the left of a yellow circle",
    "a cyan square",
]


@dataclass
class Run:
    """The pieces of one training run, built once by ``start_run``."""

    cfg: Config
    out: Path
    info: D.DistInfo
    vae: Any
    parallel: Parallel  # the model, what the step runs (DDP-wrapped, FSDP2-sharded or itself), dtype
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    loaders: list[BatchLoader]  # this rank's data streams: one micro-batch each per optimizer step
    val_loader: BatchLoader | None
    ema: dict[str, torch.Tensor] | None
    checkpointer: Checkpointer
    step: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {k: 0 for k in ckpt.COUNTERS})


def train(
    cfg: Config,
    out_dir: str | Path,
    vae: str | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Train to ``cfg.train.steps``; ``stop_after`` ends the process early (as an interruption would),
    ``max_seconds`` ends it (with a checkpoint) once the wall-clock budget is spent."""
    run = start_run(resolve_text_side(cfg), out_dir, vae, resume)
    tc, schedule = run.cfg.train, make_schedule(run.cfg.diffusion)
    bad = BadSteps(tc.max_bad_steps, run.counters["bad_steps_total"])
    log = MetricsLog(run)
    started, interrupted, last_saved = time.time(), False, run.step if run.step else -1
    if tc.sample_every and not can_sample(run):
        D.print0("note: no sample grids under FSDP2 (each rank holds a shard of the weights); draw samples "
                 "from a checkpoint with `transfusion generate --checkpoint RUN`")  # fmt: skip
    bar = tqdm(total=tc.steps, initial=run.step, desc="train", dynamic_ncols=True,
               disable=not (progress and run.info.is_main))  # fmt: skip
    with _Signals() as signals:
        while run.step < tc.steps:
            batches = [next(loader).to(run.info.device) for loader in run.loaders]
            result = train_step(run.parallel.step_model, run.optimizer, batches, schedule, run.cfg.diffusion,
                                lr=lr_at(run.step, tc), grad_clip=tc.grad_clip, autocast=run.parallel.autocast())  # fmt: skip
            bad.record(result.finite, run.step + 1, str(run.out), result.bad_ranks)
            if result.finite and run.ema is not None:
                update_ema(run.ema, run.parallel.model, tc.ema_decay)
            run.step += 1
            run.counters["bad_steps_total"] = bad.total
            run.counters["tokens_seen"] += result.tokens * run.info.world_size
            run.counters["flops_seen"] += int(sum(batch_train_flops(run.cfg.model, b) for b in batches)
                                              * run.info.world_size)  # fmt: skip
            bar.update(1)
            run.checkpointer.poll()  # a background save that has finished writing becomes `latest`
            log.after_step(run, result, schedule, bar)
            if tc.sample_every and run.step % tc.sample_every == 0 and can_sample(run):
                save_sample_grid(run, run.out / "samples" / f"step_{run.step:07d}.png")
            # every rank must take the same decision: a signal or a clock seen by one rank stops all
            stop, out_of_time = D.any_across(
                signals.stop, max_seconds is not None and time.time() - started > max_seconds
            )
            if run.step % tc.ckpt_every == 0 or run.step == tc.steps or stop:
                save(run)
                last_saved = run.step
            if stop or out_of_time or (stop_after is not None and run.step >= stop_after):
                if out_of_time:
                    D.print0(f"time budget of {max_seconds:.0f} s spent at step {run.step}")
                interrupted = stop
                break
    bar.close()
    log.close()
    if last_saved != run.step:
        save(run)
    run.checkpointer.wait()
    if run.cfg.train.lora_rank:
        write_adapter(run)
    D.cleanup()
    return {"step": run.step, "out": str(run.out), "interrupted": interrupted, **run.counters}


def start_run(cfg: Config, out_dir: str | Path, vae: str | None, resume: bool) -> Run:
    """Check the run directory (and, when resuming, the checkpoint: before anything is written), join
    the process group, build model, optimizer, EMA and data, and restore the latest checkpoint."""
    tc = cfg.train
    out = output_directory(out_dir)
    latest = ckpt.resolve_checkpoint(out) if resume and (out / ckpt.LATEST).is_file() else None
    if not resume and (out / ckpt.LATEST).is_file():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    streams = check_resumable(latest, cfg, world) if latest is not None else world * tc.grad_accum
    tc.grad_accum = streams // world  # a run resumed on fewer processes accumulates more micro-batches
    info = D.init(tc.device, tc.dist_timeout)
    D.check_shared_directory(out, "the run directory (--out)")  # node-local disks: an error in seconds
    if resume and latest is None:
        D.print0(f"note: {out} holds no checkpoint yet; starting from step 0")
    start = read_start(tc.init_checkpoint) if tc.init_checkpoint else None  # fine-tuning
    # the VAE first: the run's config records the autoencoder it actually trains with
    vae_model = load_or_make_vae(vae, cfg, out, info.is_main, resume, start.vae_dir if start else None)
    cfg.vae = dataclasses.replace(vae_model.config, path=None)
    check_consistency(cfg)
    torch.manual_seed(tc.seed)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        atomic_write_text(out / "config.json", cfg.to_json())

    model, tokenizer, freeze = build_model(cfg, start)
    saved = trained_keys(model) if tc.lora_rank else None  # a LoRA run writes its adapters, never the base
    parallel = parallelize(model.to(info.device).train(), cfg, info)
    optimizer = make_optimizer(parallel.model, tc)
    if freeze is not None:
        freeze.attach(optimizer)  # frozen rows out of weight decay, before any optimizer state is loaded
    # under FSDP2 the state dict holds this rank's shards: the EMA is sharded like the weights
    ema = None
    if tc.ema_decay > 0:
        ema = {
            k: v.detach().clone().float()
            for k, v in model.state_dict().items()
            if saved is None or k in saved
        }
        if start is not None and start.ema is not None and saved is None:  # full fine-tuning: the EMA goes on
            D.load_full_tensors(ema, {k: start.ema[k] for k in ema if k in start.ema})
    loaders, val_loader = make_loaders(cfg, tokenizer, vae_model, info, streams)
    extra = {"lora": lora_meta(model, cfg, start)} if tc.lora_rank else {}
    checkpointer = Checkpointer(out, cfg, tokenizer, info, streams, saved, extra)
    run = Run(
        cfg, out, info, vae_model, parallel, optimizer, tokenizer, loaders, val_loader, ema, checkpointer
    )
    if latest is not None:
        restore(run, latest)
        D.print0(f"resumed from {latest} at step {run.step}")
    return run


def check_resumable(latest: Path, cfg: Config, world: int) -> int:
    """The run's data streams, after checking that ``latest`` can continue with this configuration on
    ``world`` processes (a one-line error otherwise, before anything is written)."""
    meta, saved = ckpt.read_meta(latest)
    changed = [k for k, v in dataclasses.asdict(cfg.model).items()
               if getattr(saved.model, k) != v and k != "attention"]  # the backend holds no weights  # fmt: skip
    if changed:
        what = ", ".join(
            f"model.{k}={getattr(saved.model, k)!r} (now {getattr(cfg.model, k)!r})" for k in changed
        )
        raise ValueError(
            f"{latest} holds another model: {what}; resume with the run's own model configuration"
        )
    if ckpt.is_sharded(latest):
        ckpt.shard_files(latest)  # every shard file present
    streams = ckpt.data_streams(latest)
    if streams % world:
        fits = ", ".join(str(n) for n in range(1, streams + 1) if streams % n == 0)
        raise ValueError(
            f"{latest} reads {streams} data stream(s) a step (its global batch); resume it on a number of "
            f"processes that divides {streams} ({fits}), not {world}"
        )
    if streams // world != cfg.train.grad_accum:
        D.print0(f"note: {streams} data stream(s) on {world} process(es): each step accumulates "
                 f"{streams // world} micro-batch(es) per process (train.grad_accum {cfg.train.grad_accum} before)")  # fmt: skip
    return streams


def restore(run: Run, path: Path) -> None:
    """Weights, optimizer, EMA, data positions, counters and random states from a run checkpoint,
    written by this number of processes or another."""
    state = run.checkpointer.restore(path, run.parallel.model, run.optimizer, run.ema)
    first = run.info.rank * len(run.loaders)
    for i, loader in enumerate(run.loaders):
        loader.load_state_dict(state.loader_states[first + i])
    run.step, run.counters = state.step, {**run.counters, **state.counters}


def save(run: Run) -> None:
    """A run checkpoint: every rank writes its own part (see ``training.checkpointer``)."""
    run.checkpointer.save(run.step, run.parallel.model, run.optimizer, run.ema,
                          [loader.state_dict() for loader in run.loaders], run.counters)  # fmt: skip


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    state = model.state_dict()
    for k, v in ema.items():  # every weight, or a LoRA run's trained ones
        v.lerp_(state[k].float(), 1 - decay)


def write_adapter(run: Run) -> Path:
    """``out/adapter``: the run's adapter (its EMA when kept) as a PEFT-format directory that ``load_model(...,
    adapters=[DIR])``, ``serve --adapter`` and ``export --merge-adapter`` read. Every rank takes part (under
    FSDP2 the adapter's shards are gathered); rank 0 writes."""
    from torch.distributed.tensor import DTensor

    from transfusion import lora

    info = run.checkpointer.meta["lora"]
    state = run.ema if run.ema is not None else D.model_tensors(run.parallel.model)
    state = {k: v for k, v in state.items() if k in run.checkpointer.saved}
    full = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in sorted(state.items())
    }
    directory = run.out / "adapter"
    if run.info.is_main:
        extra = {k: v for k, v in full.items() if k.startswith("patcher.")}
        lora.save_adapter(directory, full, rank=info["rank"], alpha=info["alpha"], modules=info["modules"],
                          base=info["base"], extra=extra)  # fmt: skip
    return directory


def trained_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the parameters that train (a LoRA run's adapters, and the patcher with
    ``train.lora_patcher``): what its checkpoints and EMA hold."""
    return {k for k, p in model.named_parameters() if p.requires_grad}


def lora_meta(model: torch.nn.Module, cfg: Config, start: Any) -> dict[str, Any]:
    """What a LoRA run's checkpoints record of their adapter: the base's identity and the adapted modules."""
    from transfusion import lora

    tc = cfg.train
    modules = sorted(lora.lora_layers(model))
    return {"base": start.base, "modules": modules, "rank": tc.lora_rank,
            "alpha": float(tc.lora_alpha or tc.lora_rank), "patcher": tc.lora_patcher}  # fmt: skip


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: BatchLoader,
    cfg: Config,
    schedule: Any,
    batches: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean text and image loss over the first ``batches`` held-out batches (fixed noise)."""
    was = model.training
    model.eval()
    loader.load_state_dict({"next_index": loader.rank, "carry": None})
    sums = torch.zeros(2, device=device)
    for i in range(batches):
        b = next(loader).to(device)
        losses = training_loss(model, b, schedule, cfg.diffusion, torch.Generator().manual_seed(i))
        sums += torch.stack([losses.text, losses.image]).float()
    text, image = sums.tolist()
    model.train(was)
    return {"val_text_loss": D.mean_across(text / batches), "val_image_loss": D.mean_across(image / batches)}


class MetricsLog:
    """``metrics.jsonl`` (rank 0) and the progress bar's numbers, every ``log_every`` steps and at
    every validation. On resume, lines past the resumed step (written before a crash) are dropped."""

    def __init__(self, run: Run):
        path = run.out / "metrics.jsonl"
        if run.info.is_main:
            _truncate_metrics(path, run.step)
        self.file = open(path, "a") if run.info.is_main else None  # noqa: SIM115
        self.started = self.window_start = time.time()
        self.window_tokens = 0

    def after_step(self, run: Run, result: StepResult, schedule: Any, bar: tqdm) -> None:
        tc = run.cfg.train
        self.window_tokens += result.tokens * run.info.world_size
        validate_now = run.val_loader is not None and run.step % tc.eval_every == 0
        if not (run.step % tc.log_every == 0 or run.step == tc.steps or validate_now):
            return
        elapsed = time.time() - self.window_start
        stats = sum((loader.stats for loader in run.loaders), Counter())
        record = {
            "step": run.step,
            "text_loss": D.mean_across(result.text_loss),
            "image_loss": D.mean_across(result.image_loss),
            "lr": lr_at(run.step - 1, tc),
            "grad_norm": result.grad_norm,
            "tokens_per_s": self.window_tokens / max(elapsed, 1e-9),
            "flops_seen": run.counters["flops_seen"],
            "bad_steps_total": run.counters["bad_steps_total"],
            "data_skipped": int(stats.get("skipped", 0) + stats.get("data_errors", 0)),
            "data_skipped_items": len(set().union(*(loader.skipped_items for loader in run.loaders))),
            "data_skipped_by_reason": {
                k.removeprefix("skipped_"): int(v) for k, v in stats.items() if k.startswith("skipped_")
            },
            "truncated": int(stats.get("truncated", 0)),
            "elapsed_s": time.time() - self.started,
            "compiled_graphs": compiled_graphs(),
        }
        self.window_tokens, self.window_start = 0, time.time()
        if validate_now:
            with run.parallel.autocast():  # the precision (and, compiled, the graphs) training uses
                record.update(
                    validate(
                        run.parallel.step_model,
                        run.val_loader,
                        run.cfg,
                        schedule,
                        tc.eval_batches,
                        run.info.device,
                    )
                )
        bar.set_postfix(text=f"{record['text_loss']:.3f}", image=f"{record['image_loss']:.3f}",
                        lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")  # fmt: skip
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so the curve of a resumed run has no duplicates."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def can_sample(run: Run) -> bool:
    """Sample grids need whole weights on every process (one process, DDP), not FSDP2's shards."""
    return run.parallel.whole


def save_sample_grid(run: Run, path: Path, prompts: list[str] = SAMPLE_PROMPTS) -> None:
    """The run's sample grid (``draw_sample_grid``) from its current weights; every rank calls it."""
    draw_sample_grid(run.parallel.model, run.tokenizer, run.cfg, run.vae, path, prompts)
    run.parallel.model.train()


def draw_sample_grid(model: Any, tokenizer: Any, cfg: Config, vae: Any, path: Path,
                     prompts: list[str] = SAMPLE_PROMPTS) -> None:  # fmt: skip
    """Images for ``prompts`` (the config's sampler, at most 100 steps, prompt i seeded i) in one PNG
    with the prompts beneath. Under torchrun every rank draws its share of the prompts (rank r: r, r +
    world, ...) and rank 0 writes the grid: no rank samples while the others wait for it in a
    collective (a first grid on a large model compiles and captures graphs, which could outlast the
    process group's timeout). Each image depends on its prompt and seed, not on the number of
    processes (to rounding)."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageDraw

    from transfusion.generate import Decoder, GenerationConfig, text_to_image
    from transfusion.vae import decode_latents

    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(prompts), world))
    drawn: list[tuple[int, Any]] = []
    if mine:
        dec = Decoder(model, tokenizer, cfg.diffusion)
        gen = dec.settings(GenerationConfig(steps=min(100, cfg.diffusion.sample_steps)))
        latents = torch.stack(text_to_image(dec, [prompts[i] for i in mine], gen, seeds=mine))
        drawn = [(i, np.asarray(im)) for i, im in zip(mine, decode_latents(vae, latents))]
    images = dict(item for part in D.all_gather_object(drawn, host=True) for item in part)
    if rank != 0:
        return
    cell = 96
    grid = PILImage.new("RGB", (cell * len(prompts), cell + 28), "white")
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(prompts):
        grid.paste(PILImage.fromarray(images[i]).resize((cell, cell), PILImage.NEAREST), (i * cell, 0))
        draw.text((i * cell + 2, cell + 2), p[:16], fill="black")
        draw.text((i * cell + 2, cell + 14), p[16:32], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


class _Signals:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.stop = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop = True

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
