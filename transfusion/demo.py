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

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from transfusion.config import Config, DataConfig, DiffusionConfig, TrainConfig, VAEConfig, preset

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
    """Seconds per optimizer step of this model on this machine, measured on real batches."""
    from transfusion.data.loader import BatchLoader
    from transfusion.diffusion import make_schedule
    from transfusion.losses import training_loss
    from transfusion.model import Transfusion
    from transfusion.tokenizer import load_tokenizer
    from transfusion.train import make_optimizer

    torch.manual_seed(cfg.train.seed)
    model = Transfusion(cfg.model)
    opt = make_optimizer(model, cfg.train)
    loader = BatchLoader(cfg, load_tokenizer(cfg.train.tokenizer), encode, latent_cache=cache)
    schedule = make_schedule(cfg.diffusion)

    def step() -> None:
        losses = training_loss(model, next(loader), schedule, cfg.diffusion)
        opt.zero_grad()
        losses.total.backward()
        opt.step()

    return seconds_per_step(step)


def eval_seconds(source: str, prompts_per_kind: int, captions: int) -> float:
    """What evaluation costs whatever the budget, as measured on 2 CPU cores: about 0.3 s per image
    generated (DDPM 250 with guidance, batched), 0.1 s per caption, and a fixed part (the shapes'
    feature classifier and text scoring, or the classifier that judges Fashion-MNIST images)."""
    if source == "fashion_mnist":
        return 0.3 * 10 * prompts_per_kind + 0.1 * captions + 35  # ten classes
    return 0.3 * 6 * prompts_per_kind + 0.1 * captions + 10  # six GenEval kinds


def run_demo(
    out: Path,
    minutes: float,
    seed: int = 0,
    eval_prompts_per_kind: int = 20,
    n_captions: int = 100,
    source: str = "shapes",
    overrides: list[str] | None = None,
) -> dict:
    from transfusion.data.latent_cache import LatentCache, build_latent_cache
    from transfusion.evaluate import evaluate, evaluate_fashion
    from transfusion.generate_cli import load_for_inference
    from transfusion.report import write_report
    from transfusion.train import image_encoder, train
    from transfusion.vae import KLVAE, vae_hash
    from transfusion.vae_train import load_images, train_vae

    budget = minutes * 60
    # evaluation does not shrink with the budget: hold back what it needs, and shrink the VAE's and
    # the Transfusion model's shares to fit (the default 15 minutes hold back more than it needs)
    reserve = max(
        (1 - SHARES["vae"] - SHARES["train"]) * budget,
        eval_seconds(source, eval_prompts_per_kind, n_captions),
    )
    fit = max(0.0, budget - reserve) / ((SHARES["vae"] + SHARES["train"]) * budget)
    if fit < 0.5:
        left = budget - reserve
        print(
            f"note: evaluation takes about {reserve:.0f} s of the {budget:.0f} s budget; the VAE and the model "
            + (
                f"train in the {left:.0f} s left"
                if left >= 30
                else "still need a minimum: the demo will run over"
            )
        )
    t_start = time.time()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    use_cache = source == "shapes"  # a pool of scenes; Fashion-MNIST's 55k images are encoded as they come
    cache_dir = str(out / "latents") if use_cache else None

    # 1. the tokenizer: byte-level BPE on the captions (bytes if the optional `tokenizers` is missing)
    t0 = time.time()
    tokenizer_path = None
    cfg = demo_config(1, seed, source, None, cache_dir, overrides)
    if cfg.train.tokenizer is None:
        try:
            from transfusion.data.sources import source_texts
            from transfusion.tokenizer import train_bpe

            texts = source_texts(cfg.data, POOL)
            tok = train_bpe(texts, TOKENIZER_VOCAB, out / "tokenizer")
            tokenizer_path = tok.path
            example = texts[0]
            print(f"[1/5] tokenizer: byte-level BPE, {tok.vocab_size} ids; {example!r} is "
                  f"{len(tok.encode(example))} tokens ({len(example.encode())} bytes)")  # fmt: skip
        except ModuleNotFoundError:
            print(
                "[1/5] tokenizer: bytes (install the 'hf' extra for a BPE tokenizer trained on the captions)"
            )
    else:
        tokenizer_path = cfg.train.tokenizer
        print(f"[1/5] tokenizer: {tokenizer_path}")
    cfg = demo_config(1, seed, source, tokenizer_path, cache_dir, overrides)
    timings["tokenizer"] = time.time() - t0

    # 2. the VAE
    print(f"[2/5] VAE on {source} ({SHARES['vae'] * budget * fit:.0f} s budget)")
    train_images = load_images(cfg.data, "train", 4096)
    val_images = load_images(cfg.data, "val", 256)
    probe = KLVAE(cfg.vae)
    opt = torch.optim.AdamW(probe.parameters())

    def vae_step() -> None:
        loss, _, _ = probe.loss(train_images[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()

    vae_steps = max(50, min(2000, int(SHARES["vae"] * budget * fit / seconds_per_step(vae_step))))
    t0 = time.time()
    vae_result = train_vae(cfg.vae, train_images, val_images, out / "vae", steps=vae_steps, seed=seed)
    timings["vae training"] = time.time() - t0
    vae = vae_result["vae"]
    cfg.vae = vae.config
    print(f"      held-out PSNR {vae_result['psnr_val']:.1f} dB after {vae_steps} steps")

    # 3. the latent cache: the pool of training scenes through the encoder, once
    encode = image_encoder(vae, torch.device("cpu"))
    cache = None
    if use_cache:
        from transfusion.data.sources import make_source

        t0 = time.time()
        print(f"[3/5] latent cache: {POOL} scenes through the VAE encoder")
        build_latent_cache(make_source(cfg.data, "train"), encode, vae_hash(vae), cache_dir, POOL)
        cache = LatentCache(cache_dir, vae_hash(vae))
        timings["latent cache"] = time.time() - t0
    else:
        print("[3/5] latent cache: not used for this source (images are encoded as batches need them)")

    # 4. the Transfusion model: as many steps as its share of the budget holds
    spent_before = time.time() - t_start
    remaining_train = budget - reserve - spent_before
    per_step = calibrate_train(cfg, encode, cache)
    steps = max(20, int(remaining_train / per_step))
    cfg = demo_config(steps, seed, source, tokenizer_path, cache_dir, overrides)
    cfg.vae = vae.config
    m = cfg.model
    print(
        f"[4/5] Transfusion ({m.dim} wide, {m.n_layers} layers, {m.patcher} patcher): {steps} steps of {per_step:.2f} s"
    )
    t0 = time.time()
    train(
        cfg,
        out / "model",
        vae=str(out / "vae"),
        progress=True,
        max_seconds=max(remaining_train, steps * per_step) * 1.05,
    )
    timings["transfusion training"] = time.time() - t0

    # 5. evaluation and the report
    print("[5/5] generating, captioning and scoring held-out data")
    t0 = time.time()
    loaded, vae = load_for_inference(str(out / "model"))
    judge = evaluate_fashion if source == "fashion_mnist" else evaluate
    metrics, details = judge(
        loaded.model, loaded.tokenizer, vae, loaded.config, out, eval_prompts_per_kind, n_captions
    )
    metrics["vae_psnr_val"] = round(vae_result["psnr_val"], 3)
    metrics["train_steps"] = int(loaded.meta["step"])
    metrics["params_M"] = round(loaded.model.num_params() / 1e6, 3)
    timings["evaluation"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    timings["total"] = time.time() - t_start
    notes = [
        f"Budget {minutes:g} min on {torch.get_num_threads()} CPU threads; VAE {vae_steps} steps, "
        f"Transfusion {metrics['train_steps']} steps ({m.dim} wide, {m.n_layers} layers, {m.patcher} patcher, "
        f"{loaded.model.num_params() / 1e6:.1f}M parameters).",
        f"Tokenizer: {'byte-level BPE trained on the captions' if tokenizer_path else 'UTF-8 bytes'} "
        f"({loaded.tokenizer.vocab_size} ids).",
    ]
    if source == "shapes":
        notes.append(
            "FD uses the features of a small CNN the project trains on the scenes, not Inception: not comparable to FID."
        )
    title = "Transfusion demo: " + ("shape scenes" if source == "shapes" else "Fashion-MNIST")
    report = write_report(out / "report.html", out / "model", metrics, details, title, timings, notes)
    return {"metrics": metrics, "report": str(report), "timings": timings}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default runs/demo-<date>-<time>)")
    p.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="total time budget; stages scale to fit, evaluation needing about 1-2 min of it (default 15)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dataset",
        choices=["shapes", "fashion_mnist"],
        default="shapes",
        help="built-in shape scenes (default) or Fashion-MNIST from Debian's package",
    )
    p.add_argument(
        "--prompts-per-kind", type=int, default=20, help="held-out prompts per GenEval kind (default 20)"
    )
    p.add_argument("--captions", type=int, default=100, help="held-out images to caption (default 100)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change the demo's configuration, e.g. --set model.patcher=linear (repeatable; see `train --help`)",
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another --out")
    if args.minutes <= 0:
        raise ValueError("--minutes must be > 0")
    demo_config(1, args.seed, args.dataset, None, None, args.set)  # bad --set values fail before any work
    result = run_demo(
        out, args.minutes, args.seed, args.prompts_per_kind, args.captions, args.dataset, args.set
    )
    m = result["metrics"]
    if args.dataset == "fashion_mnist":
        print(f"\nreport: {result['report']}\nclass-conditional generation accuracy {m['fashion_generation_accuracy']:.2f}, "
              f"caption accuracy {m['fashion_caption_accuracy']:.2f}, {result['timings']['total'] / 60:.1f} min")  # fmt: skip
        return 0
    print(
        f"\nreport: {result['report']}\n"
        f"composition overall {m['geneval_overall']:.2f} (single object {m['geneval_single_object']:.2f}), "
        f"caption accuracy {m['caption_accuracy']:.2f}, CIDEr-D {m['caption_cider_d']:.2f}, "
        f"text {m['text_bits_per_byte']:.2f} bits/byte, VAE PSNR {m['vae_psnr_val']:.1f} dB, "
        f"{result['timings']['total'] / 60:.1f} min"
    )
    return 0
