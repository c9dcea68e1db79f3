"""Train a Transfusion model: one process on a CPU or GPU, or many under torchrun (DDP or FSDP2).

``train(config, out_dir, ...)`` is a plain loop, read top to bottom: AdamW (PAPER.md: betas 0.9/0.95,
eps 1e-8, weight decay 0.1 on matrices), linear warm-up then cosine decay to ``min_lr``, gradient
accumulation and clipping, optional EMA, bf16 autocast on CUDA and fp32 on CPU, periodic validation,
sample grids and checkpoints. A run directory holds::

    config.json             the configuration it ran with
    metrics.jsonl           one JSON object per logging step
    checkpoints/step_N/     model.safetensors, ema.safetensors, meta.json, state.pt, loader.json
    latest                  the name of the newest complete checkpoint
    samples/step_N.png      sample grids with their prompts (when sample_every > 0)
    vae/                    the image autoencoder the latents came from

Resume (``--resume``) restores weights, optimizer, schedule, EMA, the data position and counters; with
deterministic settings on the CPU the resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transfusion import checkpoint as ckpt
from transfusion import distributed as D
from transfusion.cli import UserError
from transfusion.config import Config, ModelConfig, TrainConfig, load_config, preset
from transfusion.data.loader import BatchLoader
from transfusion.diffusion import make_schedule
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.tokenizer import load_tokenizer


class TrainingStopped(UserError):
    """Too many non-finite losses in a row (printed as one line by the CLI)."""


# --- pieces the loop uses ------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, never on norms or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


PRETRAINED_IMAGE_SIDE = (
    "latent_channels",
    "latent_size",
    "patch_size",
    "patcher",
    "unet_channels",
    "attention",
)


def model_config_for_init(model: ModelConfig, init_from: str) -> ModelConfig:
    """The model config of a run that starts from a pretrained LLM: the checkpoint's text side, with
    the image side of ``model`` and every other field that ``model`` sets away from its default
    (``max_seq_len``, or a text-side field, which must then repeat the checkpoint's value)."""
    from transfusion.pretrained import pretrained_config

    default = ModelConfig()
    overrides = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(ModelConfig)
        if f.name in PRETRAINED_IMAGE_SIDE or getattr(model, f.name) != getattr(default, f.name)
    }
    return pretrained_config(init_from, overrides)[0]


def build_model(cfg: Config) -> tuple[Transfusion, Any, Any]:
    """(model, tokenizer, freeze or None). With ``train.init_from`` the text side and the tokenizer
    come from a local Llama / Qwen2 directory; ``train.freeze_text`` then trains the image side only."""
    tc = cfg.train
    if not tc.init_from:
        return Transfusion(cfg.model), load_tokenizer(tc.tokenizer), None
    from transfusion.pretrained import freeze_text, load_pretrained, trainable_parameters_summary

    model, _, tokenizer = load_pretrained(tc.init_from, dataclasses.asdict(cfg.model))
    freeze = None
    if tc.freeze_text:
        new_rows = tc.parallel != "fsdp"  # FSDP2 replaces parameters: the row mask cannot follow them
        freeze = freeze_text(model, tc.train_layers, train_embeddings_new_rows=new_rows, tokenizer=tokenizer)
        D.print0(trainable_parameters_summary(model))
    return model, tokenizer, freeze


def check_consistency(cfg: Config) -> None:
    """The pieces of a config that must agree, with what to change."""
    m, v = cfg.model, cfg.vae
    if v.latent_channels != m.latent_channels:
        raise ValueError(
            f"vae.latent_channels {v.latent_channels} != model.latent_channels {m.latent_channels}"
        )
    if v.latent_size != m.latent_size:
        raise ValueError(
            f"the VAE makes {v.latent_size}x{v.latent_size} latents (image {v.image_size} / {v.downsample}) but "
            f"model.latent_size is {m.latent_size}; set model.latent_size={v.latent_size}"
        )
    if cfg.data.image_size != v.image_size:
        raise ValueError(f"data.image_size {cfg.data.image_size} != vae.image_size {v.image_size}")
    if cfg.train.seq_len > m.max_seq_len:
        raise ValueError(f"train.seq_len {cfg.train.seq_len} exceeds model.max_seq_len {m.max_seq_len}")


def load_or_make_vae(vae_arg: str | None, cfg: Config, out: Path, is_main: bool, resume: bool) -> Any:
    """The run's VAE: ``out/vae`` when resuming, a trained directory, or 'random' (tests only)."""
    from transfusion.vae import KLVAE, load_vae, save_vae

    if (out / "vae").is_dir() and (resume or vae_arg is None):
        return load_vae(out / "vae")
    if vae_arg == "random":
        torch.manual_seed(cfg.train.seed)
        vae = KLVAE(cfg.vae).eval()
        if is_main:
            print("warning: --vae random: an untrained autoencoder; for tests and smoke runs only")
    elif vae_arg:
        vae = load_vae(vae_arg)
    else:
        raise ValueError("give --vae DIR (a trained VAE: transfusion train-vae --out DIR) or --vae random")
    if is_main:
        if isinstance(vae, KLVAE):
            save_vae(vae, out / "vae")
        else:
            ckpt.copy_dir_atomic(Path(vae_arg), out / "vae")
    return vae


def image_encoder(vae: Any, device: torch.device) -> Callable[[list], torch.Tensor]:
    """A function from PIL images to their latents scaled for diffusion, (N, C, h, w) on the CPU."""
    from transfusion.vae import pil_to_tensor

    vae = vae.to(device).eval()

    @torch.no_grad()
    def encode(images: list) -> torch.Tensor:
        return vae.to_diffusion(vae.encode(pil_to_tensor(images).to(device))).float().cpu()

    return encode


def open_latent_cache(cfg: Config, source: Any, vae: Any, encode: Any, info: Any) -> Any:
    """Build (rank 0) or reuse the latent cache named by data.latent_cache; every rank then reads it."""
    import torch.distributed as dist

    from transfusion.data.latent_cache import LatentCache, build_latent_cache
    from transfusion.vae import vae_hash

    unbounded = cfg.data.source == "shapes" and cfg.data.length is None
    if unbounded or not hasattr(source, "__len__") or len(source) > 5_000_000:
        raise ValueError(
            "data.latent_cache needs a finite map-style source: folder, jsonl, fashion_mnist, or shapes with "
            "data.length set (a pool of scenes)"
        )
    digest = vae_hash(vae)
    if info.is_main:
        build_latent_cache(source, encode, digest, cfg.data.latent_cache, len(source))
    if dist.is_initialized():
        dist.barrier()
    return LatentCache(cfg.data.latent_cache, digest)


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
    text = image = 0.0
    for i in range(batches):
        b = next(loader).to(device)
        losses = training_loss(model, b, schedule, cfg.diffusion, torch.Generator().manual_seed(i))
        text, image = text + losses.text.item(), image + losses.image.item()
    model.train(was)
    return {"val_text_loss": D.mean_across(text / batches), "val_image_loss": D.mean_across(image / batches)}


def save_sample_grid(
    model: Transfusion, vae: Any, tokenizer: Any, cfg: Config, path: Path, prompts: list[str]
) -> None:
    from PIL import Image as PILImage
    from PIL import ImageDraw

    from transfusion.generate import Decoder, GenerationConfig, text_to_image
    from transfusion.vae import tensor_to_pil

    dec = Decoder(model, tokenizer, cfg.diffusion)
    gen = dec.settings(GenerationConfig(steps=min(100, cfg.diffusion.sample_steps)))  # the config's sampler
    latents = torch.stack(text_to_image(dec, prompts, gen, seeds=list(range(len(prompts)))))
    with torch.no_grad():
        images = tensor_to_pil(
            vae.decode(vae.from_diffusion(latents.to(next(vae.parameters()).device))).cpu()
        )
    cell = 96
    grid = PILImage.new("RGB", (cell * len(images), cell + 28), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, p) in enumerate(zip(images, prompts)):
        grid.paste(im.resize((cell, cell), PILImage.NEAREST), (i * cell, 0))
        draw.text((i * cell + 2, cell + 2), p[:16], fill="black")
        draw.text((i * cell + 2, cell + 14), p[16:32], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    model.train()


class _Signals:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.stop = False
        self.previous = {}

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


# --- checkpoints ---------------------------------------------------------------------------------------
def save_training_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor] | None,
    opt: torch.optim.Optimizer,
    cfg: Config,
    tokenizer: Any,
    loader_states: list,
    counters: dict,
    info: D.DistInfo,
) -> None:
    """Everything to resume, written into a temporary directory that is renamed into place; then
    ``latest`` is updated and checkpoints beyond the last ``keep_last`` are removed."""
    weights = D.full_state_dict(model)
    opt_state = _optimizer_state(model, opt, info)
    ema_full = D.full_tensors(ema) if ema is not None else None  # under FSDP2 the EMA is sharded too
    rng = D.all_gather_object(_rng_state())
    if not info.is_main:
        return
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ckpt.save_tensors(tmp / ckpt.MODEL_FILE, weights)
    if ema_full is not None:
        ckpt.save_tensors(tmp / ckpt.EMA_FILE, ema_full)
    meta = {
        "config": cfg.to_dict(),
        "tokenizer": ckpt.save_tokenizer(tokenizer, tmp),
        "step": step,
        "vae": "../../vae",
        **counters,
    }
    ckpt.atomic_write_text(tmp / ckpt.META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    ckpt.atomic_write_text(tmp / "loader.json", json.dumps(loader_states))
    torch.save({"optimizer": opt_state, "rng": rng}, tmp / "state.pt")
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    ckpt.atomic_write_text(out / "latest", f"checkpoints/{name}\n")
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: -cfg.train.keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    """This process's global random states (the loop itself draws its noise from per-sample
    generators; these cover anything else that uses the global ones)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, info: D.DistInfo) -> dict:
    if info.enabled and not hasattr(model, "module"):  # FSDP2: gather the full optimizer state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return opt.state_dict()


def load_training_checkpoint(
    path: Path,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor] | None,
    opt: torch.optim.Optimizer,
    info: D.DistInfo,
) -> tuple[int, list, dict]:
    """Restore weights, optimizer, EMA and random states; returns (step, loader states, counters)."""
    from safetensors.torch import load_file

    meta = json.loads((path / ckpt.META_FILE).read_text())
    loader_states = json.loads((path / "loader.json").read_text())
    if len(loader_states) != info.world_size:
        raise ValueError(
            f"{path} was written by {len(loader_states)} process(es); resume with the same number "
            f"(torchrun --nproc_per_node={len(loader_states)}), not {info.world_size}"
        )
    weights = load_file(path / ckpt.MODEL_FILE)
    state = torch.load(path / "state.pt", weights_only=True)
    if info.enabled and not hasattr(model, "module"):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)
    else:
        inner = model.module if hasattr(model, "module") else model
        inner.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
    if ema is not None and (path / ckpt.EMA_FILE).is_file():
        D.load_full_tensors(ema, load_file(path / ckpt.EMA_FILE))
    if "rng" in state:
        _set_rng_state(state["rng"][info.rank])
    counters = {k: meta.get(k, 0) for k in ("bad_steps_total", "tokens_seen")}
    return int(meta["step"]), loader_states, counters


# --- the loop ---------------------------------------------------------------------------------------------
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
    if cfg.train.init_from:  # the checkpoint fixes the text side of the model config
        cfg.model = model_config_for_init(cfg.model, cfg.train.init_from)
    elif cfg.train.tokenizer:  # the tokenizer fixes the vocabulary
        cfg.model.vocab_size = load_tokenizer(cfg.train.tokenizer).vocab_size
    tc = cfg.train
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    latest = ckpt.resolve_checkpoint(out) if resume and (out / "latest").is_file() else None
    if not resume and (out / "latest").is_file():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    info = D.init(tc.device)
    device = info.device
    if resume and latest is None:
        D.print0(f"note: {out} holds no checkpoint yet; starting from step 0")
    # the VAE first: the run's config records the autoencoder it actually trains with
    vae_model = load_or_make_vae(vae, cfg, out, info.is_main, resume)
    cfg.vae = dataclasses.replace(vae_model.config, path=None)
    check_consistency(cfg)
    torch.manual_seed(tc.seed)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        ckpt.atomic_write_text(out / "config.json", cfg.to_json())

    # model, optimizer, EMA
    model, tokenizer, freeze = build_model(cfg)
    model = model.to(device)
    model.train()
    wrapped = D.wrap_model(model, tc.parallel, info)
    # torch.compile for the training step (dynamic: the number of images changes from batch to batch)
    step_model = torch.compile(wrapped, dynamic=True) if tc.compile else wrapped
    opt = make_optimizer(wrapped if tc.parallel == "fsdp" else model, tc, fused=device.type == "cuda")
    if freeze is not None:
        freeze.attach(opt)  # frozen rows out of weight decay, before any optimizer state is loaded
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if tc.ema_decay > 0 else None
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # data
    encode = image_encoder(vae_model, device)
    loader = BatchLoader(cfg, tokenizer, encode, info.rank, info.world_size, "train")
    if cfg.data.latent_cache:
        loader.cache = open_latent_cache(cfg, loader.source, vae_model, encode, info)
    val_loader = (
        BatchLoader(cfg, tokenizer, encode, info.rank, info.world_size, "val") if tc.eval_every else None
    )
    schedule = make_schedule(cfg.diffusion)

    step, counters = 0, {"bad_steps_total": 0, "tokens_seen": 0}
    if latest is not None:
        step, loader_states, counters = load_training_checkpoint(latest, wrapped, ema, opt, info)
        loader.load_state_dict(loader_states[info.rank])
        D.print0(f"resumed from {latest} at step {step}")
    if info.is_main:  # no log lines past the step we start from (a run that died before its checkpoint)
        _truncate_metrics(out / "metrics.jsonl", step)

    log = open(out / "metrics.jsonl", "a") if info.is_main else None  # noqa: SIM115
    bar = tqdm(
        total=tc.steps,
        initial=step,
        desc="train",
        disable=not (progress and info.is_main),
        dynamic_ncols=True,
    )
    # sample grids run on rank 0 alone: fine with whole weights (one process, DDP), not with FSDP2 shards
    can_sample = not (info.enabled and tc.parallel == "fsdp")
    if tc.sample_every and not can_sample:
        D.print0("note: no sample grids under FSDP2 (each rank holds a shard); generate from a checkpoint")
    bad_in_row, started, window_tokens, window_start = 0, time.time(), 0, time.time()
    interrupted = False
    last_saved = step if latest is not None else -1

    def save() -> None:
        nonlocal last_saved
        states = D.all_gather_object(loader.state_dict())
        save_training_checkpoint(out, step, wrapped, ema, opt, cfg, tokenizer, states, counters, info)
        last_saved = step

    with _Signals() as signals:
        while step < tc.steps:
            # one optimizer step: grad_accum micro-batches
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            text_loss = image_loss = 0.0
            for micro in range(tc.grad_accum):
                batch = next(loader).to(device)
                sync = (
                    nullcontext()
                    if micro == tc.grad_accum - 1 or not hasattr(wrapped, "no_sync")
                    else wrapped.no_sync()
                )
                with sync, autocast:
                    losses = training_loss(step_model, batch, schedule, cfg.diffusion)
                    (losses.total / tc.grad_accum).backward()
                text_loss += losses.text.item() / tc.grad_accum
                image_loss += losses.image.item() / tc.grad_accum
                window_tokens += batch.ids.numel() * info.world_size
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)
            finite = math.isfinite(text_loss + image_loss) and bool(torch.isfinite(grad_norm))
            finite = D.mean_across(float(finite)) == 1.0
            if finite:
                opt.step()
                bad_in_row = 0
                if ema is not None:
                    with torch.no_grad():
                        for k, v in model.state_dict().items():
                            ema[k].lerp_(v.float(), 1 - tc.ema_decay)
            else:
                bad_in_row += 1
                counters["bad_steps_total"] += 1
                D.print0(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_row} in a row)")
                if bad_in_row > tc.max_bad_steps:
                    raise TrainingStopped(
                        f"{bad_in_row} non-finite steps in a row (train.max_bad_steps={tc.max_bad_steps}); "
                        f"the last good checkpoint is in {out}; lower train.lr or check the data"
                    )
            opt.zero_grad(set_to_none=True)
            step += 1
            counters["tokens_seen"] += tc.batch_size * tc.seq_len * tc.grad_accum * info.world_size
            bar.update(1)

            validate_now = val_loader is not None and step % tc.eval_every == 0
            if step % tc.log_every == 0 or step == tc.steps or validate_now:
                elapsed = time.time() - window_start
                record = {
                    "step": step,
                    "text_loss": D.mean_across(text_loss),
                    "image_loss": D.mean_across(image_loss),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "bad_steps_total": counters["bad_steps_total"],
                    "data_skipped": int(loader.stats.get("skipped", 0) + loader.stats.get("data_errors", 0)),
                    "data_skipped_by_reason": {
                        k.removeprefix("skipped_"): int(v)
                        for k, v in loader.stats.items()
                        if k.startswith("skipped_")
                    },
                    "truncated": int(loader.stats.get("truncated", 0)),
                    "elapsed_s": time.time() - started,
                }
                window_tokens, window_start = 0, time.time()
                if validate_now:
                    record.update(validate(wrapped, val_loader, cfg, schedule, tc.eval_batches, device))
                bar.set_postfix(
                    text=f"{record['text_loss']:.3f}", image=f"{record['image_loss']:.3f}", lr=f"{lr:.1e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )  # fmt: skip
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if tc.sample_every and step % tc.sample_every == 0 and info.is_main and can_sample:
                save_sample_grid(
                    model, vae_model, tokenizer, cfg, out / "samples" / f"step_{step:07d}.png", SAMPLE_PROMPTS
                )
            # every rank must take the same decision: a signal or a clock seen by one rank stops all
            stop, out_of_time = D.any_across(
                signals.stop, max_seconds is not None and time.time() - started > max_seconds
            )
            if step % tc.ckpt_every == 0 or step == tc.steps or stop:
                save()
            if stop or out_of_time or (stop_after is not None and step >= stop_after):
                if out_of_time:
                    D.print0(f"time budget of {max_seconds:.0f} s spent at step {step}")
                interrupted = stop
                break
    bar.close()
    if log:
        log.close()
    if last_saved != step:
        save()
    D.cleanup()
    return {"step": step, "out": str(out), "interrupted": interrupted, **counters}


SAMPLE_PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle to the left of a yellow circle",
    "a cyan square",
]


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
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))


# --- command line -----------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config) if args.config else Config()
    if args.preset:
        cfg.model = preset(args.preset)
        if args.preset == "tiny":  # tiny latents (4x4) come from 16x16 images
            cfg.vae.image_size = cfg.data.image_size = cfg.model.latent_size * cfg.vae.downsample
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.data_path:
        overrides.append(f"data.path={json.dumps(args.data_path)}")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    if args.tokenizer:
        overrides.append(f"train.tokenizer={json.dumps(str(Path(args.tokenizer).resolve()))}")
    if args.init_from:
        overrides.append(f"train.init_from={json.dumps(args.init_from)}")
    if args.freeze_text:
        overrides.append("train.freeze_text=true")
    if args.train_layers:
        overrides.append(f"train.train_layers=[{args.train_layers}]")
    if args.strict:
        overrides.append("data.strict=true")
    return cfg.override(overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from transfusion.config import config_keys_help

    p.epilog = (
        "The configuration is Config() (or --config FILE), then --preset (which replaces the model section), "
        "then the flags below and every --set, in order.\n\n" + config_keys_help()
    )
    p.add_argument("--out", required=True, help="run directory (created; holds config, metrics, checkpoints)")
    p.add_argument("--preset", default=None, help="model preset: tiny, small, 0.16B, 0.37B, 0.76B, 1.4B, 7B")
    p.add_argument(
        "--config",
        default=None,
        help="a JSON or TOML config file (sections model, diffusion, vae, data, train)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="data source: shapes (default), fashion_mnist, folder, jsonl, text, webdataset",
    )
    p.add_argument("--data-path", default=None, help="path for file-based data sources")
    p.add_argument(
        "--vae",
        default=None,
        help="trained VAE directory (transfusion train-vae), or 'random' for smoke tests",
    )
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer.json (or its directory), e.g. from `transfusion train-tokenizer` (default: bytes)",
    )
    p.add_argument(
        "--init-from", default=None, help="start from a local Hugging Face Llama / Qwen2 directory"
    )
    p.add_argument("--freeze-text", action="store_true", help="with --init-from: train only the image side")
    p.add_argument(
        "--train-layers", default=None, help="with --freeze-text: layers that still train, e.g. 10,11 or -1"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable data item (default: skip it with a warning and count it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    stored = Path(args.out) / "config.json"
    if args.resume and stored.is_file():
        # a resumed run continues with the configuration it ran with; --steps and --set may change it
        fixed = [
            n for n in ("preset", "config", "data", "data_path", "tokenizer", "init_from") if getattr(args, n)
        ]
        if fixed or args.freeze_text or args.train_layers:
            flags = ", ".join("--" + n.replace("_", "-") for n in fixed) or "--freeze-text/--train-layers"
            raise ValueError(
                f"--resume continues with {stored}; drop {flags} (change single fields with --set)"
            )
        cfg = load_config(stored)
        overrides = list(args.set or []) + ([f"train.steps={args.steps}"] if args.steps else [])
        overrides += ["data.strict=true"] if args.strict else []
        cfg = cfg.override(overrides)
    else:
        cfg = build_config(args)
    result = train(cfg, args.out, vae=args.vae, resume=args.resume, progress=not args.no_progress)
    D.print0(f"stopped at step {result['step']}; checkpoints in {Path(args.out) / 'checkpoints'}")
    return 130 if result["interrupted"] else 0
