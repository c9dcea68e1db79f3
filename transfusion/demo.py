"""The whole recipe on built-in data, within a time budget: train a tokenizer, a VAE and then a
Transfusion model on caption/image pairs of synthetic shape scenes, generate images for held-out
prompts, caption held-out images, evaluate, and write ``report.html``.

The schedule follows ``--minutes``, and only it: the VAE's and the model's shares of the budget
(``SHARES``) are turned into step counts with the speeds of the reference machine (``REFERENCE``: 2
CPU cores), the model's through its training FLOPs per step (``flops``). So the same command trains
the same number of steps whatever else the machine is doing, and runs with different seeds compare;
a machine much slower than the reference is told so (the run then takes longer), and ``--calibrate``
fits the steps to the machine's measured speed instead. Evaluation costs about the same whatever the
budget (``eval_seconds``): short budgets hold that back first and shrink the other shares. What the
demo chooses, and why (measured on 2 CPU cores, see the README):

- a byte-level BPE tokenizer trained on the captions (``train-tokenizer``), as the paper's Llama-2
  BPE makes every caption word one token: shorter sequences, and conditioning the trunk reads easily;
- the U-Net patcher (the paper's better image edges at small scale, Table 7) with 4x4 patches of the
  8x8 latent: 4 positions an image instead of 16, so a step holds twice the images for the same FLOPs
  (the paper's Table 6: U-Net edges lose little with larger patches), its convolutions at 32 channels;
- 2D RoPE for the patches (``model.rope_2d``): rows and columns apart, which colour attribution and
  captions needed (one run each: overall composition 0.54 -> 0.64, colour attribution 0.10 -> 0.45);
- on shape scenes, a rectified-flow (velocity) objective instead of the paper's noise prediction
  (``diffusion.objective``): an epsilon model weighs the clean image's error by the signal-to-noise
  ratio, so the noisiest steps, where objects are placed and coloured, teach it almost nothing. A
  diffusion-classifier probe (``benchmarks/binding_probe.py``) found the epsilon model's denoising
  error the same with the true caption as with the colours swapped between the objects; the flow
  model's is 24-110% lower with the true one. One seed each: colour attribution 0.10 -> 0.77, overall
  composition 0.58 -> 0.82, FD 311 -> 169 (README, "What limited quality");
- on shape scenes, every two-object caption in reading order (``recipe.READING_ORDER``: the upper or
  left object named first, in relation captions and "and" captions alike; prompts with "below" or "to
  the right of" are given to the model in reading order, the same scene): the order of the words says
  where each object goes, and colours bind to shapes by it. Three seeds: colour attribution 0.67-0.90
  -> 0.97, overall composition 0.82-0.85 -> 0.96-0.97, strict caption accuracy 0.89-0.94 -> 0.95-1.00,
  position 0.33-0.47 -> 0.90-1.00 (0.40-0.43 with the prompts as written). Relation captions alone in
  reading order cost colour attribution (0.40-0.73) instead;
- a VAE 16 channels wide at lr 5e-3 (35 dB in its share, against 19-26 dB at 32 channels), its
  gradient norm capped at 1 (``VAE_GRAD_CLIP``: only spikes reach it);
- 3 layers of width 256 rather than the small preset's 6: in a fixed budget the smaller trunk takes
  twice the steps, and steps are what this budget lacks;
- image-first (captioning) pairs 25% of the time rather than the paper's 20%: captioning learns
  from those pairs only, and at this budget it gains more than generation loses;
- a pool of 20,000 scenes encoded once into a latent cache, instead of running the VAE encoder on
  every batch (pairing, conditioning dropout and noise still change every pass);
- evaluation with 250 sampling steps (Euler for the flow model, the paper's DDPM ancestral sampler
  on Fashion-MNIST) and guidance 3, on shape scenes only at t <= 850 (``GUIDANCE_MAX_T``).
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

from transfusion.bench import timed
from transfusion.config import Config
from transfusion.evaluation.report import write_report
from transfusion.io import atomic_write_text
from transfusion.recipe import GUIDANCE_MAX_T, POOL, TOKENIZER_VOCAB, VAE_GRAD_CLIP, VAE_LR, demo_config, note

__all__ = [
    "GUIDANCE_MAX_T",
    "POOL",
    "TOKENIZER_VOCAB",
    "VAE_GRAD_CLIP",
    "VAE_LR",
    "demo_config",
    "note",
    "run_demo",
]


SHARES = {"vae": 0.10, "train": 0.77}  # the rest: tokenizer, latent cache, evaluation
REFERENCE = {"vae_steps_per_s": 13.5, "train_gflops": 110.0}
"""Speeds of the reference machine (2 x86_64 CPU cores, fp32): VAE steps (batch 32) per second, and
training FLOP/s of the demo's model (``flops.batch_train_flops`` per step over seconds per step)."""


def calibrate_train(cfg: Config, encode: Any, cache: Any = None) -> tuple[float, float]:
    """(training GFLOP per step, seconds per step on this machine) of this model, on real batches
    with the training loop's own step."""
    from transfusion.data.loader import BatchLoader
    from transfusion.diffusion import make_schedule
    from transfusion.distributed import DistInfo
    from transfusion.flops import batch_train_flops
    from transfusion.model import Transfusion
    from transfusion.tokenizer import load_tokenizer
    from transfusion.training import make_optimizer, train_step
    from transfusion.training.parallelize import parallelize

    torch.manual_seed(cfg.train.seed)
    model = parallelize(
        Transfusion(cfg.model), cfg, DistInfo()
    ).model  # as training runs it (on the CPU: as is)
    opt = make_optimizer(model, cfg.train)
    loader = BatchLoader(cfg, load_tokenizer(cfg.train.tokenizer), encode, source=cache)
    schedule = make_schedule(cfg.diffusion)
    tc = cfg.train
    batches = [next(loader) for _ in range(8)]
    gflop = sum(batch_train_flops(cfg.model, b) for b in batches) / len(batches) / 1e9
    cycle = iter(batches * 2)

    def step() -> None:
        train_step(model, opt, [next(cycle)], schedule, cfg.diffusion, lr=tc.lr, grad_clip=tc.grad_clip)

    return gflop, timed(step, repeat=8, warmup=2)


def eval_seconds(source: str, prompts_per_kind: int, captions: int) -> float:
    """What evaluation costs whatever the budget, as measured on 2 CPU cores: about 0.3 s per image
    generated (250 guided steps, batched), 0.1 s per caption, and a fixed part (the shapes'
    feature classifier and text scoring, or the classifier that judges Fashion-MNIST images)."""
    if source == "fashion_mnist":
        return 0.3 * 10 * prompts_per_kind + 0.1 * captions + 35  # ten classes
    return 0.3 * 6 * prompts_per_kind + 0.1 * captions + 10  # six GenEval kinds


@dataclass
class Plan:
    """How the demo shares out its budget (seconds) and turns shares into step counts."""

    budget: float
    reserve: float  # evaluation's share (at least what it needs whatever the budget)
    fit: float  # the factor that shrinks the VAE's and the model's shares to fit the rest
    calibrate: bool = False  # step counts from this machine's measured speed instead of the reference's

    @classmethod
    def make(
        cls, minutes: float, source: str, prompts_per_kind: int, captions: int, calibrate: bool = False
    ) -> Plan:
        budget = minutes * 60
        # evaluation does not shrink with the budget: hold back what it needs, and shrink the VAE's and
        # the Transfusion model's shares to fit (the default 15 minutes hold back more than it needs)
        reserve = max(
            (1 - SHARES["vae"] - SHARES["train"]) * budget, eval_seconds(source, prompts_per_kind, captions)
        )
        fit = max(0.0, budget - reserve) / ((SHARES["vae"] + SHARES["train"]) * budget)
        return cls(budget, reserve, fit, calibrate)

    def seconds(self, stage: str) -> float:
        return SHARES[stage] * self.budget * self.fit

    def vae_steps(self, measured_steps_per_s: float | None = None) -> int:
        speed = (
            measured_steps_per_s if self.calibrate and measured_steps_per_s else REFERENCE["vae_steps_per_s"]
        )
        return max(50, round(self.seconds("vae") * speed))

    def train_steps(self, gflop_per_step: float, measured_s_per_step: float) -> int:
        """The model's steps: its share of the budget at the reference machine's FLOP rate (or, with
        ``calibrate``, at this machine's measured step time)."""
        per_step = measured_s_per_step if self.calibrate else gflop_per_step / REFERENCE["train_gflops"]
        return max(20, round(self.seconds("train") / per_step))


def run_demo(
    out: Path,
    minutes: float,
    seed: int = 0,
    eval_prompts_per_kind: int = 30,
    n_captions: int = 100,
    source: str = "shapes",
    overrides: list[str] | None = None,
    calibrate: bool = False,
    edit_minutes: float = 0.0,
) -> dict:
    """The five stages in order: tokenizer, VAE, latent cache, Transfusion model, evaluation and the
    report; returns {"metrics", "report", "timings"}. With ``edit_minutes`` (shape scenes), a sixth:
    the model fine-tuned on image edits (``edit_stage``), judged in the report."""
    plan = Plan.make(minutes, source, eval_prompts_per_kind, n_captions, calibrate)
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
        vae, vae_result = make_vae(cfg, out, seed, plan)
    cfg.vae = vae.config
    with _timed(timings, "latent cache"):
        encode, cache = make_latent_cache(cfg, vae, cache_dir)
    with _timed(timings, "transfusion training"):
        cfg = train_model(cfg, out, seed, source, tokenizer_path, cache_dir, overrides, encode, cache, plan)
    with _timed(timings, "evaluation"):
        metrics, details, loaded = evaluate_demo(out, eval_prompts_per_kind, n_captions, vae_result)
    if edit_minutes:
        with _timed(timings, "editing (fine-tuning and evaluation)"):
            edit_metrics, edit_details = edit_stage(out, seed, edit_minutes)
        metrics.update(edit_metrics)
        details.update(edit_details)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
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


def make_vae(cfg: Config, out: Path, seed: int, plan: Plan) -> tuple[Any, dict]:
    """Stage 2: the VAE, its share of the budget in steps at the reference speed (or, with
    ``--calibrate``, at this machine's)."""
    from transfusion.training.vae import load_images, train_vae

    train_images = load_images(cfg.data, "train", 4096)
    val_images = load_images(cfg.data, "val", 256)
    measured = 1 / timed(_vae_probe(cfg, train_images), repeat=5, warmup=1) if plan.calibrate else None
    steps = plan.vae_steps(measured)
    note(f"[2/5] VAE on {cfg.data.source}: {steps} steps ({plan.seconds('vae'):.0f} s of the budget)")
    result = train_vae(
        cfg.vae,
        train_images,
        val_images,
        out / "vae",
        steps=steps,
        lr=VAE_LR,
        seed=seed,
        grad_clip=VAE_GRAD_CLIP,
    )
    note(f"      held-out PSNR {result['psnr_val']:.1f} dB")
    return result["vae"], {**result, "steps": steps}


def _vae_probe(cfg: Config, images: torch.Tensor) -> Callable[[], None]:
    """One VAE training step on a fixed batch (for ``--calibrate``)."""
    from transfusion.vae import KLVAE

    probe = KLVAE(cfg.vae)
    opt = torch.optim.AdamW(probe.parameters())

    def step() -> None:
        loss, _, _ = probe.loss(images[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def make_latent_cache(cfg: Config, vae: Any, cache_dir: str | None) -> tuple[Any, Any]:
    """Stage 3: the pool of training scenes through the encoder, once (shapes only); returns the
    image encoder and the cache (None for sources encoded as batches need them)."""
    from transfusion.data.latents import LatentShards, build_latents
    from transfusion.data.sources import make_source
    from transfusion.training import image_encoder
    from transfusion.vae import vae_hash

    encode = image_encoder(vae, torch.device("cpu"))
    if cache_dir is None:
        note("[3/5] latent cache: not used for this source (images are encoded as batches need them)")
        return encode, None
    note(f"[3/5] latent cache: {POOL} scenes through the VAE encoder")
    build_latents(make_source(cfg.data, "train"), encode, vae_hash(vae), cache_dir, POOL)
    return encode, LatentShards(cache_dir, vae_hash(vae))


def train_model(
    cfg: Config, out: Path, seed: int, source: str, tokenizer_path: str | None, cache_dir: str | None,
    overrides: list[str] | None, encode: Any, cache: Any, plan: Plan,
) -> Config:  # fmt: skip
    """Stage 4: the Transfusion model, its share of the budget in steps: training FLOPs per step (real
    batches) at the reference machine's FLOP rate. A machine much slower than the reference is told
    so; with ``--calibrate`` the steps follow this machine's measured step time instead."""
    from transfusion.training import train

    gflop, per_step = calibrate_train(cfg, encode, cache)
    steps = plan.train_steps(gflop, per_step)
    expected = gflop / REFERENCE["train_gflops"]
    if not plan.calibrate and per_step > 1.3 * expected:
        note(f"note: this machine trains at {gflop / per_step:.0f} GFLOP/s, the reference at "
             f"{REFERENCE['train_gflops']:.0f}: training will take about {steps * per_step / 60:.0f} min instead "
             f"of {steps * expected / 60:.0f} (the steps follow the budget so that runs compare; --calibrate "
             "fits them to this machine)")  # fmt: skip
    vae_config = cfg.vae
    cfg = demo_config(steps, seed, source, tokenizer_path, cache_dir, overrides)
    cfg.vae = vae_config
    m = cfg.model
    note(f"[4/5] Transfusion ({m.dim} wide, {m.n_layers} layers, {m.patcher} patcher, patch {m.patch_size}): "
         f"{steps} steps of {gflop:.1f} GFLOP ({per_step:.2f} s each here)")  # fmt: skip
    train(cfg, out / "model", vae=str(out / "vae"), progress=True)
    return cfg


def evaluate_demo(
    out: Path, prompts_per_kind: int, captions: int, vae_result: dict
) -> tuple[dict, dict, Any]:
    """Stage 5: generate, caption and score held-out data with the trained checkpoint."""
    from transfusion.evaluation import evaluate_checkpoint
    from transfusion.pipeline import Pipeline

    note("[5/5] generating, captioning and scoring held-out data")
    pipe = Pipeline.from_pretrained(out / "model", "cpu")
    metrics, details = evaluate_checkpoint(pipe, out, prompts_per_kind, captions)
    metrics["vae_psnr_val"] = round(vae_result["psnr_val"], 3)
    metrics["vae_steps"] = vae_result["steps"]
    metrics["train_steps"] = int(pipe.meta["step"])
    metrics["params_M"] = round(pipe.model.num_params() / 1e6, 3)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics, details, pipe


EDIT_SECONDS_PER_STEP = 0.33
"""Seconds per fine-tuning step on edits (16 rows of 128 positions) on the reference machine."""
EDIT_TRAIN_SHARE = 0.75
EDIT_PER_KIND = 10
EDIT_ARM = {"lora_rank": 32, "lr": 2e-3}
"""The demo's editing arm (``experiment edit`` compares it with full fine-tuning and rank 4)."""


def edit_stage(out: Path, seed: int, minutes: float) -> tuple[dict, dict]:
    """Stage 6 (``--edit``): the demo's model fine-tuned with LoRA on shape-scene edits (``data/edits.py``)
    for its share of ``minutes`` (steps at the reference machine's speed), then asked to make held-out
    edits: per kind, the share whose named object changed as instructed (edit) and whose other objects
    stayed (kept), beside the input returned unchanged and the model before fine-tuning."""
    from transfusion.data.edits import edit_eval_items
    from transfusion.experiments.edit import judge_images, judge_outputs, per_kind
    from transfusion.pipeline import Pipeline
    from transfusion.training import train

    steps = max(10, int(minutes * 60 * EDIT_TRAIN_SHARE / EDIT_SECONDS_PER_STEP))
    note(f"[6/6] editing: LoRA rank {EDIT_ARM['lora_rank']} on 8000 shape-scene edits, {steps} steps")
    cfg = Config()
    cfg.train.init_checkpoint, cfg.train.lora_rank = str((out / "model").resolve()), EDIT_ARM["lora_rank"]
    cfg = cfg.override([f"train.steps={steps}", f"train.lr={EDIT_ARM['lr']}", f"train.min_lr={EDIT_ARM['lr'] / 10}",
                        f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=0", f"train.ckpt_every={steps}",
                        "train.batch_size=16", "train.seq_len=128", "data.source=shape-edits", "data.length=8000",
                        f"data.seed={seed}", f"train.seed={seed}"])  # fmt: skip
    train(cfg, out / "edit", progress=True)
    base = Pipeline.from_pretrained(out / "model", "cpu")
    pipe = Pipeline.from_pretrained(out / "edit", "cpu")
    items = edit_eval_items(EDIT_PER_KIND, image_size=pipe.image_size)
    rows = judge_outputs(pipe, items, seed, 250)
    before = judge_outputs(base, items, seed, 250)
    unchanged = judge_images(items, [r.image for r in items])
    scores = {
        "model": per_kind(rows),
        "before fine-tuning": per_kind(before),
        "input unchanged": per_kind(unchanged),
    }
    metrics = {f"edit_{m}": round(scores["model"]["all"][m], 3) for m in ("edit", "kept", "exact")}
    metrics["edit_steps"] = steps
    shown = [{"input": r.image, "text": r.text, "output": row["image"], "edit": row["edit"], "kept": row["kept"],
              "held_out": r.meta["held_out"]} for r, row in zip(items, rows)]  # fmt: skip
    what = (f"LoRA rank {EDIT_ARM['lora_rank']} on the model above, {steps} steps on 8000 edits (image, instruction, "
            f"image); {len(items)} held-out edits, half in combinations training never held. edit: the named object "
            "changed as instructed; kept: every other object unchanged.")  # fmt: skip
    return metrics, {"edits": shown, "edit_scores": scores, "edit_note": what}


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
    if metrics.get("eval_prompts_in_reading_order"):
        notes.append(
            "Trained on relation captions that name the upper or left object first, so prompts stating a "
            "relation were given to the model that way ('X below Y' as 'Y above X', the same scene) and judged "
            f"as written; given as written, position scores {metrics['geneval_position_as_written']:.2f} "
            f"(overall {metrics['geneval_overall_as_written']:.2f})."
        )
    if source == "shapes":
        notes.append(
            "FD uses the features of a small CNN the project trains on the scenes, not Inception: not comparable to FID."
        )
    return notes
