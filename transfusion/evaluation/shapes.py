"""Evaluate a model trained on the built-in shape scenes with the paper's kinds of metric.

- **Composition (GenEval-style)**: images generated for held-out prompts of six kinds (single object,
  two objects, counting, colours, position, colour attribution), judged by the deterministic scene
  detector of ``data/shapes.py``; per kind and overall (mean over kinds). Position prompts are also
  split by what went wrong (``relation_scores``): the objects, the axis, or which object was named
  first (``position_order``: 0.5 when the order of the words is ignored).
- **Captioning**: held-out images captioned greedily; attribute accuracy (objects, counts, stated
  colours and relations all right, judged against the scene), a strict accuracy (and every colour
  and the relation the reference states are stated), CIDEr-D against template references, and of
  the captions that state a relation between the scene's two objects, the share the right way round
  (``caption_relation_order``).
- **Text**: bits per byte and per-token perplexity on held-out captions.
- **FD**: Fréchet distance between generated and real images in the feature space of a small CNN the
  project trains on the scenes ("FD (project classifier features)"), or, when ``--fid-inception`` names a
  local TorchScript Inception file, FID with its features. The two are never mixed up in the output.
- **Precision and recall** (Kynkaanniemi et al. 2019) in the same features as FD: how many generated
  images fall on the real manifold, how much of it they cover.
- **Well-formedness**: the share of detected objects the detector reads with confidence (colour on
  the palette, solid, filling its box as its shape does): clean shapes against smeared blobs.
- **Blank images**: generated images in which the detector finds no object at all, per kind and
  overall (``geneval_blank_rate``): the failure a mean-seeking model falls into on a black background.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transfusion.data.shapes import (
    COLORS,
    KINDS,
    SHAPES,
    Scene,
    ShapesDataset,
    caption_for,
    eval_prompts,
    reading_order,
)
from transfusion.evaluation import metrics as M
from transfusion.evaluation.common import prepare
from transfusion.evaluation.scenes import (
    judge_caption,
    judge_caption_strict,
    judge_image,
    order_share,
    parse_caption,
    read_scene,
    relation_outcome,
    well_formed,
)
from transfusion.evaluation.text import text_scores
from transfusion.generate import Decoder, GenerationConfig, caption, text_to_image
from transfusion.io import atomic_write_text, load_tensors, save_tensors
from transfusion.vae import decode_latents, encode_images, pil_to_tensor


# --- the feature extractor for FD -----------------------------------------------------------------------
class SceneClassifier(nn.Module):
    """A small CNN predicting which (colour, shape) pairs a scene holds (18 binary labels); its
    64-d penultimate activations are the FD features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(64, len(COLORS) * len(SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def scene_labels(scene: Scene) -> torch.Tensor:
    y = torch.zeros(len(COLORS) * len(SHAPES))
    for o in scene.objects:
        y[list(COLORS).index(o.color) * len(SHAPES) + SHAPES.index(o.shape)] = 1
    return y


def train_scene_classifier(
    image_size: int, steps: int = 1000, seed: int = 7
) -> tuple[SceneClassifier, float]:
    """Trained on freshly rendered scenes; returns the model and its exact-match accuracy on new ones."""
    torch.manual_seed(seed)
    ds = ShapesDataset(image_size, seed=seed + 1)
    data = [ds[i] for i in range(3000)]
    x = pil_to_tensor([r.image for r in data])
    y = torch.stack([scene_labels(Scene.from_dict(r.meta["scene"])) for r in data])
    clf = SceneClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, 2500, (64,))
        loss = F.binary_cross_entropy_with_logits(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = ((clf(x[2500:]) > 0) == (y[2500:] > 0.5)).all(1).float().mean().item()
    return clf.eval(), acc


@torch.no_grad()
def features(extractor: nn.Module, images: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """(N, d) features of images in [-1, 1], ``chunk`` at a time (Inception's 299x299 inputs)."""
    if isinstance(extractor, SceneClassifier):
        return extractor.features(images).numpy()
    out = []
    for part in images.split(chunk):
        x = F.interpolate((part + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(extractor(x).reshape(len(part), -1).numpy())
    return np.concatenate(out)


def degradation_ladder(n: int = 120, image_size: int = 32) -> tuple[list, dict[str, list]]:
    """``n`` real scenes to compare against, and ``n`` other real scenes as they are and degraded:
    (paired real images, {rung: images}) with rungs real, blur (Gaussian 1.2 px), noise (sigma 40 of
    255), blocky (4x4-pixel blocks, like VQ codes), removed (the first object only) and blank."""
    from PIL import Image, ImageFilter

    from transfusion.data.shapes import render

    paired = [ShapesDataset(image_size, seed=21)[i].image for i in range(n)]
    other = [ShapesDataset(image_size, seed=22)[i] for i in range(n)]
    rng = np.random.default_rng(0)
    side, block = image_size, image_size // 4

    def noisy(im: Image.Image) -> Image.Image:
        pixels = np.asarray(im, np.float32) + rng.normal(0, 40, (side, side, 3))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    def first_object_only(r: Any) -> Image.Image:
        return render(Scene(Scene.from_dict(r.meta["scene"]).objects[:1]), side)

    ladder = {
        "real": [r.image for r in other],
        "blur": [r.image.filter(ImageFilter.GaussianBlur(1.2 * side / 32)) for r in other],
        "noise": [noisy(r.image) for r in other],
        "blocky": [
            r.image.resize((block, block), Image.BILINEAR).resize((side, side), Image.NEAREST) for r in other
        ],
        "removed": [first_object_only(r) for r in other],
        "blank": [render(Scene([]), side) for _ in other],
    }
    return paired, ladder


def ladder_scores(extractor: nn.Module, n: int = 120, image_size: int = 32) -> dict[str, dict[str, float]]:
    """FD, precision, recall (against ``reference_scenes``) and well-formedness at every rung of
    ``degradation_ladder``."""
    paired, ladder = degradation_ladder(n, image_size)
    reference = reference_scenes(image_size)
    out = {}
    for rung, images in ladder.items():
        out[rung] = image_scores(extractor, paired, images, reference)
        marks = [well_formed(im) for im in images]
        out[rung]["well_formed"] = well_formed_share(
            [{"found": len(m), "well_formed": sum(m)} for m in marks]
        )
    return out


# --- the evaluations -----------------------------------------------------------------------------------
def composition(
    decoder: Decoder,
    vae: Any,
    n_per_kind: int,
    gen: GenerationConfig,
    image_size: int,
    seed: int,
    in_reading_order: bool = False,
) -> tuple[dict[str, float], list[dict], list]:
    """Images for ``n_per_kind`` held-out prompts of each GenEval kind, judged by the detector:
    (scores per kind and overall, with blank-image rates; a row per image; (prompt, image) pairs).

    ``in_reading_order``: the model is given each prompt with its relation stated in reading order
    (``data.shapes.reading_order``: "X below Y" -> "Y above X", the same scene), for a model trained on
    captions that only ever name the upper or left object first; images are still judged against the
    prompt as written. The prompts the rewrite changes are then also drawn as written (same seeds), and
    ``position_as_written``, ``position_order_as_written`` and ``overall_as_written`` score those."""
    prompts = eval_prompts(n_per_kind, seed=seed, image_size=image_size)
    asked = [reading_order(p.text) if in_reading_order else p.text for p in prompts]
    images = draw(decoder, vae, asked, gen, list(range(len(prompts))))
    rows = [judged(p, text, im) for p, text, im in zip(prompts, asked, images)]
    scores = M.composition_scores([(r["kind"], r["correct"]) for r in rows])
    scores.update(blank_rates(rows))
    scores["well_formed"] = well_formed_share(rows)
    scores.update(relation_scores([r["relation"] for r in rows]))
    if in_reading_order:
        changed = [i for i, (p, text) in enumerate(zip(prompts, asked)) if text != p.text]
        written = list(rows)
        redrawn = draw(decoder, vae, [prompts[i].text for i in changed], gen, changed) if changed else []
        for i, im in zip(changed, redrawn):
            written[i] = judged(prompts[i], prompts[i].text, im)
        plain = M.composition_scores([(r["kind"], r["correct"]) for r in written])
        scores["position_as_written"] = plain["position"]
        scores["overall_as_written"] = plain["overall"]
        order = relation_scores([r["relation"] for r in written])["position_order"]
        scores["position_order_as_written"] = order
    return scores, rows, list(zip(prompts, images))


def draw(decoder: Decoder, vae: Any, texts: list[str], gen: GenerationConfig, seeds: list[int]) -> list:
    """Text-to-image for ``texts`` (one seed each), decoded to PIL images."""
    return decode_latents(vae, torch.stack(text_to_image(decoder, texts, gen, seeds=seeds)))


def judged(prompt: Any, asked: str, image: Any) -> dict[str, Any]:
    """One generated image read by the detector and judged against ``prompt`` (a Record), as a row;
    ``asked``: the text the model was given."""
    found, form = read_scene(image)
    spec = prompt.meta["spec"]
    return {"prompt": prompt.text, "asked": asked, "kind": prompt.meta["kind"], "correct": judge_image(found, spec),
            "blank": not found.objects, "found": len(found.objects), "well_formed": sum(form),
            "relation": relation_outcome(found, spec)}  # fmt: skip


def relation_scores(outcomes: list[str | None]) -> dict[str, float | None]:
    """What position prompts got wrong (``relation_outcome`` of each; None for other prompts):
    ``position_order``, of the images with both named objects on the relation's axis, the share with
    the first-named object on the stated side (0.5: the order of the words is ignored; None without
    such images); ``position_axis``, of the images with both objects, the share on the relation's
    axis; ``position_objects``, the share of position images holding exactly the two named objects."""
    rel = [o for o in outcomes if o is not None]
    both = [o for o in rel if o != "objects wrong"]
    return {
        "position_order": order_share(rel),
        "position_axis": sum(o != "other axis" for o in both) / len(both) if both else None,
        "position_objects": len(both) / len(rel) if rel else None,
    }


def well_formed_share(rows: list[dict]) -> float:
    """Well-formed objects over all objects detected in the generated images (0 when none are)."""
    found = sum(r["found"] for r in rows)
    return sum(r["well_formed"] for r in rows) / found if found else 0.0


def blank_rates(rows: list[dict]) -> dict[str, float]:
    """Share of generated images with no object at all, overall and per kind present in ``rows``:
    {'blank_rate': ..., 'blank_rate_<kind>': ...}."""
    out = {"blank_rate": M.accuracy([r["blank"] for r in rows])}
    for kind in KINDS:
        mine = [r["blank"] for r in rows if r["kind"] == kind]
        if mine:
            out[f"blank_rate_{kind}"] = M.accuracy(mine)
    return out


def captioning(
    decoder: Decoder, vae: Any, n: int, image_size: int, seed: int
) -> tuple[dict[str, float], list[dict]]:
    ds = ShapesDataset(image_size, seed=seed + 2)
    records = [ds[i] for i in range(n)]
    latents = encode_images(vae, [r.image for r in records])
    texts = caption(decoder, list(latents), GenerationConfig(max_new_tokens=64, temperature=0.0))
    rows, refs = [], []
    for i, (r, text) in enumerate(zip(records, texts)):
        scene = Scene.from_dict(r.meta["scene"])
        rng = random.Random(f"refs-{seed}-{i}")
        refs.append(sorted({r.text} | {caption_for(r.meta["spec"], rng) for _ in range(4)}))
        said = parse_caption(text)
        rows.append({"caption": text, "truth": r.text, "correct": judge_caption(text, scene),
                     "strict": judge_caption_strict(text, scene, r.meta["spec"]), "image": r.image,
                     "relation": relation_outcome(scene, said) if said else None})  # fmt: skip
    scores = {
        "caption_accuracy": M.accuracy([row["correct"] for row in rows]),
        "caption_accuracy_strict": M.accuracy([row["strict"] for row in rows]),
        "caption_cider_d": M.cider_d([row["caption"] for row in rows], refs),
        "caption_relation_order": order_share([row["relation"] for row in rows]),
    }
    return scores, rows


REFERENCE_SCENES = 1000
"""Rendered scenes that stand for the real manifold in precision and recall: with only the prompts'
60 real images, every real point's k-nearest-neighbour ball is so wide that blank frames fall inside
it (precision 1.0 for all-blank images, measured with 120); with 1000, blank scores 0 and blur 0.19
(``benchmarks/metric_ladder.py``)."""


def reference_scenes(image_size: int, n: int = REFERENCE_SCENES) -> list:
    """``n`` freshly rendered scenes of the training distribution (a seed no split uses)."""
    ds = ShapesDataset(image_size, seed=4242)
    return [ds[i].image for i in range(n)]


def image_scores(
    extractor: nn.Module, paired_real: list, generated: list, reference: list | None = None
) -> dict[str, float]:
    """FD between the generated images and the real images of their prompts, and precision/recall of
    the generated images against ``reference`` real images (default: the paired ones), all in
    ``extractor``'s features. Keys: fd, precision, recall."""
    a, b = features(extractor, pil_to_tensor(paired_real)), features(extractor, pil_to_tensor(generated))
    ref = a if reference is None else features(extractor, pil_to_tensor(reference))
    precision, recall = M.precision_recall(ref, b)
    return {"fd": M.frechet_distance(a, b), "precision": precision, "recall": recall}


def frechet(prompts_images: list, image_size: int, inception: str | None, run_dir: Path | None) -> dict:
    """FD against the prompts' real images, with precision and recall against ``REFERENCE_SCENES``
    rendered scenes, in the project classifier's features (trained once per ``run_dir``) or, with
    ``inception``, a local TorchScript Inception's."""
    real = [p.image for p, _ in prompts_images]
    fake = [im for _, im in prompts_images]
    reference = reference_scenes(image_size)
    if inception:
        extractor = torch.jit.load(inception, map_location="cpu").eval()
        r = image_scores(extractor, real, fake, reference)
        return {
            "fid_inception": r["fd"],
            "precision_inception": r["precision"],
            "recall_inception": r["recall"],
        }
    cache = run_dir / f"fd_classifier_{image_size}.safetensors" if run_dir else None
    if cache is not None and cache.is_file():  # trained once per run directory
        clf = SceneClassifier()
        state = load_tensors(cache)
        acc = float(state.pop("accuracy").item())
        clf.load_state_dict(state)
        clf.eval()
    else:
        clf, acc = train_scene_classifier(image_size)
        if cache is not None:
            save_tensors(cache, {**clf.state_dict(), "accuracy": torch.tensor(acc)})
    r = image_scores(clf, real, fake, reference)
    return {"fd_project_classifier": r["fd"], "precision_project_classifier": r["precision"],
            "recall_project_classifier": r["recall"], "fd_classifier_exact_match_accuracy": acc}  # fmt: skip


def evaluate(
    pipe: Any,
    out_dir: str | Path,
    n_per_kind: int = 10,
    n_captions: int = 60,
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    inception: str | None = None,
    fd_cache: str | Path | None = None,
    guidance_max_t: int | None = -1,
    relation_wording: str = "auto",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every evaluation of the model of ``pipe`` (a ``Pipeline``); returns (metrics, details for the
    report) and writes metrics.json. The FD feature classifier is trained once per ``fd_cache``
    directory (default ``out_dir``). ``relation_wording``: whether prompts reach the model in reading
    order (``Pipeline.reads_in_reading_order``; see ``composition``)."""
    start = time.time()
    model, tokenizer, vae = pipe.model, pipe.tokenizer, pipe.vae
    in_reading_order = pipe.reads_in_reading_order(relation_wording)
    out, decoder, gen = prepare(pipe, out_dir, sampler, steps, cfg_scale, guidance_max_t)
    size = vae.config.image_size
    t0 = time.time()
    comp, comp_rows, pairs = composition(decoder, vae, n_per_kind, gen, size, seed + 100, in_reading_order)
    per_image = (time.time() - t0) / max(1, len(pairs))
    cap, cap_rows = captioning(decoder, vae, n_captions, size, seed + 200)
    metrics: dict[str, Any] = {f"geneval_{k}": v for k, v in comp.items()}
    metrics.update(cap)
    held_out = ShapesDataset(size, seed=seed + 300)
    metrics.update(text_scores(model, tokenizer, [held_out[i].text for i in range(200)]))
    metrics.update(frechet(pairs, size, inception, Path(fd_cache) if fd_cache else out))
    metrics.update(
        {
            "eval_sampler": gen.sampler,
            "eval_steps": gen.steps,
            "eval_cfg": gen.cfg_scale,
            "eval_guidance_max_t": gen.guidance_max_t,
            "eval_prompts_in_reading_order": in_reading_order,
            "sample_seconds_per_image": per_image,
            "eval_seconds": time.time() - start,
        }
    )
    metrics = {
        k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics, {"composition": comp_rows, "pairs": pairs, "captions": cap_rows}
