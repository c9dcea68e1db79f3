"""Does the denoiser read relation words and which colour goes with which shape? A diffusion-classifier
probe (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier") on a trained checkpoint.

For held-out two-object scenes it noises each scene's latent at timestep t (the same noise for every
caption) and measures the denoising error under three captions: the true one ("a red circle to the
left of a blue square"), the relation flipped ("... to the right of ...") and the colours swapped
between the objects ("a blue circle to the left of a red square"). A model that reads the relation
denoises better with the true caption than with the flipped one; a model that binds colours to shapes
does better with the true caption than with the swapped one. Reported per t: how often the true caption
wins (0.5 is chance) and the mean error gap (wrong minus true; > 0 favours the truth).

A second table asks whether the model knows *where* each patch is, which a relation needs: a linear
probe (ridge regression, fitted on half the scenes, scored on the other half) reads each patch's row
and column from the hidden states at the patch positions, after the patcher and after every block.
RoPE alone gives attention relative positions only, so 0.5 there would mean that no absolute place
reaches the values a caption token reads; 1.0 means the place is in the vectors.

    python benchmarks/binding_probe.py RUN_OR_CHECKPOINT [--scenes 60] [--timesteps 100,300,500,700,850]

Prints a table and writes ``binding_probe.json`` next to the checkpoint (or to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from transfusion import diffusion
from transfusion.checkpoint import load_for_inference
from transfusion.data.shapes import _spec_for, caption_for, random_item, render
from transfusion.losses import noised, per_image_mse
from transfusion.sequence import Image, Sample, Specials, Text, pack, sample_length
from transfusion.vae import encode_images

WHERE_SCENES = 300
"""Scenes of the position readout (a probe over the width's 256 features wants more rows than the
relation table's 60 scenes give: 150 scenes x 4 patches to fit it)."""
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}  # fmt: skip


def variants(spec: dict) -> dict[str, str]:
    """The true caption, the relation flipped, and the colours swapped between the two objects."""
    flipped = {**spec, "relation": OPPOSITE[spec["relation"]]}
    a, b = spec["objects"]
    swapped = {**spec, "objects": [{**a, "color": b["color"]}, {**b, "color": a["color"]}]}
    return {"true": caption_for(spec), "flipped": caption_for(flipped), "swapped": caption_for(swapped)}


def noised_batch(loaded, latents: torch.Tensor, captions: list[str], t: int, seed: int):
    """One row per scene, caption then its latent noised at timestep t (noise seeded per scene), and the
    training objective's target."""
    cfg, tok = loaded.config, loaded.tokenizer
    samples = [
        Sample([Text(tok.encode(c)), Image(z, t=t, seed=seed + i)], eos=False)
        for i, (z, c) in enumerate(zip(latents, captions))
    ]
    n = cfg.model.patches_per_image
    batch = pack(samples, max(sample_length(s, n) for s in samples), Specials.of(tok), n, one_per_row=True)
    schedule = diffusion.NoiseSchedule.from_config(cfg.diffusion)
    return noised(batch, schedule, cfg.diffusion)  # every image seeded: no generator needed


@torch.no_grad()
def errors(loaded, latents: torch.Tensor, captions: list[str], t: int, seed: int) -> torch.Tensor:
    """Per-scene denoising MSE (the training objective's target) at timestep t."""
    batch, target = noised_batch(loaded, latents, captions, t, seed)
    return per_image_mse(loaded.model(batch).image_pred, target)


def linear_readout(features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-2) -> float:
    """Accuracy of a ridge-regression probe for a binary label, fitted on the first half of the rows
    and scored on the second (rows are grouped by scene, so no scene is in both halves)."""
    X = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    y = labels.double() * 2 - 1
    half = len(X) // 2
    A = X[:half].T @ X[:half] + ridge * torch.eye(X.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(A, X[:half].T @ y[:half])
    return ((X[half:] @ w > 0) == (y[half:] > 0)).double().mean().item()


@torch.no_grad()
def hidden_at_patches(
    loaded, latents: torch.Tensor, caption: str, t: int, seed: int
) -> dict[str, torch.Tensor]:
    """Hidden states (N * n, D) at the patch positions of N scenes noised at t after one caption: after
    the patcher ("patches") and after every block ("block K"), patches in raster order per scene."""
    model = loaded.model
    batch, _ = noised_batch(loaded, latents, [caption] * len(latents), t, seed)
    out: dict[str, torch.Tensor] = {}
    first = model.layers[0].register_forward_pre_hook(  # the first block's input: the embedded sequence
        lambda m, args: out.__setitem__("patches", args[0][batch.patch_mask])
    )
    hooks = [first] + [
        block.register_forward_hook(
            lambda m, i, o, k=k: out.__setitem__(f"block {k}", o[0][batch.patch_mask])
        )
        for k, block in enumerate(model.layers)
    ]
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return out


def where_rows(loaded, latents: torch.Tensor, timesteps: list[int], seed: int) -> list[dict]:
    """Per t and layer: how well a linear probe reads each patch's row and column."""
    side = loaded.config.model.patches_per_side
    k = torch.arange(side * side).repeat(len(latents))
    row = (k // side) >= side // 2  # top half against bottom half (0 / 1 on a 2 x 2 grid)
    col = (k % side) >= side // 2
    rows = []
    for t in timesteps:
        for layer, h in hidden_at_patches(loaded, latents, "a red circle", t, seed).items():
            rows.append(
                {"t": t, "layer": layer, "row": linear_readout(h, row), "column": linear_readout(h, col)}
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint")
    ap.add_argument("--scenes", type=int, default=60, help="held-out two-object scenes (default 60)")
    ap.add_argument("--timesteps", default="100,300,500,700,850", help="comma-separated t (0..T-1)")
    ap.add_argument(
        "--seed", type=int, default=777, help="scenes and noise (default 777: not a training seed)"
    )
    ap.add_argument("--out", help="JSON path (default: binding_probe.json beside the checkpoint)")
    args = ap.parse_args()
    loaded, vae = load_for_inference(args.checkpoint)
    if vae is None:
        raise SystemExit(f"{args.checkpoint} names no VAE; the probe needs one to encode the scenes")
    rng = random.Random(args.seed)
    scenes = [random_item(rng, kind="position")[0] for _ in range(args.scenes)]
    specs = [_spec_for(s, "position") for s in scenes]
    latents = encode_images(vae, [render(s, loaded.config.vae.image_size) for s in scenes])
    captions = [variants(s) for s in specs]
    rows = []
    for t in [int(x) for x in args.timesteps.split(",")]:
        err = {k: errors(loaded, latents, [c[k] for c in captions], t, args.seed) for k in captions[0]}
        row = {"t": t}
        for wrong in ("flipped", "swapped"):
            gap = err[wrong] - err["true"]
            row[f"true_beats_{wrong}"] = (gap > 0).float().mean().item()
            row[f"gap_{wrong}"] = gap.mean().item()
            row[f"gap_{wrong}_relative"] = (gap.mean() / err["true"].mean()).item()
        row["mse_true"] = err["true"].mean().item()
        rows.append(row)
    print(f"{args.scenes} two-object scenes, objective {loaded.config.diffusion.objective}; "
          "'wins' = share of scenes where the true caption denoises better (0.5 = chance)")  # fmt: skip
    print(
        "| t | MSE, true caption | wins vs relation flipped | gap (relative) | wins vs colours swapped | gap (relative) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['t']} | {r['mse_true']:.4f} | {r['true_beats_flipped']:.2f} | {r['gap_flipped_relative']:+.2%} "
              f"| {r['true_beats_swapped']:.2f} | {r['gap_swapped_relative']:+.2%} |")  # fmt: skip
    where_rng = random.Random(args.seed + 1)
    scenes = [random_item(where_rng)[0] for _ in range(WHERE_SCENES)]  # any kind: 1-3 objects, empty cells
    where_latents = encode_images(vae, [render(s, loaded.config.vae.image_size) for s in scenes])
    where = where_rows(loaded, where_latents, [int(x) for x in args.timesteps.split(",")], args.seed)
    layers = list(dict.fromkeys(r["layer"] for r in where))
    print("\nwhere each patch is: a linear probe's accuracy reading its row / column (0.5 = not there)")
    print("| t | " + " | ".join(layers) + " |")
    print("| --- |" + " --- |" * len(layers))
    for t in dict.fromkeys(r["t"] for r in where):
        mine = {r["layer"]: r for r in where if r["t"] == t}
        print(
            f"| {t} | " + " | ".join(f"{mine[k]['row']:.2f} / {mine[k]['column']:.2f}" for k in layers) + " |"
        )
    out = Path(args.out) if args.out else loaded.path / "binding_probe.json"
    out.write_text(
        json.dumps(
            {"checkpoint": str(args.checkpoint), "scenes": args.scenes, "rows": rows, "where": where},
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
