"""Run an experiment: shared assets once, then every point (arm x budget x seed), resumably.

An experiment directory holds::

    plan.json             the points, their steps and FLOPs, the machine's measured speeds
    shared/               tokenizer, KL-VAE and/or VQ tokenizer, latent caches (one per seed), the FD classifier
    points/ARM-bB-sS/     the run (model/), its metrics (point.json), sample grid (samples.png)
                          and the grid's prompts (samples.json)
    results.json          every point, means and spreads over seeds, the verdicts
    experiment.html       plots, tables, sample grids side by side, verdicts; plots/*.png

``--resume`` reuses plan.json: finished points are not trained again, an interrupted one continues
from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfusion.config import Config
from transfusion.errors import UserError
from transfusion.experiments.definitions import EXPERIMENT_MODEL, Arm, Experiment
from transfusion.io import atomic_write_text
from transfusion.recipe import POOL, TOKENIZER_VOCAB, VAE_GRAD_CLIP, VAE_LR, demo_config, note

FORTUNES = "/usr/share/games/fortunes"
"""Debian's ``fortunes`` package: the text corpus of the experiments that score text."""
SHARED_SHARE = 0.08
"""Share of the budget for each shared autoencoder (the KL-VAE, the VQ tokenizer)."""
TEXT_ONLY_RATIO = 0.3
"""Share of training samples that are text documents, when the experiment mixes a corpus in."""


@dataclass(frozen=True)
class Point:
    arm: Arm
    budget: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.arm.name}-b{self.budget:g}-s{self.seed}"


@dataclass
class Settings:
    """What the command line chose (stored in plan.json, so that a resumed run keeps it)."""

    minutes: float
    seeds: int
    budgets: list[float]
    prompts_per_kind: int
    captions: int
    overrides: list[str]
    sample_steps: int | None = None
    dataset: str = "shapes"
    """'shapes' or 'fashion_mnist' (``definitions.for_dataset``)."""


def points(exp: Experiment, settings: Settings) -> list[Point]:
    """Smaller budgets first, then seeds, then arms: a stopped run has its cheap points complete."""
    return [Point(arm, b, s) for b in settings.budgets for s in range(settings.seeds) for arm in exp.arms]


def point_config(
    exp: Experiment, arm: Arm, seed: int, steps: int, shared: Path, settings: Settings
) -> Config:
    """The config of one point: the demo's data and recipe, the experiment's model, the arm's knob."""
    from transfusion.autoencoders import load_vae

    text = [f"data.text_path={json.dumps(fortunes_path())}", f"data.text_only_ratio={TEXT_ONLY_RATIO}",
            "data.truncate=true"] if exp.text_corpus else []  # fmt: skip
    vae = load_vae(autoencoder_dir(shared, arm.discrete))
    codes = [f"model.codebook_size={vae.config.codebook_size}"] if arm.discrete else []
    overrides = [*EXPERIMENT_MODEL, *exp.base, *codes, *arm.overrides, *text, *settings.overrides]
    cache = latent_dir(shared, arm.discrete, seed)
    cfg = demo_config(
        steps, seed, exp.dataset, str(shared / "tokenizer" / "tokenizer.json"), str(cache), overrides
    )
    cfg.vae = dataclasses.replace(vae.config, path=None)
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, steps // 10))
    cfg.train.ckpt_every = max(50, steps // 4)
    cfg.train.eval_every = 0
    return cfg


def fortunes_path() -> str:
    if not Path(FORTUNES).is_dir():
        raise ValueError(
            f"this experiment mixes in Debian's fortunes as its text corpus and {FORTUNES} is missing: "
            "apt-get install fortunes (make system does)"
        )
    return FORTUNES


# --- shared assets ---------------------------------------------------------------------------------------
def prepare_shared(exp: Experiment, shared: Path, settings: Settings, vae_steps: int) -> None:
    """Tokenizer, the autoencoders the arms need, their latent caches (each skipped when present)."""
    from transfusion.autoencoders import load_vae
    from transfusion.config import DataConfig, VAEConfig
    from transfusion.data.latents import build_latents
    from transfusion.data.sources import make_source, source_texts
    from transfusion.tokenizer import train_bpe
    from transfusion.training import image_encoder
    from transfusion.training.vae import load_images, train_vae
    from transfusion.vae import vae_hash

    shared.mkdir(parents=True, exist_ok=True)
    data = dataset_config(exp.dataset)
    if not (shared / "tokenizer" / "tokenizer.json").is_file():
        texts = source_texts(data, POOL)
        if exp.text_corpus:
            texts += source_texts(DataConfig(source="text", path=fortunes_path()), 5000)
        train_bpe(texts, TOKENIZER_VOCAB, shared / "tokenizer")
        note(f"shared: tokenizer ({len(texts)} texts)")
    kinds = sorted({"vq" if arm.discrete else "kl" for arm in exp.arms})
    images = {split: load_images(data, split, n) for split, n in (("train", 4096), ("val", 256))}
    for kind in kinds:
        directory = autoencoder_dir(shared, kind == "vq")
        if not (directory / "vae.json").is_file():
            cfg = VAEConfig(kind=kind, image_size=32, downsample=4, latent_channels=8, base_channels=16)
            note(f"shared: {'VQ tokenizer' if kind == 'vq' else 'KL-VAE'}, {vae_steps} steps")
            result = train_vae(
                cfg,
                images["train"],
                images["val"],
                directory,
                steps=vae_steps,
                lr=VAE_LR,
                grad_clip=VAE_GRAD_CLIP,
            )
            note(f"        held-out PSNR {result['psnr_val']:.1f} dB")
        vae = load_vae(directory)
        for seed in range(settings.seeds):
            pool = dataclasses.replace(data, seed=seed)
            cache = latent_dir(shared, kind == "vq", seed)
            # Fashion-MNIST: its whole training split, as training reads it
            count = POOL if exp.dataset == "shapes" else None
            build_latents(make_source(pool, "train"), image_encoder(vae, "cpu"), vae_hash(vae), cache, count)
    if exp.dataset == "fashion_mnist" and not judge_path(shared).is_file():
        from transfusion.evaluation.fashion import load_judge

        acc = load_judge(judge_path(shared), data, JUDGE_STEPS).test_accuracy
        note(
            f"shared: the judge (a CNN trained on the 55,000 real training images), {acc:.3f} on the 10,000 test images"
        )


def dataset_config(dataset: str) -> Any:
    """The data every shared asset is made from: the scene pool, or Fashion-MNIST at 32 pixels."""
    from transfusion.config import DataConfig

    if dataset == "fashion_mnist":
        return DataConfig(source="fashion_mnist", image_size=32)
    return DataConfig(source="shapes", image_size=32, length=POOL)


JUDGE_STEPS = 2200
"""Training steps of Fashion-MNIST's judge (``evaluation.fashion.train_fashion_classifier``: 0.915 on
the real test images in about 100 s)."""


def judge_path(shared: Path) -> Path:
    """Fashion-MNIST's judge, trained once per experiment (``evaluation.fashion.load_judge``)."""
    return shared / "judge-fashion.safetensors"


def autoencoder_dir(shared: Path, discrete: bool) -> Path:
    """The shared VQ tokenizer (discrete arms) or KL-VAE."""
    return shared / ("vq" if discrete else "vae")


def latent_dir(shared: Path, discrete: bool, seed: int) -> Path:
    """The latent cache of one seed's scene pool (a point's seed picks its pool, as the demo's does):
    one per seed, so that points of different seeds do not re-encode a shared one in turn."""
    return shared / f"latents-{'vq' if discrete else 'kl'}-s{seed}"


# --- planning ----------------------------------------------------------------------------------------------
CALIBRATION_STEPS = 40
"""Steps of the real training loop each arm runs to measure its speed (the first ``log_every`` are
warm-up and not counted)."""


def measure_arm(exp: Experiment, arm: Arm, shared: Path, settings: Settings) -> tuple[float, float]:
    """(training GFLOP per step, seconds per step here) of an arm: a short run of the training loop
    itself, so that the data loader, logging and checkpointing are in the time (the bare optimizer
    step alone was 20-30% faster than the loop, and plans ran over by as much)."""
    import tempfile

    from transfusion.evaluation.report import read_metrics_log
    from transfusion.training import train

    cfg = point_config(exp, arm, 0, CALIBRATION_STEPS, shared, settings)
    cfg.train.log_every = 10
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(cfg, run, vae=str(autoencoder_dir(shared, arm.discrete)), progress=False)
        rows = read_metrics_log(run / "metrics.jsonl")
    return loop_speed(rows)


def loop_speed(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(GFLOP per step, seconds per step) between the first and the last logged step of a run's
    ``metrics.jsonl`` rows (the steps before the first log are warm-up)."""
    logged = [r for r in rows if "elapsed_s" in r and "flops_seen" in r]
    if len(logged) < 2:
        raise ValueError("the calibration run logged fewer than two steps; raise CALIBRATION_STEPS")
    a, b = logged[0], logged[-1]
    steps = b["step"] - a["step"]
    return (b["flops_seen"] - a["flops_seen"]) / steps / 1e9, (b["elapsed_s"] - a["elapsed_s"]) / steps


def eval_seconds(exp: Experiment, arm: Arm, settings: Settings) -> float:
    """What one point's evaluation costs here, roughly (measured on 2 CPU cores at the experiment's
    size): per image 0.12 s with 250 denoising steps and guidance (0.05 s for 64 codes), per caption
    0.05 s, 15 s of fixed costs; every extra guidance weight samples the images again. Prompts are
    per GenEval kind (6) on the scenes, per class (10) on Fashion-MNIST."""
    readings = len(exp.cfg_scales) + (exp.interval_reading is not None and not arm.discrete)
    kinds = 10 if exp.dataset == "fashion_mnist" else 6
    images = kinds * settings.prompts_per_kind * readings
    per_image = 0.05 if arm.discrete else 0.12 * (settings.sample_steps or 250) / 250
    return images * per_image + settings.captions * 0.05 + 15


def make_plan(exp: Experiment, shared: Path, settings: Settings, spent: float) -> dict[str, Any]:
    """Measure every arm, then size the FLOP unit so that training and evaluation of every point fit
    what is left of ``settings.minutes`` after the shared assets (``spent`` seconds)."""
    speeds = {arm.name: measure_arm(exp, arm, shared, settings) for arm in exp.arms}
    pts = points(exp, settings)
    evals = sum(eval_seconds(exp, p.arm, settings) for p in pts)
    left = settings.minutes * 60 - spent - evals
    if left <= 0:
        raise ValueError(
            f"--minutes {settings.minutes:g} leaves no time to train after the shared assets ({spent:.0f} s) and "
            f"evaluation ({evals:.0f} s); give more minutes, fewer --seeds or --budgets, or fewer prompts"
        )
    # seconds of point p = budget_p * unit / (GFLOP/s of its arm): solve for the unit
    unit = left / sum(p.budget * speeds[p.arm.name][1] / speeds[p.arm.name][0] for p in pts)
    rows = [plan_row(exp, p, unit, speeds[p.arm.name], settings) for p in pts]
    return {
        "experiment": exp.name,
        "settings": dataclasses.asdict(settings),
        "unit_gflop": unit,
        "speeds": {
            k: {"gflop_per_step": g, "seconds_per_step": s, "gflops": g / s} for k, (g, s) in speeds.items()
        },
        "shared_seconds": spent,
        "points": rows,
    }


def plan_row(
    exp: Experiment, p: Point, unit: float, speed: tuple[float, float], settings: Settings
) -> dict[str, Any]:
    """One point of the plan: its steps at ``unit`` GFLOP a budget and its arm's (GFLOP, seconds) a step."""
    gflop, sec = speed
    steps = max(10, round(p.budget * unit / gflop))
    return {"id": p.id, "arm": p.arm.name, "budget": p.budget, "seed": p.seed, "steps": steps,
            "gflop": steps * gflop, "train_seconds_est": steps * sec,
            "eval_seconds_est": eval_seconds(exp, p.arm, settings)}  # fmt: skip


def extend_plan(exp: Experiment, plan: dict[str, Any], budgets: list[float], seeds: int) -> dict[str, Any]:
    """``plan`` with points for budgets and seeds it does not hold yet, sized with its own FLOP unit and
    measured speeds (so that a later sitting adds a larger budget or a seed to an experiment without
    changing the points already run)."""
    settings = Settings(**plan["settings"])
    settings.budgets = sorted(set(settings.budgets) | set(budgets))
    settings.seeds = max(settings.seeds, seeds)
    have = {r["id"] for r in plan["points"]}
    speeds = {k: (v["gflop_per_step"], v["seconds_per_step"]) for k, v in plan["speeds"].items()}
    new = [plan_row(exp, p, plan["unit_gflop"], speeds[p.arm.name], settings)
           for p in points(exp, settings) if p.id not in have]  # fmt: skip
    order = {p.id: i for i, p in enumerate(points(exp, settings))}
    rows = sorted([*plan["points"], *new], key=lambda r: order[r["id"]])
    return {**plan, "settings": dataclasses.asdict(settings), "points": rows}


def plan_table(plan: dict[str, Any]) -> str:
    lines = [f"{'point':<28} {'steps':>7} {'TFLOP':>8} {'train':>8} {'eval':>6}"]
    for r in plan["points"]:
        lines.append(f"{r['id']:<28} {r['steps']:>7} {r['gflop'] / 1e3:>8.1f} "
                     f"{r['train_seconds_est'] / 60:>7.1f}m {r['eval_seconds_est'] / 60:>5.1f}m")  # fmt: skip
    total = plan["shared_seconds"] + sum(
        r["train_seconds_est"] + r["eval_seconds_est"] for r in plan["points"]
    )
    lines.append(f"shared assets {plan['shared_seconds'] / 60:.1f} min; about {total / 60:.0f} min in all")
    return "\n".join(lines)


# --- one point -------------------------------------------------------------------------------------------
def run_point(
    exp: Experiment, row: dict[str, Any], shared: Path, out: Path, settings: Settings
) -> dict[str, Any]:
    """Train (or finish training) one point, evaluate it, write point.json."""
    from transfusion.training import train

    arm = next(a for a in exp.arms if a.name == row["arm"])
    d = out / "points" / row["id"]
    cfg = point_config(exp, arm, row["seed"], row["steps"], shared, settings)
    run = d / "model"
    resume = (run / "latest").is_file()
    t0 = time.time()
    result = train(cfg, run, vae=str(autoencoder_dir(shared, arm.discrete)), resume=resume, progress=True)
    train_seconds = time.time() - t0
    metrics = evaluate_point(exp, run, d, settings)
    point = {**row, "flops": result["flops_seen"], "train_seconds": train_seconds, "metrics": metrics}
    atomic_write_text(d / "point.json", json.dumps(point, indent=2))
    return point


def evaluate_point(exp: Experiment, run: Path, d: Path, settings: Settings) -> dict[str, Any]:
    """The dataset's evaluation at the experiment's main guidance weight (plus, for a sweep, the image
    metrics at every other weight); held-out fortunes' bits per byte when text is mixed in; the
    denoising loss by timestep band and patch position (diffusion arms); a grid of the first
    generated images."""
    from transfusion.evaluation.text import text_scores
    from transfusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(run, "cpu")
    main = exp.eval_cfg if exp.eval_cfg in exp.cfg_scales or len(exp.cfg_scales) == 1 else exp.cfg_scales[0]
    if exp.dataset == "fashion_mnist":
        metrics, pairs = fashion_evaluation(pipe, main, d, settings)
    else:
        from transfusion.evaluation.shapes import evaluate

        metrics, details = evaluate(pipe, d, settings.prompts_per_kind, settings.captions, settings.sample_steps,
                                    None, main, 0, None, fd_cache=d.parent.parent / "shared")  # fmt: skip
        pairs = details["pairs"]
    if pipe.model.cfg.image_tokens == "continuous":
        metrics.update(denoising(pipe, exp))
    shown = pairs[:: max(1, settings.prompts_per_kind)][:12]  # one prompt of each kind first
    save_grid([im for _, im in shown], d / "samples.png")
    atomic_write_text(d / "samples.json", json.dumps([p.text for p, _ in shown]))
    if exp.text_corpus:
        from transfusion.config import DataConfig
        from transfusion.data.sources import TextFiles

        docs = TextFiles(DataConfig(val_fraction=0.02), "val", fortunes_path()).docs[:300]
        fortune = text_scores(pipe.model, pipe.tokenizer, docs)
        metrics["fortune_bits_per_byte"] = fortune["text_bits_per_byte"]
    by_cfg = {f"{main:g}": metrics}
    dec = pipe.decoder
    for scale in exp.cfg_scales:
        if f"{scale:g}" in by_cfg:
            continue
        gen = pipe.settings(steps=settings.sample_steps, guidance=scale)
        if exp.dataset == "fashion_mnist":
            by_cfg[f"{scale:g}"] = fashion_images(pipe, gen, d, settings)[0]
        else:
            by_cfg[f"{scale:g}"] = image_reading(dec, pipe.vae, gen, d, settings)
    if exp.interval_reading is not None:
        metrics.update(interval_reading(exp.interval_reading, dec, pipe.vae, main, d, settings, metrics))
    return {**metrics, "by_cfg": by_cfg}


HELD_OUT_PAIRS = 256
"""Held-out image-caption pairs the denoising loss is read on (each at 10 timesteps)."""


def denoising(pipe: Any, exp: Experiment, caption: bool = True) -> dict[str, Any]:
    """``evaluation.denoising`` on held-out pairs: Fashion-MNIST's first test images, or scenes
    rendered from the seed the shapes evaluation holds out for text (300); without their captions
    with ``caption=False``."""
    from transfusion.data.sources import make_source
    from transfusion.evaluation.denoising import denoising_profile

    source = make_source(
        dataclasses.replace(dataset_config(exp.dataset), seed=300),
        "test" if exp.dataset == "fashion_mnist" else "val",
    )
    return denoising_profile(pipe, [source[i] for i in range(HELD_OUT_PAIRS)], caption=caption)


def fashion_images(pipe: Any, gen: Any, d: Path, settings: Settings) -> tuple[dict[str, Any], list]:
    """Fashion-MNIST's image metrics (``evaluation.fashion.judged_images``) of the images ``gen``
    draws, by the experiment's judge, with the wall seconds per image."""
    from transfusion.evaluation.fashion import judged_images, load_judge

    judge = load_judge(judge_path(d.parent.parent / "shared"), dataset_config("fashion_mnist"))
    t0 = time.time()
    read, pairs = judged_images(pipe.decoder, pipe.vae, gen, settings.prompts_per_kind, judge)
    read["sample_seconds_per_image"] = (time.time() - t0) / len(pairs)
    read["judge_test_accuracy"] = judge.test_accuracy
    return read, pairs


def fashion_evaluation(pipe: Any, scale: float, d: Path, settings: Settings) -> tuple[dict[str, Any], list]:
    """Images at guidance ``scale`` judged (``fashion_images``) and captions of held-out test images
    (the class named); writes metrics.json beside the point."""
    from transfusion.evaluation.fashion import caption_accuracy

    t0 = time.time()
    gen = pipe.settings(steps=settings.sample_steps, guidance=scale)
    metrics, pairs = fashion_images(pipe, gen, d, settings)
    metrics["caption_accuracy"], _ = caption_accuracy(
        pipe.decoder, pipe.vae, dataset_config("fashion_mnist"), settings.captions
    )
    metrics.update({"eval_sampler": gen.sampler, "eval_steps": gen.steps, "eval_cfg": gen.cfg_scale,
                    "eval_seconds": time.time() - t0})  # fmt: skip
    atomic_write_text(d / "metrics.json", json.dumps(metrics, indent=2))
    return metrics, pairs


INTERVAL_METRICS = ("geneval_overall", "geneval_blank_rate", "geneval_well_formed", "fd_project_classifier",
                    "precision_project_classifier", "recall_project_classifier")  # fmt: skip


def interval_reading(
    max_t: int, dec: Any, vae: Any, scale: float, d: Path, settings: Settings, first: dict[str, Any]
) -> dict[str, Any]:
    """Composition and FD of images drawn again with guidance only at t <= ``max_t`` (a guidance
    interval), as ``<metric>_interval``. A model of VQ codes has no timesteps: its reading
    is the first one."""
    from transfusion.generate import GenerationConfig

    if dec.model.cfg.image_tokens == "discrete":
        return {f"{m}_interval": first[m] for m in INTERVAL_METRICS if m in first}
    gen = dec.settings(GenerationConfig(steps=settings.sample_steps, cfg_scale=scale, guidance_max_t=max_t))
    read = image_reading(dec, vae, gen, d, settings)
    return {f"{m}_interval": read[m] for m in INTERVAL_METRICS if m in read}


def image_reading(dec: Any, vae: Any, gen: Any, d: Path, settings: Settings) -> dict[str, Any]:
    """Composition (``geneval_*``) and FD with precision and recall of the images ``gen`` draws for the
    evaluation's prompts (the same prompts as the main evaluation: seed 100)."""
    from transfusion.evaluation.shapes import composition, frechet

    comp, _, pairs = composition(dec, vae, settings.prompts_per_kind, gen, vae.config.image_size, 100)
    read = {f"geneval_{k}": v for k, v in comp.items()}
    read.update(frechet(pairs, vae.config.image_size, None, d.parent.parent / "shared"))
    return read


def save_grid(images: list, path: Path, cell: int = 64) -> None:
    from PIL import Image

    grid = Image.new("RGB", (cell * max(1, len(images)), cell), "white")
    for i, im in enumerate(images):
        grid.paste(im.resize((cell, cell), Image.NEAREST), (i * cell, 0))
    grid.save(path)


# --- the whole experiment --------------------------------------------------------------------------------
def run_experiment(
    exp: Experiment, out: Path, settings: Settings, resume: bool = False, extend: bool = False
) -> dict[str, Any]:
    """Shared assets, the plan (shown before any point trains), every point not yet done, then
    results.json and the page. Returns the results. With ``resume`` and ``extend``, ``settings``'
    budgets and seeds are added to the plan's (``extend_plan``)."""
    from transfusion.experiments.definitions import for_dataset
    from transfusion.experiments.page import write_results

    exp = for_dataset(exp, settings.dataset)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    if resume and plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        planned = Settings(**plan["settings"])
        if planned.dataset != settings.dataset:
            raise UserError(
                f"{out} holds an experiment on {planned.dataset}; resume it with --dataset {planned.dataset}"
            )
        if extend:
            plan = extend_plan(exp, plan, settings.budgets, settings.seeds)
            atomic_write_text(plan_file, json.dumps(plan, indent=2))
        settings = Settings(**plan["settings"])
        note(f"resuming {exp.name} in {out}")
    else:
        t0 = time.time()
        vae_steps = max(50, round(SHARED_SHARE * settings.minutes * 60 * 13.5))
        prepare_shared(exp, out / "shared", settings, min(vae_steps, 1500))
        plan = make_plan(exp, out / "shared", settings, time.time() - t0)
        atomic_write_text(plan_file, json.dumps(plan, indent=2))
    note(f"{exp.title}\n{plan_table(plan)}")
    prepare_shared(exp, out / "shared", settings, 1)  # present already; rebuilt only if deleted
    for row in plan["points"]:
        if (out / "points" / row["id"] / "point.json").is_file():
            continue
        note(f"--- {row['id']}: {row['steps']} steps, {row['gflop'] / 1e3:.1f} TFLOP")
        run_point(exp, row, out / "shared", out, settings)
    return write_results(exp, out, plan)
