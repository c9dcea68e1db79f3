"""The whole recipe on built-in data, within a time budget: train a tokenizer, a VAE and then a
Transfusion model on caption/image pairs of synthetic shape scenes, generate images for held-out
prompts, caption held-out images, evaluate, and write ``report.html``.

The schedule adapts to ``--minutes``: each stage measures its own step time first and sets its step
count to fit its share of the budget (VAE 8%, Transfusion 78%, the rest for the tokenizer, the latent
cache and evaluation). Evaluation costs about a minute whatever the budget (``eval_seconds``): short
budgets hold that back first and shrink the other shares. What the demo chooses, and why (measured
on 2 CPU cores, see the README):

- a byte-level BPE tokenizer trained on the captions (``train-tokenizer``), as the paper's Llama-2
  BPE makes every caption word one token: shorter sequences, and conditioning the trunk reads easily;
- the U-Net patcher (the paper's better image edges at small scale, Table 7);
- 3 layers of width 256 rather than the small preset's 6: in a fixed budget the smaller trunk takes
  twice the steps, and steps are what this budget lacks;
- image-first (captioning) pairs 25% of the time rather than the paper's 20%: captioning learns
  from those pairs only, and at this budget it gains more than generation loses;
- a pool of 20,000 scenes encoded once into a latent cache, instead of running the VAE encoder on
  every batch (pairing, conditioning dropout and noise still change every pass);
- evaluation with the paper's sampler: DDPM, 250 steps, guidance 3.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfusion.config import Config, DataConfig, DiffusionConfig, TrainConfig, VAEConfig, preset
from transfusion.evaluation.report import write_report
from transfusion.io import atomic_write_text


def note(message: str) -> None:
    """The demo's progress lines (stderr: the final summary is the command's result, on stdout)."""
    import sys

    print(message, file=sys.stderr)


SHARES = {"vae": 0.08, "train": 0.78}  # the rest: tokenizer, latent cache, evaluation
POOL = 20_000  # distinct training scenes of the shapes source, encoded once
TOKENIZER_VOCAB = 512


def demo_config(
    steps: int,
    seed: int,
    source: str = "shapes",
    tokenizer: str | None = None,
    latent_cache: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """The small preset's width (256) with 3 layers and the U-Net patcher, on 32x32 images through a 4x
    VAE (8x8x8 latents, 2x2 patches: 16 per image), image-first pairs 25% of the time, then
    ``overrides`` (``section.key=value``). Why these: see the module docstring."""
    from transfusion.tokenizer import load_tokenizer

    cfg = Config(
        model=preset("small", patcher="unet", n_layers=3),
        diffusion=DiffusionConfig(),
        vae=VAEConfig(image_size=32, downsample=4, latent_channels=8, base_channels=32),
        data=DataConfig(
            source=source, image_size=32, seed=seed, length=POOL if latent_cache else None, latent_cache=latent_cache,
            caption_first_prob=0.75,
        ),
        train=TrainConfig(
            steps=steps, batch_size=16, seq_len=128, lr=1e-3, min_lr=1e-4, warmup_steps=min(100, steps // 10 + 1),
            log_every=10, eval_every=100, ckpt_every=250, keep_last=2, seed=seed, tokenizer=tokenizer,
        ),
    )  # fmt: skip
    cfg = cfg.override(overrides or [])
    cfg.model.vocab_size = load_tokenizer(cfg.train.tokenizer).vocab_size
    return cfg


def seconds_per_step(fn: Callable[[], None], warmup: int = 2, repeat: int = 8) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` untimed ones (the median: one
    call slowed by another process must not shrink the whole schedule)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def calibrate_train(cfg: Config, encode: Any, cache: Any = None) -> float:
    """Seconds per optimizer step of this model on this machine, measured on real batches with the
    training loop's own step."""
    from transfusion.data.loader import BatchLoader
    from transfusion.diffusion import make_schedule
    from transfusion.model import Transfusion
    from transfusion.tokenizer import load_tokenizer
    from transfusion.training import make_optimizer, train_step

    torch.manual_seed(cfg.train.seed)
    model = Transfusion(cfg.model)
    opt = make_optimizer(model, cfg.train)
    loader = BatchLoader(cfg, load_tokenizer(cfg.train.tokenizer), encode, latent_cache=cache)
    schedule = make_schedule(cfg.diffusion)
    tc = cfg.train

    def step() -> None:
        train_step(model, opt, [next(loader)], schedule, cfg.diffusion, lr=tc.lr, grad_clip=tc.grad_clip)

    return seconds_per_step(step)


def eval_seconds(source: str, prompts_per_kind: int, captions: int) -> float:
    """What evaluation costs whatever the budget, as measured on 2 CPU cores: about 0.3 s per image
    generated (DDPM 250 with guidance, batched), 0.1 s per caption, and a fixed part (the shapes'
    feature classifier and text scoring, or the classifier that judges Fashion-MNIST images)."""
    if source == "fashion_mnist":
        return 0.3 * 10 * prompts_per_kind + 0.1 * captions + 35  # ten classes
    return 0.3 * 6 * prompts_per_kind + 0.1 * captions + 10  # six GenEval kinds


@dataclass
class Plan:
    """How the demo shares out its budget (seconds)."""

    budget: float
    reserve: float  # evaluation's share (at least what it needs whatever the budget)
    fit: float  # the factor that shrinks the VAE's and the model's shares to fit the rest

    @classmethod
    def make(cls, minutes: float, source: str, prompts_per_kind: int, captions: int) -> Plan:
        budget = minutes * 60
        # evaluation does not shrink with the budget: hold back what it needs, and shrink the VAE's and
        # the Transfusion model's shares to fit (the default 15 minutes hold back more than it needs)
        reserve = max(
            (1 - SHARES["vae"] - SHARES["train"]) * budget, eval_seconds(source, prompts_per_kind, captions)
        )
        fit = max(0.0, budget - reserve) / ((SHARES["vae"] + SHARES["train"]) * budget)
        return cls(budget, reserve, fit)


def run_demo(
    out: Path,
    minutes: float,
    seed: int = 0,
    eval_prompts_per_kind: int = 20,
    n_captions: int = 100,
    source: str = "shapes",
    overrides: list[str] | None = None,
) -> dict:
    """The five stages in order: tokenizer, VAE, latent cache, Transfusion model, evaluation and the
    report; returns {"metrics", "report", "timings"}."""
    plan = Plan.make(minutes, source, eval_prompts_per_kind, n_captions)
    if plan.fit < 0.5:
        left = plan.budget - plan.reserve
        how = (
            f"train in the {left:.0f} s left"
            if left >= 30
            else "still need a minimum: the demo will run over"
        )
        note(f"note: evaluation takes about {plan.reserve:.0f} s of the {plan.budget:.0f} s budget; the VAE "
             f"and the model {how}")  # fmt: skip
    t_start = time.time()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = str(out / "latents") if source == "shapes" else None  # Fashion-MNIST is encoded as it comes

    with _timed(timings, "tokenizer"):
        tokenizer_path = make_tokenizer(out, seed, source, cache_dir, overrides)
    cfg = demo_config(1, seed, source, tokenizer_path, cache_dir, overrides)
    with _timed(timings, "vae training"):
        vae, vae_result = make_vae(cfg, out, seed, SHARES["vae"] * plan.budget * plan.fit)
    cfg.vae = vae.config
    with _timed(timings, "latent cache"):
        encode, cache = make_latent_cache(cfg, vae, cache_dir)
    with _timed(timings, "transfusion training"):
        remaining = plan.budget - plan.reserve - (time.time() - t_start)
        cfg = train_model(
            cfg, out, seed, source, tokenizer_path, cache_dir, overrides, encode, cache, remaining
        )
    with _timed(timings, "evaluation"):
        metrics, details, loaded = evaluate_demo(out, eval_prompts_per_kind, n_captions, vae_result)
    timings["total"] = time.time() - t_start
    notes = _report_notes(minutes, vae_result, metrics, loaded, tokenizer_path, source)
    title = "Transfusion demo: " + ("shape scenes" if source == "shapes" else "Fashion-MNIST")
    report = write_report(out / "report.html", out / "model", metrics, details, title, timings, notes)
    return {"metrics": metrics, "report": str(report), "timings": timings}


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.time()
    yield
    timings[name] = time.time() - t0


def make_tokenizer(
    out: Path, seed: int, source: str, cache_dir: str | None, overrides: list[str] | None
) -> str | None:
    """Stage 1: a byte-level BPE trained on the captions (bytes if the optional ``tokenizers`` is
    missing), or the tokenizer ``--set train.tokenizer=...`` names; returns its path (None: bytes)."""
    cfg = demo_config(1, seed, source, None, cache_dir, overrides)
    if cfg.train.tokenizer is not None:
        note(f"[1/5] tokenizer: {cfg.train.tokenizer}")
        return cfg.train.tokenizer
    try:
        from transfusion.data.sources import source_texts
        from transfusion.tokenizer import train_bpe

        texts = source_texts(cfg.data, POOL)
        tok = train_bpe(texts, TOKENIZER_VOCAB, out / "tokenizer")
    except ModuleNotFoundError:
        note("[1/5] tokenizer: bytes (install the 'hf' extra for a BPE tokenizer trained on the captions)")
        return None
    example = texts[0]
    note(f"[1/5] tokenizer: byte-level BPE, {tok.vocab_size} ids; {example!r} is "
         f"{len(tok.encode(example))} tokens ({len(example.encode())} bytes)")  # fmt: skip
    return tok.path


def make_vae(cfg: Config, out: Path, seed: int, seconds: float) -> tuple[Any, dict]:
    """Stage 2: the VAE, with as many steps as ``seconds`` hold (measured here, 50 to 2000)."""
    from transfusion.training.vae import load_images, train_vae
    from transfusion.vae import KLVAE

    note(f"[2/5] VAE on {cfg.data.source} ({seconds:.0f} s budget)")
    train_images = load_images(cfg.data, "train", 4096)
    val_images = load_images(cfg.data, "val", 256)
    probe = KLVAE(cfg.vae)
    opt = torch.optim.AdamW(probe.parameters())

    def vae_step() -> None:
        loss, _, _ = probe.loss(train_images[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()

    steps = max(50, min(2000, int(seconds / seconds_per_step(vae_step))))
    result = train_vae(cfg.vae, train_images, val_images, out / "vae", steps=steps, seed=seed)
    note(f"      held-out PSNR {result['psnr_val']:.1f} dB after {steps} steps")
    return result["vae"], {**result, "steps": steps}


def make_latent_cache(cfg: Config, vae: Any, cache_dir: str | None) -> tuple[Any, Any]:
    """Stage 3: the pool of training scenes through the encoder, once (shapes only); returns the
    image encoder and the cache (None for sources encoded as batches need them)."""
    from transfusion.data.latent_cache import LatentCache, build_latent_cache
    from transfusion.data.sources import make_source
    from transfusion.training import image_encoder
    from transfusion.vae import vae_hash

    encode = image_encoder(vae, torch.device("cpu"))
    if cache_dir is None:
        note("[3/5] latent cache: not used for this source (images are encoded as batches need them)")
        return encode, None
    note(f"[3/5] latent cache: {POOL} scenes through the VAE encoder")
    build_latent_cache(make_source(cfg.data, "train"), encode, vae_hash(vae), cache_dir, POOL)
    return encode, LatentCache(cache_dir, vae_hash(vae))


def train_model(
    cfg: Config, out: Path, seed: int, source: str, tokenizer_path: str | None, cache_dir: str | None,
    overrides: list[str] | None, encode: Any, cache: Any, seconds: float,
) -> Config:  # fmt: skip
    """Stage 4: the Transfusion model, with as many steps as ``seconds`` hold at the step time
    measured here."""
    from transfusion.training import train

    per_step = calibrate_train(cfg, encode, cache)
    steps = max(20, int(seconds / per_step))
    vae_config = cfg.vae
    cfg = demo_config(steps, seed, source, tokenizer_path, cache_dir, overrides)
    cfg.vae = vae_config
    m = cfg.model
    note(
        f"[4/5] Transfusion ({m.dim} wide, {m.n_layers} layers, {m.patcher} patcher): {steps} steps of {per_step:.2f} s"
    )
    train(
        cfg,
        out / "model",
        vae=str(out / "vae"),
        progress=True,
        max_seconds=max(seconds, steps * per_step) * 1.05,
    )
    return cfg


def evaluate_demo(
    out: Path, prompts_per_kind: int, captions: int, vae_result: dict
) -> tuple[dict, dict, Any]:
    """Stage 5: generate, caption and score held-out data with the trained checkpoint."""
    from transfusion.checkpoint import load_for_inference
    from transfusion.evaluation import evaluate_checkpoint

    note("[5/5] generating, captioning and scoring held-out data")
    loaded, vae = load_for_inference(str(out / "model"))
    metrics, details = evaluate_checkpoint(loaded.model, loaded.tokenizer, vae, loaded.config, out,
                                           prompts_per_kind, captions)  # fmt: skip
    metrics["vae_psnr_val"] = round(vae_result["psnr_val"], 3)
    metrics["vae_steps"] = vae_result["steps"]
    metrics["train_steps"] = int(loaded.meta["step"])
    metrics["params_M"] = round(loaded.model.num_params() / 1e6, 3)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics, details, loaded


def _report_notes(
    minutes: float, vae_result: dict, metrics: dict, loaded: Any, tokenizer_path: str | None, source: str
) -> list[str]:
    m = loaded.config.model
    notes = [
        f"Budget {minutes:g} min on {torch.get_num_threads()} CPU threads; VAE {vae_result['steps']} steps, "
        f"Transfusion {metrics['train_steps']} steps ({m.dim} wide, {m.n_layers} layers, {m.patcher} patcher, "
        f"{loaded.model.num_params() / 1e6:.1f}M parameters).",
        f"Tokenizer: {'byte-level BPE trained on the captions' if tokenizer_path else 'UTF-8 bytes'} "
        f"({loaded.tokenizer.vocab_size} ids).",
    ]
    if source == "shapes":
        notes.append(
            "FD uses the features of a small CNN the project trains on the scenes, not Inception: not comparable to FID."
        )
    return notes
