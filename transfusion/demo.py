"""The whole recipe on built-in data, within a time budget: train a VAE on synthetic shape scenes, train
a Transfusion model on caption/image pairs of them, generate images for held-out prompts, caption
held-out images, evaluate, and write ``report.html``.

The schedule adapts to ``--minutes``: each stage measures its own step time first and sets its step
count to fit its share of the budget (VAE 15%, Transfusion 70%, the rest for evaluation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transfusion.config import Config, DataConfig, DiffusionConfig, TrainConfig, VAEConfig, preset

SHARES = {"vae": 0.15, "train": 0.70}


def demo_config(steps: int, seed: int, source: str = "shapes") -> Config:
    """The small preset on 32x32 scenes through a 4x VAE (8x8x8 latents, 2x2 patches: 16 per image)."""
    return Config(
        model=preset("small"),
        diffusion=DiffusionConfig(),
        vae=VAEConfig(image_size=32, downsample=4, latent_channels=8, base_channels=32),
        data=DataConfig(source=source, image_size=32, seed=seed),
        train=TrainConfig(
            steps=steps,
            batch_size=16,
            seq_len=128,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=min(100, steps // 10 + 1),
            log_every=10,
            eval_every=100,
            ckpt_every=250,
            keep_last=2,
            seed=seed,
        ),  # fmt: skip
    )


def seconds_per_step(fn, warmup: int = 1, repeat: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def calibrate_train(cfg: Config, encode) -> float:
    """Seconds per optimizer step of this model on this machine, measured on real batches."""
    from transfusion.data.loader import BatchLoader
    from transfusion.diffusion import make_schedule
    from transfusion.losses import training_loss
    from transfusion.model import Transfusion
    from transfusion.tokenizer import ByteTokenizer
    from transfusion.train import make_optimizer

    model = Transfusion(cfg.model)
    opt = make_optimizer(model, cfg.train)
    loader = BatchLoader(cfg, ByteTokenizer(), encode)
    schedule = make_schedule(cfg.diffusion)

    def step() -> None:
        losses = training_loss(model, next(loader), schedule, cfg.diffusion)
        opt.zero_grad()
        losses.total.backward()
        opt.step()

    return seconds_per_step(step)


def run_demo(
    out: Path,
    minutes: float,
    seed: int = 0,
    eval_prompts_per_kind: int = 10,
    n_captions: int = 48,
    source: str = "shapes",
) -> dict:
    from transfusion.evaluate import evaluate
    from transfusion.report import write_report
    from transfusion.train import image_encoder, train
    from transfusion.vae import KLVAE
    from transfusion.vae_train import load_images, train_vae

    budget = minutes * 60
    t_start = time.time()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(1, seed, source)

    # 1. the VAE
    print(f"[1/4] VAE on {source} ({SHARES['vae'] * budget:.0f} s budget)")
    train_images = load_images(cfg.data, "train", 4096)
    val_images = load_images(cfg.data, "val", 256)
    probe = KLVAE(cfg.vae)
    opt = torch.optim.AdamW(probe.parameters())

    def vae_step() -> None:
        loss, _, _ = probe.loss(train_images[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()

    vae_steps = max(50, min(2000, int(SHARES["vae"] * budget / seconds_per_step(vae_step))))
    t0 = time.time()
    vae_result = train_vae(cfg.vae, train_images, val_images, out / "vae", steps=vae_steps, seed=seed)
    timings["vae training"] = time.time() - t0
    vae = vae_result["vae"]
    cfg.vae = vae.config
    print(f"      held-out PSNR {vae_result['psnr_val']:.1f} dB after {vae_steps} steps")

    # 2. the Transfusion model
    encode = image_encoder(vae, torch.device("cpu"))
    remaining_train = SHARES["train"] * budget - max(0.0, time.time() - t_start - SHARES["vae"] * budget)
    per_step = calibrate_train(cfg, encode)
    steps = max(20, int(remaining_train / per_step))
    cfg = demo_config(steps, seed, source)
    cfg.vae = vae.config
    print(
        f"[2/4] Transfusion ({cfg.model.dim} wide, {cfg.model.n_layers} layers): {steps} steps of {per_step:.2f} s"
    )
    t0 = time.time()
    train(cfg, out / "model", vae=str(out / "vae"), progress=True, max_seconds=remaining_train * 1.1)
    timings["transfusion training"] = time.time() - t0

    # 3. evaluation
    print("[3/4] generating, captioning and scoring held-out data")
    from transfusion.generate_cli import load_for_inference

    t0 = time.time()
    loaded, vae = load_for_inference(str(out / "model"))
    from transfusion.evaluate import evaluate_fashion

    judge = evaluate_fashion if source == "fashion_mnist" else evaluate
    metrics, details = judge(
        loaded.model, loaded.tokenizer, vae, loaded.config, out, eval_prompts_per_kind, n_captions, steps=50
    )
    metrics["vae_psnr_val"] = round(vae_result["psnr_val"], 3)
    metrics["train_steps"] = steps
    metrics["params_M"] = round(loaded.model.num_params() / 1e6, 3)
    timings["evaluation"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # 4. the report
    timings["total"] = time.time() - t_start
    notes = [
        f"Budget {minutes:g} min on {torch.get_num_threads()} CPU threads; VAE {vae_steps} steps, Transfusion {steps} steps.",
    ]
    if source == "shapes":
        notes.append(
            "FD uses the features of a small CNN the project trains on the scenes, not Inception: not comparable to FID."
        )
    title = "Transfusion demo: " + ("shape scenes" if source == "shapes" else "Fashion-MNIST")
    report = write_report(out / "report.html", out / "model", metrics, details, title, timings, notes)
    print(f"[4/4] report: {report}")
    return {"metrics": metrics, "report": str(report), "timings": timings}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default runs/demo-<date>-<time>)")
    p.add_argument(
        "--minutes", type=float, default=15.0, help="total time budget; stages scale to fit (default 15)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dataset",
        choices=["shapes", "fashion_mnist"],
        default="shapes",
        help="built-in shape scenes (default) or Fashion-MNIST from Debian's package",
    )
    p.add_argument(
        "--prompts-per-kind", type=int, default=10, help="held-out prompts per GenEval kind (default 10)"
    )
    p.add_argument("--captions", type=int, default=48, help="held-out images to caption (default 48)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another --out")
    if args.minutes <= 0:
        raise ValueError("--minutes must be > 0")
    result = run_demo(out, args.minutes, args.seed, args.prompts_per_kind, args.captions, args.dataset)
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
