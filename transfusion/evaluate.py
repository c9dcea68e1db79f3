"""Evaluate a checkpoint with the paper's kinds of metric; writes ``metrics.json``.

- **Composition (GenEval-style)**: images generated for held-out prompts of six kinds (single object,
  two objects, counting, colours, position, colour attribution), judged by the deterministic scene
  detector of ``data/shapes.py``; per kind and overall (mean over kinds).
- **Captioning**: held-out images captioned greedily; attribute accuracy (objects, counts, stated
  colours and relations all right, judged against the scene) and CIDEr-D against template references.
- **Text**: bits per byte and per-token perplexity on held-out captions.
- **FD**: Fréchet distance between generated and real images in the feature space of a small CNN the
  project trains on the scenes ("FD (project classifier features)"), or, when ``--fid-inception`` names a
  local TorchScript Inception file, FID with its features. The two are never mixed up in the output.
"""

from __future__ import annotations

import argparse
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

from transfusion import metrics as M
from transfusion.data.shapes import (
    COLORS,
    SHAPES,
    Scene,
    ShapesDataset,
    caption_for,
    detect_scene,
    eval_prompts,
    judge_caption,
    judge_image,
)
from transfusion.generate import Decoder, GenerationConfig, caption, text_to_image
from transfusion.sequence import Sample, Specials, Text, pack
from transfusion.vae import pil_to_tensor, tensor_to_pil


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
def features(extractor: nn.Module, images: torch.Tensor) -> np.ndarray:
    if isinstance(extractor, SceneClassifier):
        return extractor.features(images).numpy()
    x = F.interpolate(
        (images + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False
    )  # Inception input
    return extractor(x).reshape(len(images), -1).numpy()


# --- the evaluations -----------------------------------------------------------------------------------
def _decode(vae: Any, latents: torch.Tensor) -> list:
    with torch.no_grad():
        return tensor_to_pil(vae.decode(vae.from_diffusion(latents)).cpu())


def composition(
    decoder: Decoder, vae: Any, n_per_kind: int, gen: GenerationConfig, image_size: int, seed: int
) -> tuple[dict[str, float], list[dict], list]:
    prompts = eval_prompts(n_per_kind, seed=seed, image_size=image_size)
    latents = torch.stack(
        text_to_image(decoder, [p.text for p in prompts], gen, seeds=list(range(len(prompts))))
    )
    images = _decode(vae, latents)
    rows = []
    for p, im in zip(prompts, images):
        ok = judge_image(detect_scene(im), p.meta["spec"])
        rows.append({"prompt": p.text, "kind": p.meta["kind"], "correct": ok})
    return M.composition_scores([(r["kind"], r["correct"]) for r in rows]), rows, list(zip(prompts, images))


def captioning(
    decoder: Decoder, vae: Any, n: int, image_size: int, seed: int
) -> tuple[dict[str, float], list[dict]]:
    ds = ShapesDataset(image_size, seed=seed + 2)
    records = [ds[i] for i in range(n)]
    with torch.no_grad():
        latents = vae.to_diffusion(vae.encode(pil_to_tensor([r.image for r in records])))
    texts = caption(decoder, list(latents.float()), GenerationConfig(max_new_tokens=64, temperature=0.0))
    rows, refs = [], []
    for i, (r, text) in enumerate(zip(records, texts)):
        scene = Scene.from_dict(r.meta["scene"])
        rng = random.Random(f"refs-{seed}-{i}")
        refs.append(sorted({r.text} | {caption_for(r.meta["spec"], rng) for _ in range(4)}))
        rows.append(
            {"caption": text, "truth": r.text, "correct": judge_caption(text, scene), "image": r.image}
        )
    scores = {
        "caption_accuracy": M.accuracy([row["correct"] for row in rows]),
        "caption_cider_d": M.cider_d([row["caption"] for row in rows], refs),
    }
    return scores, rows


@torch.no_grad()
def text_scores(model: Any, tokenizer: Any, n: int, image_size: int, seed: int) -> dict[str, float]:
    """Bits per byte and per-token perplexity of held-out captions as text-only samples."""
    ds = ShapesDataset(image_size, seed=seed + 3)
    texts = [ds[i].text for i in range(n)]
    sp = Specials.of(tokenizer)
    samples = [Sample([Text(tokenizer.encode(t))]) for t in texts]
    batch = pack(
        samples, max(len(t.encode()) for t in texts) + 2, sp, model.cfg.patches_per_image, one_per_row=True
    )
    device = next(model.parameters()).device
    out = model(batch.to(device))
    valid = batch.text_targets != -100
    nll = F.cross_entropy(
        out.logits[valid.to(device)].float(), batch.text_targets[valid].to(device), reduction="sum"
    ).item()
    tokens = int(valid.sum())
    n_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts)  # + EOS, which the loss also predicts
    return {"text_bits_per_byte": M.bits_per_byte(nll, n_bytes), "text_perplexity": M.perplexity(nll, tokens)}


def frechet(prompts_images: list, image_size: int, inception: str | None, run_dir: Path | None) -> dict:
    real = pil_to_tensor([p.image for p, _ in prompts_images])
    fake = pil_to_tensor([im for _, im in prompts_images])
    if inception:
        extractor = torch.jit.load(inception, map_location="cpu").eval()
        return {"fid_inception": M.frechet_distance(features(extractor, real), features(extractor, fake))}
    cache = run_dir / f"fd_classifier_{image_size}.safetensors" if run_dir else None
    if cache is not None and cache.is_file():  # trained once per run directory
        from safetensors.torch import load_file

        clf = SceneClassifier()
        state = load_file(cache)
        acc = float(state.pop("accuracy").item())
        clf.load_state_dict(state)
        clf.eval()
    else:
        clf, acc = train_scene_classifier(image_size)
        if cache is not None:
            from transfusion.checkpoint import save_tensors

            save_tensors(cache, {**clf.state_dict(), "accuracy": torch.tensor(acc)})
    fd = M.frechet_distance(features(clf, real), features(clf, fake))
    return {"fd_project_classifier": fd, "fd_classifier_exact_match_accuracy": acc}


def evaluate(
    model: Any,
    tokenizer: Any,
    vae: Any,
    config: Any,
    out_dir: str | Path,
    n_per_kind: int = 10,
    n_captions: int = 60,
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    inception: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every evaluation; returns (metrics, details for the report) and writes metrics.json."""
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    d = config.diffusion
    decoder = Decoder(model, tokenizer, d)
    # the checkpoint's sampling settings unless told otherwise (the paper's: DDPM, 250 steps, guidance 3)
    gen = decoder.settings(GenerationConfig(sampler=sampler, steps=steps, cfg_scale=cfg_scale))
    size = vae.config.image_size
    comp, comp_rows, pairs = composition(decoder, vae, n_per_kind, gen, size, seed + 100)
    cap, cap_rows = captioning(decoder, vae, n_captions, size, seed + 200)
    metrics: dict[str, Any] = {f"geneval_{k}": v for k, v in comp.items()}
    metrics.update(cap)
    metrics.update(text_scores(model, tokenizer, 200, size, seed + 300))
    metrics.update(frechet(pairs, size, inception, out))
    metrics.update(
        {
            "eval_sampler": gen.sampler,
            "eval_steps": gen.steps,
            "eval_cfg": gen.cfg_scale,
            "eval_seconds": time.time() - start,
        }
    )
    metrics = {
        k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, {"composition": comp_rows, "pairs": pairs, "captions": cap_rows}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument(
        "--out", default=None, help="where to write metrics.json (default: the checkpoint directory)"
    )
    p.add_argument(
        "--prompts-per-kind", type=int, default=10, help="held-out prompts per GenEval kind (default 10)"
    )
    p.add_argument("--captions", type=int, default=60, help="held-out images to caption (default 60)")
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the config's, 250 as the paper)"
    )
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim", "flow"],
        default=None,
        help="default: the config's (ddpm, ancestral, as the paper; flow for flow models)",
    )
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the config's, 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-inception", default=None, help="a local TorchScript Inception file for real FID")


def run(args: argparse.Namespace) -> int:
    from transfusion.generate_cli import load_for_inference

    loaded, vae = load_for_inference(args.checkpoint)
    if vae is None:
        raise ValueError(f"{args.checkpoint} has no VAE; evaluation needs one to see images")
    out = Path(args.out) if args.out else loaded.path
    if loaded.config.data.source == "fashion_mnist":
        metrics, _ = evaluate_fashion(loaded.model, loaded.tokenizer, vae, loaded.config, out, args.prompts_per_kind,
                                      args.captions, args.steps, args.cfg, args.seed)  # fmt: skip
        for k, v in metrics.items():
            print(f"{k:40s} {v}")
        print(f"wrote {out / 'metrics.json'}")
        return 0
    if loaded.config.data.source != "shapes":
        raise ValueError("evaluation judges the built-in shape scenes or Fashion-MNIST; this checkpoint was "
                         f"trained on {loaded.config.data.source!r}")  # fmt: skip
    metrics, _ = evaluate(loaded.model, loaded.tokenizer, vae, loaded.config, out, args.prompts_per_kind,
                          args.captions, args.steps, args.sampler, args.cfg, args.seed, args.fid_inception)  # fmt: skip
    for k, v in metrics.items():
        print(f"{k:40s} {v}")
    print(f"wrote {out / 'metrics.json'}")
    return 0


# --- Fashion-MNIST, the second dataset --------------------------------------------------------------
class FashionClassifier(nn.Module):
    """A small CNN over 10 Fashion-MNIST classes, trained on the real training set; it judges whether
    generated images show the class their prompt named."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_fashion_classifier(
    data_cfg: Any, steps: int = 600, seed: int = 0
) -> tuple[FashionClassifier, float]:
    """Trained on the real training split; returns it and its accuracy on the real test split."""
    from transfusion.data.sources import FashionMNIST

    torch.manual_seed(seed)
    train, test = FashionMNIST(data_cfg, "train"), FashionMNIST(data_cfg, "test")
    idx = torch.randperm(len(train))[:12000].tolist()
    x = pil_to_tensor([train[i].image for i in idx])
    y = torch.tensor([int(train.labels[i]) for i in idx])
    clf = FashionClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(steps):
        j = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(clf(x[j]), y[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tx = pil_to_tensor([test[i].image for i in range(1000)])
    ty = torch.tensor([int(test.labels[i]) for i in range(1000)])
    with torch.no_grad():
        acc = (clf.eval()(tx).argmax(1) == ty).float().mean().item()
    return clf, acc


def class_named(text: str) -> int | None:
    """The Fashion-MNIST class a caption names (the longest class name found in it), or None."""
    from transfusion.data.sources import FASHION_CLASSES

    text = " ".join(M.tokenize(text))
    found = [(len(name), i) for i, name in enumerate(FASHION_CLASSES) if " ".join(M.tokenize(name)) in text]
    return max(found)[1] if found else None


def evaluate_fashion(
    model: Any, tokenizer: Any, vae: Any, config: Any, out_dir: str | Path, per_class: int = 5,
    n_captions: int = 50, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
    classifier_steps: int = 600,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Class-conditional generation accuracy (a classifier trained on real images judges each image)
    and caption accuracy (the caption names the right class) on held-out test images."""
    from transfusion.data.sources import FASHION_CLASSES, FashionMNIST, with_article

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    d = config.diffusion
    decoder = Decoder(model, tokenizer, d)
    gen = decoder.settings(GenerationConfig(steps=steps, cfg_scale=cfg_scale))
    clf, clf_acc = train_fashion_classifier(config.data, classifier_steps)
    prompts = [
        (c, f"a photo of {with_article(name)}")
        for c, name in enumerate(FASHION_CLASSES)
        for _ in range(per_class)
    ]
    latents = torch.stack(
        text_to_image(decoder, [p for _, p in prompts], gen, seeds=list(range(len(prompts))))
    )
    images = _decode(vae, latents)
    with torch.no_grad():
        predicted = clf(pil_to_tensor(images)).argmax(1).tolist()
    gen_ok = [p == c for p, (c, _) in zip(predicted, prompts)]
    test = FashionMNIST(config.data, "test")
    records = [test[i] for i in range(n_captions)]
    with torch.no_grad():
        lat = vae.to_diffusion(vae.encode(pil_to_tensor([r.image for r in records])))
    texts = caption(decoder, list(lat.float()), GenerationConfig(max_new_tokens=32, temperature=0.0))
    cap_ok = [class_named(t) == r.meta["label"] for t, r in zip(texts, records)]
    metrics = {
        "fashion_generation_accuracy": M.accuracy(gen_ok),
        "fashion_caption_accuracy": M.accuracy(cap_ok),
        "fashion_classifier_test_accuracy": clf_acc,
        "eval_seconds": time.time() - start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    details = {
        "pairs": [(_Prompt(p), im) for (_, p), im in zip(prompts, images)],
        "composition": [{"prompt": p, "kind": FASHION_CLASSES[c], "correct": ok} for (c, p), ok in zip(prompts, gen_ok)],
        "captions": [{"caption": t, "truth": r.text, "correct": ok, "image": r.image} for t, r, ok in zip(texts, records, cap_ok)],
    }  # fmt: skip
    return metrics, details


class _Prompt:
    """What the report needs of a prompt record: its text."""

    def __init__(self, text: str):
        self.text = text
