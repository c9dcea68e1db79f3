"""Evaluate a model trained on Fashion-MNIST, the second built-in dataset: class-conditional
generation accuracy (a classifier trained on the real training images judges each generated image)
and caption accuracy (the caption names the right class) on held-out test images."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transfusion.evaluation import metrics as M
from transfusion.evaluation.common import prepare
from transfusion.generate import GenerationConfig, caption, text_to_image
from transfusion.io import atomic_write_text
from transfusion.vae import decode_latents, encode_images, pil_to_tensor


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
    n_captions: int = 50, steps: int | None = None, sampler: str | None = None, cfg_scale: float | None = None,
    seed: int = 0, classifier_steps: int = 600, guidance_max_t: int | None = -1,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Class-conditional generation accuracy (a classifier trained on real images judges each image)
    and caption accuracy (the caption names the right class) on held-out test images. Images are
    sampled with the checkpoint's settings unless ``sampler``, ``steps`` or ``cfg_scale`` say
    otherwise; image i uses seed ``seed + i``."""
    from transfusion.data.sources import FASHION_CLASSES, FashionMNIST, with_article

    start = time.time()
    out, decoder, gen = prepare(model, tokenizer, config, out_dir, sampler, steps, cfg_scale, guidance_max_t)
    clf, clf_acc = train_fashion_classifier(config.data, classifier_steps)
    prompts = [
        (c, f"a photo of {with_article(name)}")
        for c, name in enumerate(FASHION_CLASSES)
        for _ in range(per_class)
    ]
    latents = torch.stack(
        text_to_image(decoder, [p for _, p in prompts], gen, seeds=[seed + i for i in range(len(prompts))])
    )
    images = decode_latents(vae, latents)
    with torch.no_grad():
        predicted = clf(pil_to_tensor(images)).argmax(1).tolist()
    gen_ok = [p == c for p, (c, _) in zip(predicted, prompts)]
    test = FashionMNIST(config.data, "test")
    records = [test[i] for i in range(n_captions)]
    lat = encode_images(vae, [r.image for r in records])
    texts = caption(decoder, list(lat), GenerationConfig(max_new_tokens=32, temperature=0.0))
    cap_ok = [class_named(t) == r.meta["label"] for t, r in zip(texts, records)]
    metrics = {
        "fashion_generation_accuracy": M.accuracy(gen_ok),
        "fashion_caption_accuracy": M.accuracy(cap_ok),
        "fashion_classifier_test_accuracy": clf_acc,
        "eval_sampler": gen.sampler,
        "eval_steps": gen.steps,
        "eval_cfg": gen.cfg_scale,
        "eval_guidance_max_t": gen.guidance_max_t,
        "eval_seconds": time.time() - start,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
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
