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

A third table asks where the model puts the object named first before anything is drawn: a blank
latent noised at t (999 and 900 by default), captions with each of the four relations, and the share of
the first-named colour in the top half (left half for left / right) of the clean image the prediction
points to: near 1 for "above", near 0 for "below" when the relation word is read; the same for all four
when only the order of the words is.

A fourth table asks the captioner the same question from the other side: each scene's clean image
first, then its caption up to the relation word ("a red circle", "a red circle to the"), teacher-forced.
Does it prefer the right relation word to the opposite one, and does the caption's last token look at
the patch of the object it has just named, or at both objects alike?

    python benchmarks/binding_probe.py RUN_OR_CHECKPOINT [--scenes 60] [--timesteps 100,300,500,700,850]
        [--placement-timesteps 999,900]

Prints the tables and writes ``binding_probe.json`` next to the checkpoint (or to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from transfusion import diffusion
from transfusion.checkpoint import load_for_inference
from transfusion.data.shapes import COLORS, _spec_for, caption_for, random_item, render
from transfusion.evaluation.scenes import MAX_COLOR_DISTANCE
from transfusion.layers import apply_rope, routed
from transfusion.losses import noised, per_image_mse
from transfusion.sequence import Image, Sample, Specials, Text, pack, sample_length
from transfusion.vae import decode_latents, encode_images

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


def attention_weights(attn, args: tuple) -> torch.Tensor:
    """The (B, H, L, L) attention weights of an ``Attention`` module called with ``args`` (x, cos, sin,
    a dense mask, ...): what SDPA weighs the values with."""
    x, cos, sin, mask = args[:4]
    route = args[5] if len(args) > 5 else None
    B, L, _ = x.shape
    q = routed(attn.wq, x, route).view(B, L, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = routed(attn.wk, x, route).view(B, L, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) / attn.head_dim**0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def cell_of(o, side: int) -> int:
    """The raster index of the patch that holds an object's centre."""
    return min(int(o.cy * side), side - 1) * side + min(int(o.cx * side), side - 1)


@torch.no_grad()
def captioner_rows(loaded, latents: torch.Tensor, scenes: list, specs: list[dict]) -> dict:
    """The captioner, teacher-forced: each clean image first, then its caption up to the relation word
    ("a red circle", or "a red circle to the" for left / right). Which relation word does it prefer
    (against the opposite one), and where does the caption's last token look among the patches: the
    named object's, the other object's, the empty ones (mean attention per layer and head)?"""
    cfg, tok, model = loaded.config, loaded.tokenizer, loaded.model
    n, side = cfg.model.patches_per_image, cfg.model.patches_per_side
    samples, choices = [], []
    for z, spec in zip(latents, specs):
        rel = spec["relation"]
        horizontal = rel.startswith("to the")
        prefix = caption_for({**spec, "objects": spec["objects"][:1], "relation": None})  # "a red circle"
        prefix += " to the" if horizontal else ""
        word, other = rel.split()[-2 if horizontal else 0], OPPOSITE[rel].split()[-2 if horizontal else 0]
        a, b = tok.encode(" " + word), tok.encode(" " + other)
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # a byte tokenizer shares the space
        samples.append(Sample([Image(z, t=0), Text(tok.encode(prefix) + a[:common])], eos=False))
        choices.append((word, other, a[common], b[common]))
    batch = pack(samples, max(sample_length(s, n) for s in samples), Specials.of(tok), n, one_per_row=True)
    weights: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: weights.append(attention_weights(m, args)))
             for b in model.layers]  # fmt: skip
    try:
        logits = model(batch).logits
    finally:
        for h in hooks:
            h.remove()
    last = [int(r.nonzero().max()) for r in batch.ids != Specials.of(tok).pad]  # each row's last token
    right: dict[str, list[bool]] = {"above / below": [], "left / right": []}
    picked = dict.fromkeys(("above", "below", "left", "right"), 0)
    for i, (word, other, a, b) in enumerate(choices):
        lp = logits[i, last[i]]
        ok = bool(lp[a] > lp[b])
        right["above / below" if word in ("above", "below") else "left / right"].append(ok)
        picked[word if ok else other] += 1
    looks = []
    for layer, wts in enumerate(weights):
        for head in range(wts.shape[1]):
            shares = []
            for i, scene in enumerate(scenes):
                at = wts[i, head, last[i], batch.patch_mask[i]]  # on the n patches, raster order
                a, b = cell_of(scene.objects[0], side), cell_of(scene.objects[1], side)
                shares.append((at[a].item(), at[b].item(), (at.sum() - at[a] - at[b]).item()))
            named, other, empty = (sum(x) / len(shares) for x in zip(*shares))
            looks.append({"layer": layer, "head": head, "named": named, "other": other, "empty": empty})
    return {"relation_word_right": {k: [sum(v), len(v)] for k, v in right.items()}, "picked": picked,
            "attention": looks}  # fmt: skip


PLACEMENT_PAIRS = (("red", "circle", "blue", "square"), ("green", "triangle", "purple", "circle"),
                   ("yellow", "square", "cyan", "triangle"), ("blue", "triangle", "red", "square"))  # fmt: skip


def first_half_share(images: list, color: str, axis: str) -> float:
    """Of the pixels (over all ``images``) within ``MAX_COLOR_DISTANCE`` of a palette colour, the share
    in the top half (``axis`` "y") or the left half ("x")."""
    mass = np.mean([np.linalg.norm(np.asarray(im, np.float32) - COLORS[color], axis=-1) < MAX_COLOR_DISTANCE
                    for im in images], axis=0)  # fmt: skip
    half = mass.shape[0] // 2
    first = mass[:half].sum() if axis == "y" else mass[:, :half].sum()
    return float(first / mass.sum()) if mass.sum() else 0.5


@torch.no_grad()
def placement_rows(loaded, vae, timesteps: list[int], seed: int, per_prompt: int = 32) -> list[dict]:
    """Where the model puts the object named first before anything is drawn: for each relation, prompts
    ("a red circle above a blue square", ...), a blank latent noised at t (``per_prompt`` noises each),
    the clean image the prediction points to, decoded, and the share of the first-named colour's pixels
    in the top half (left half for left / right). Reading the relation: near 1 for "above" and "to the
    left of", near 0 for "below" and "to the right of"; the same for all four: the words' order is read
    without the relation word; 0.5 for all four: neither."""
    cfg, model = loaded.config, loaded.model
    schedule = diffusion.NoiseSchedule.from_config(cfg.diffusion)
    blank = torch.zeros(cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    rows = []
    for t in timesteps:
        row: dict = {"t": t}
        for rel in ("above", "below", "to the left of", "to the right of"):
            shares = []
            for c1, s1, c2, s2 in PLACEMENT_PAIRS:
                caption = f"a {c1} {s1} {rel} a {c2} {s2}"
                batch, _ = noised_batch(
                    loaded, blank.expand(per_prompt, -1, -1, -1), [caption] * per_prompt, t, seed
                )
                out = model(batch).image_pred
                if cfg.diffusion.objective == "flow":
                    x0 = batch.latents - diffusion.flow_sigma(t, schedule.num_timesteps, out.dtype) * out
                else:
                    x0 = diffusion.predict_x0(batch.latents, out, t, schedule)
                shares.append(
                    first_half_share(decode_latents(vae, x0), c1, "y" if rel in ("above", "below") else "x")
                )
            row[rel] = sum(shares) / len(shares)
        rows.append(row)
    return rows


def relation_rows(
    loaded, latents: torch.Tensor, specs: list[dict], timesteps: list[int], seed: int
) -> list[dict]:
    """Per t: how often the true caption denoises better than the relation flipped and than the colours
    swapped, and the mean gaps (absolute and relative to the true caption's error)."""
    captions = [variants(s) for s in specs]
    rows = []
    for t in timesteps:
        err = {k: errors(loaded, latents, [c[k] for c in captions], t, seed) for k in captions[0]}
        row = {"t": t}
        for wrong in ("flipped", "swapped"):
            gap = err[wrong] - err["true"]
            row[f"true_beats_{wrong}"] = (gap > 0).float().mean().item()
            row[f"gap_{wrong}"] = gap.mean().item()
            row[f"gap_{wrong}_relative"] = (gap.mean() / err["true"].mean()).item()
        row["mse_true"] = err["true"].mean().item()
        rows.append(row)
    return rows


def print_reading(placed: list[dict], reads: dict) -> None:
    """The placement table and the captioner's table."""
    print("\nwhere the object named first goes before anything is drawn: the share of its colour in the top "
          "half of the predicted clean image (left half for left / right; 0.5: not read)")  # fmt: skip
    print("| t | above | below | to the left of | to the right of |")
    print("| --- | --- | --- | --- | --- |")
    for r in placed:
        print(f"| {r['t']} | " + " | ".join(f"{r[k]:.2f}" for k in ("above", "below", "to the left of", "to the right of")) + " |")  # fmt: skip
    print("\nthe captioner, teacher-forced (each image, then its caption up to the relation word): the "
          "relation word it prefers to the opposite one is right in")  # fmt: skip
    print(", ".join(f"{k}: {a} of {b}" for k, (a, b) in reads["relation_word_right"].items()),
          "(it picked " + ", ".join(f"'{w}' {n} times" for w, n in reads["picked"].items()) + ")")  # fmt: skip
    print("where its last token looks among the patches (mean attention):")
    print("| layer | head | the named object's patch | the other object's patch | empty patches |")
    print("| --- | --- | --- | --- | --- |")
    for r in reads["attention"]:
        print(f"| {r['layer']} | {r['head']} | {r['named']:.2f} | {r['other']:.2f} | {r['empty']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint")
    ap.add_argument("--scenes", type=int, default=60, help="held-out two-object scenes (default 60)")
    ap.add_argument("--timesteps", default="100,300,500,700,850", help="comma-separated t (0..T-1)")
    ap.add_argument(
        "--placement-timesteps", default="999,900", help="t of the placement table (default 999,900)"
    )
    ap.add_argument(
        "--seed", type=int, default=777, help="scenes and noise (default 777: not a training seed)"
    )
    ap.add_argument("--out", help="JSON path (default: binding_probe.json beside the checkpoint)")
    args = ap.parse_args()
    loaded, vae = load_for_inference(args.checkpoint)
    if vae is None:
        raise SystemExit(f"{args.checkpoint} names no VAE; the probe needs one to encode the scenes")
    rng = random.Random(args.seed)
    scenes_rel = [random_item(rng, kind="position")[0] for _ in range(args.scenes)]
    specs = [_spec_for(s, "position") for s in scenes_rel]
    latents = encode_images(vae, [render(s, loaded.config.vae.image_size) for s in scenes_rel])
    rows = relation_rows(loaded, latents, specs, [int(x) for x in args.timesteps.split(",")], args.seed)
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
    placed = placement_rows(loaded, vae, [int(x) for x in args.placement_timesteps.split(",")], args.seed)
    reads = captioner_rows(loaded, latents, scenes_rel, specs)
    print_reading(placed, reads)
    out = Path(args.out) if args.out else loaded.path / "binding_probe.json"
    out.write_text(
        json.dumps(
            {"checkpoint": str(args.checkpoint), "scenes": args.scenes, "rows": rows, "where": where,
             "placement": placed, "captioner": reads},
            indent=2,
        )
    )  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
