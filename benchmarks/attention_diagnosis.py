"""Why does causal image attention draw better images than bidirectional attention here, when the paper
finds the opposite? A reading of a finished ``transfusion experiment attention`` (or ``patcher``)
directory, on the models it trained, that separates the candidate causes:

- **the denoiser itself**: the held-out denoising loss with the caption and without it (BOS BOI image,
  the unconditional twin guidance subtracts), by band of t. Lower with bidirectional attention means
  the mask does what it should for the objective the model is trained on; the gap between the two
  (what the caption is worth to the denoiser) says how much each arm conditions on the text;
- **the guidance weight**: the same models' images judged at several weights (1 = no guidance), since
  guidance multiplies the conditional-minus-unconditional difference, which the mask can change;
- **the sampler**: the spread of the latents the sampler ends on against the real images' latents
  (about 1: the VAE's latents are scaled so), and along the way: the DDPM sampler's own trajectory
  (guided as the evaluation is, through the uncached forward, which the tests show equal to the cached
  decoder), with the spread of x_t and of the guided noise prediction at every 25th step. On the
  forward process both stay near 1 until t is small; a denoiser that predicts less noise than there is
  leaves it in, and x_t grows. ``--clip`` reads the images again with the predicted x0 clipped
  tighter than the default 4 (static thresholding), which holds such a trajectory near the data.

    python benchmarks/attention_diagnosis.py EXPERIMENT_DIR [--budget 4] [--guidance 1 3] [--clip 1]
        [--prompts-per-kind 30] [--steps 250]

Prints one table per reading (mean [range] over seeds, per arm) and writes
``attention_diagnosis.json`` in the experiment directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def diagnose(
    out: Path,
    budget: float | None,
    weights: list[float],
    clips: list[float],
    per_kind: int | None,
    steps: int,
) -> dict:
    """Every reading of every finished point at ``budget``: see the module docstring."""
    from transfusion.data.sources import make_source
    from transfusion.experiments import EXPERIMENTS, runner
    from transfusion.experiments.definitions import for_dataset
    from transfusion.pipeline import Pipeline
    from transfusion.vae import encode_images

    plan = json.loads((out / "plan.json").read_text())
    settings = runner.Settings(**plan["settings"])
    settings.sample_steps = steps
    if per_kind:
        settings.prompts_per_kind = per_kind
    exp = for_dataset(EXPERIMENTS[plan["experiment"]], settings.dataset)
    done = [r for r in plan["points"] if (out / "points" / r["id"] / "point.json").is_file()]
    if not done:
        raise SystemExit(f"{out} has no finished point yet")
    budget = budget if budget is not None else max(r["budget"] for r in done)
    held_out = make_source(
        runner.dataset_config(settings.dataset), "test" if settings.dataset == "fashion_mnist" else "val"
    )
    captions = [held_out[i].text for i in range(20)]  # the trajectory's prompts: held-out captions
    keys = ("class_accuracy", "fd_judge", "latent_std") if settings.dataset == "fashion_mnist" else (
        "geneval_overall", "fd_project_classifier", "geneval_blank_rate")  # fmt: skip
    rows, real_std = {}, None
    for r in (r for r in done if r["budget"] == budget):
        t0 = time.time()
        d = out / "points" / r["id"]
        pipe = Pipeline.from_pretrained(d / "model", "cpu")
        default_clip = pipe.decoder.dcfg.sample_clip
        readings = [(w, default_clip) for w in weights] + [
            (exp.eval_cfg, c) for c in clips if c != default_clip
        ]
        if real_std is None:
            real_std = float(encode_images(pipe.vae, [held_out[i].image for i in range(500)]).std())
        cond, uncond = runner.denoising(pipe, exp), runner.denoising(pipe, exp, caption=False)
        row = {"arm": r["arm"], "seed": r["seed"], "loss_by_t": cond["loss_by_t"], "uncond_by_t": uncond["loss_by_t"],
               "t": cond["loss_t_mids"], "image_val_loss": cond["image_val_loss"],
               "uncond_val_loss": uncond["image_val_loss"], "readings": {},
               "trajectory": trajectory(pipe, captions, exp.eval_cfg, steps, default_clip)}  # fmt: skip
        for w, clip in readings:
            pipe.decoder.dcfg.sample_clip = clip
            gen = pipe.settings(steps=steps, guidance=w)
            if settings.dataset == "fashion_mnist":
                read = runner.fashion_images(pipe, gen, d, settings)[0]
            else:
                read = runner.image_reading(pipe.decoder, pipe.vae, gen, d, settings)
            row["readings"][f"guidance {w:g}, clip {clip:g}"] = {k: read[k] for k in keys}
        pipe.decoder.dcfg.sample_clip = default_clip
        rows[r["id"]] = row
        print(f"{r['id']}: {time.time() - t0:.0f} s", file=sys.stderr)
    return {"experiment": plan["experiment"], "dataset": settings.dataset, "budget": budget, "steps": steps,
            "real_latent_std": real_std, "points": rows}  # fmt: skip


@torch.no_grad()
def trajectory(
    pipe, captions: list[str], scale: float, steps: int, clip: float | None, every: int = 25
) -> list[dict]:
    """DDPM ancestral sampling of one image per caption, guided at ``scale`` on every step, the
    predicted x0 clipped at ``clip`` as the decoder does: at every ``every``-th step (and the last)
    the spread of x_t, of the guided prediction and of the (clipped) x0 it implies."""
    import math

    from transfusion import diffusion
    from transfusion.sequence import Image, Sample, Specials, Text, pack, sample_length

    model, cfg, sp = pipe.model, pipe.model.cfg, Specials.of(pipe.tokenizer)
    n, schedule = cfg.patches_per_image, diffusion.make_schedule(pipe.config.diffusion)
    ids = [pipe.tokenizer.encode(c) for c in captions]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(ids), cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    ts = diffusion.sampling_timesteps(schedule.num_timesteps, steps)

    def predict(t: int, caption: bool) -> torch.Tensor:
        samples = [
            Sample([Text(a), Image(lat, t=t)] if caption else [Image(lat, t=t)]) for a, lat in zip(ids, x)
        ]
        batch = pack(samples, max(sample_length(s, n) for s in samples), sp, n, one_per_row=True)
        return model(batch.replace(latents=x, timesteps=torch.full((len(ids),), t))).image_pred

    out = []
    for i, t in enumerate(ts):
        eps = diffusion.guided(predict(t, True), predict(t, False), scale)
        if i % every == 0 or i == len(ts) - 1:
            ab = schedule.alpha_bar(t)
            x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            x0 = x0 if clip is None else x0.clamp(-clip, clip)
            out.append(
                {"t": t, "x_std": float(x.std()), "eps_std": float(eps.std()), "x0_std": float(x0.std())}
            )
        x = diffusion.ddpm_step(eps, t, ts[i + 1] if i + 1 < len(ts) else -1, x, schedule, g, clip_x0=clip)
    return out


def tables(result: dict) -> str:
    arms = sorted({r["arm"] for r in result["points"].values()})
    by_arm = {a: [r for r in result["points"].values() if r["arm"] == a] for a in arms}
    lines = [
        f"{result['experiment']} on {result['dataset']}, budget x{result['budget']:g}, {result['steps']} sampling steps"
    ]
    lines.append(
        "\nheld-out denoising loss, with the caption / without it / what the caption is worth (uncond - cond)"
    )
    for a, rs in by_arm.items():
        gain = [r["uncond_val_loss"] - r["image_val_loss"] for r in rs]
        lines.append(f"  {a:<16} {spread([r['image_val_loss'] for r in rs])}  "
                     f"{spread([r['uncond_val_loss'] for r in rs])}  {spread(gain)}")  # fmt: skip
    t = result["points"][next(iter(result["points"]))]["t"]
    lines.append("\nwhat the caption is worth by timestep (uncond - cond), mean over seeds")
    lines.append("  " + " " * 16 + " ".join(f"{x:>7}" for x in t))
    for a, rs in by_arm.items():
        gains = [statistics.fmean(r["uncond_by_t"][i] - r["loss_by_t"][i] for r in rs) for i in range(len(t))]
        lines.append(f"  {a:<16} " + " ".join(f"{g:>7.4f}" for g in gains))
    marks = [step["t"] for step in next(iter(result["points"].values()))["trajectory"]]
    for key, what in (("x_std", "x_t"), ("eps_std", "the guided noise prediction")):
        lines.append(f"\nthe sampler's trajectory: std of {what} at t, mean over seeds")
        lines.append("  " + " " * 16 + " ".join(f"{t:>6}" for t in marks))
        for a, rs in by_arm.items():
            vals = [statistics.fmean(r["trajectory"][i][key] for r in rs) for i in range(len(marks))]
            lines.append(f"  {a:<16} " + " ".join(f"{v:>6.3f}" for v in vals))
    lines.append(
        f"\nthe real held-out images' latents: std {result['real_latent_std']:.3f} (latent_std below: the samples')"
    )
    first = next(iter(result["points"].values()))["readings"]
    for m in next(iter(first.values())):
        lines.append(f"\n{m}")
        for reading in first:
            cells = "  ".join(
                f"{a} {spread([r['readings'][reading][m] for r in rs])}" for a, rs in by_arm.items()
            )
            lines.append(f"  {reading:<22} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="a finished (or partly finished) experiment directory")
    p.add_argument(
        "--budget", type=float, default=None, help="which budget's models (default: the largest done)"
    )
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0],
                   help="guidance weights, each at the checkpoint's clip of the predicted x0 (default 1 3)")  # fmt: skip
    p.add_argument("--clip", type=float, nargs="+", default=[],
                   help="other clips of the predicted x0 (DDPM's sample_clip; the default is 4), at the experiment's guidance")  # fmt: skip
    p.add_argument("--prompts-per-kind", type=int, default=None, help="default: the experiment's")
    p.add_argument("--steps", type=int, default=250, help="DDPM sampling steps (default 250)")
    args = p.parse_args(argv)
    out = Path(args.experiment)
    torch.manual_seed(0)
    result = diagnose(out, args.budget, args.guidance, args.clip, args.prompts_per_kind, args.steps)
    print(tables(result))
    (out / "attention_diagnosis.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
