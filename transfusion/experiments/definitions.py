"""The controlled comparisons that reproduce the paper's findings in miniature, one ``Experiment`` each.

Every arm of an experiment trains on the same data stream with the same seeds; only the studied knob
differs (its ``overrides``). Budgets are training FLOPs (``transfusion.flops``), as multiples of a unit
the runner sizes to ``--minutes``, so arms compare at equal compute, as the paper's figures do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

EXPERIMENT_MODEL = [
    "diffusion.objective=ddpm",  # the paper's epsilon objective (the demo trains a flow model)
    "model.dim=128",
    "model.n_layers=3",
    "model.n_heads=4",
    "model.patcher=unet",
    "model.unet_channels=32",
    "model.patch_size=2",
    "model.rope_2d=false",
    "model.image_attention=bidirectional",
    "diffusion.guidance_max_t=null",
    "data.caption_first_prob=0.8",
    "data.canonical_relations=0",  # either wording, as the scenes state them (the demo names the upper first)
    "data.pairs_in_reading_order=false",
    "train.batch_size=16",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
]
"""What every experiment trains unless an arm changes it: the paper's recipe (U-Net 2x2 patches,
bidirectional image attention, raster-order positions, guidance at every step, 80% caption-first
pairs, relation captions in either wording), whatever the demo's own choices, on a trunk 128 wide and 3 layers deep, so that a budget of
minutes still buys over a thousand steps on 2 CPU cores; the U-Net at 32 channels (64 would cost more
than the trunk at this width)."""

LINEAR = ["model.patcher=linear"]
UNET = ["model.patcher=unet"]
CHAMELEON = [
    "model.image_tokens=discrete",
    "model.patch_size=1",
    "model.latent_channels=1",
    "model.patcher=linear",
]
"""The Chameleon-style arm: VQ codes as tokens (the codebook size comes from the shared VQ tokenizer)."""


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()
    label: str = ""
    """What the plots and tables call it (default: the name)."""

    @property
    def discrete(self) -> bool:
        return "model.image_tokens=discrete" in self.overrides

    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Finding:
    """One direction the paper reports: ``better`` should beat ``worse`` on ``metric``."""

    metric: str
    better: str
    worse: str
    higher_is_better: bool
    paper: str
    """What the paper measured (figure or table, numbers)."""


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    arms: tuple[Arm, ...]
    findings: tuple[Finding, ...]
    budgets: tuple[float, ...] = (1.0, 2.0)
    """Training FLOPs of the points, as multiples of the unit."""
    metrics: tuple[str, ...] = ("geneval_overall", "fd_project_classifier", "caption_accuracy")
    """What the page plots against training FLOPs."""
    cfg_scales: tuple[float, ...] = (3.0,)
    """Guidance weights every trained point is evaluated at (the sweep of the 'guidance' experiment)."""
    eval_cfg: float = 3.0
    """Guidance weight of the main evaluation (PAPER.md: 3 in the ablations, 5 against Chameleon)."""
    minutes: float = 30.0
    """Default budget (``--minutes``): shared assets, training and evaluation of every point."""
    text_corpus: bool = False
    """Mix Debian's fortunes in as text-only samples and score held-out fortunes (bits per byte)."""
    base: tuple[str, ...] = field(default_factory=tuple)
    """Overrides every arm shares (on top of ``EXPERIMENT_MODEL``)."""
    interval_reading: int | None = None
    """When set, the images of every diffusion arm are drawn a second time with guidance only at
    t <= this (vs-chameleon reads 700, the demo's interval before it moved to 850) and read as
    ``<metric>_interval``; VQ-code arms have no timesteps, so their second reading is their first."""
    about: str = ""
    dataset: str = "shapes"
    """What every point trains and is judged on: 'shapes' (the built-in scenes) or 'fashion_mnist'
    (``for_dataset``)."""


BESIDE_FD = (("precision_project_classifier", True), ("recall_project_classifier", True),
             ("geneval_well_formed", True))  # fmt: skip
"""Read beside FD in every experiment, each with its own verdict: precision and recall in the same
features (on the real manifold? covering it?) and the share of well-formed objects."""


DENOISING = ("image_val_loss", "image_val_loss_early")
"""The denoising loss on held-out pairs (``evaluation.denoising``): over every band of t and patch,
and over the first quarter of the patches in raster order (where causal attention sees least)."""


def beside_fd(exp: Experiment) -> Experiment:
    """``exp`` with a finding on each of ``BESIDE_FD`` next to every finding on FD (same arms), and,
    where both arms diffuse, one on each of ``DENOISING`` (lower is better)."""
    out: list[Finding] = []
    arms = {a.name: a for a in exp.arms}
    for f in exp.findings:
        out.append(f)
        if f.metric.startswith("fd_project_classifier"):
            suffix = f.metric.removeprefix("fd_project_classifier")
            paper = "not in the paper (it reports FID only); read beside the FD finding above"
            out += [Finding(m + suffix, f.better, f.worse, up, paper) for m, up in BESIDE_FD]
            if not suffix and not (arms[f.better].discrete or arms[f.worse].discrete):
                paper = "not in the paper: the training loss on held-out images, free of sampler and judge"
                out += [Finding(m, f.better, f.worse, False, paper) for m in DENOISING]
    metrics = exp.metrics
    if not all(a.discrete for a in exp.arms) and "image_val_loss" not in metrics:
        metrics = (*metrics, "image_val_loss")
    return dataclasses.replace(exp, findings=tuple(out), metrics=metrics)


DATASETS = ("shapes", "fashion_mnist")
FASHION_METRICS = {
    "fd_project_classifier": "fd_judge",
    "precision_project_classifier": "precision_judge",
    "recall_project_classifier": "recall_judge",
    "geneval_overall": "class_accuracy",
    "geneval_blank_rate": "blank_rate",
    "caption_cider_d": "caption_accuracy",
    **{m: m for m in ("caption_accuracy", "fortune_bits_per_byte", "sample_seconds_per_image", *DENOISING)},
}
"""What each shape-scene metric reads on Fashion-MNIST (``evaluation.fashion.judged_images``): FD and
precision/recall in the judge's penultimate features against the real test images (the FID analogue,
as FID on MNIST is read in a LeNet's features), the judge's class accuracy of generated images (the
CLIP-score analogue), caption accuracy (the class named; captions are one template and a class name,
so CIDEr-D says nothing more). Well-formed objects and the guidance-interval reading are the scenes'
own: they have no counterpart."""


def metric_on(dataset: str, metric: str) -> str:
    """What a shape-scene metric is called on ``dataset`` (``FASHION_METRICS`` on Fashion-MNIST)."""
    return FASHION_METRICS[metric] if dataset == "fashion_mnist" else metric


def for_dataset(exp: Experiment, dataset: str) -> Experiment:
    """``exp`` trained and judged on ``dataset``: the same arms and plans, its metrics and findings
    read through ``FASHION_METRICS`` on Fashion-MNIST (a finding without a counterpart dropped, one
    that maps onto another kept once)."""
    if dataset == "shapes":
        return exp
    if dataset != "fashion_mnist":
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    findings: list[Finding] = []
    for f in exp.findings:
        metric = FASHION_METRICS.get(f.metric)
        g = dataclasses.replace(f, metric=metric) if metric else None
        if g and all((g.metric, g.better, g.worse) != (h.metric, h.better, h.worse) for h in findings):
            findings.append(g)
    metrics = dict.fromkeys(FASHION_METRICS[m] for m in exp.metrics if m in FASHION_METRICS)
    if exp.arms and not all(a.discrete for a in exp.arms):
        metrics |= dict.fromkeys(("class_accuracy", "fd_judge"))
    return dataclasses.replace(
        exp, findings=tuple(findings), metrics=tuple(metrics), interval_reading=None, dataset=dataset,
        title=f"{exp.title}, on Fashion-MNIST",
    )  # fmt: skip


EXPERIMENTS: dict[str, Experiment] = {
    e.name: beside_fd(e)
    for e in [
        Experiment(
            name="vs-chameleon",
            title="Transfusion against a Chameleon-style model at equal training FLOPs (paper Figures 7-8)",
            arms=(
                Arm("transfusion", tuple(UNET), "Transfusion (U-Net 2x2, diffusion)"),
                Arm("chameleon", tuple(CHAMELEON), "Chameleon-style (VQ codes, next-token)"),
            ),
            budgets=(1.0, 2.0, 4.0),
            minutes=45.0,
            eval_cfg=5.0,
            text_corpus=True,
            interval_reading=700,
            metrics=(
                "geneval_overall",
                "fd_project_classifier",
                "geneval_overall_interval",
                "fd_project_classifier_interval",
                "caption_accuracy",
                "caption_cider_d",
                "fortune_bits_per_byte",
            ),  # fmt: skip
            findings=(
                Finding(
                    "fd_project_classifier",
                    "transfusion",
                    "chameleon",
                    False,
                    "Table 3 (7B): COCO FID 16.8 vs 29.6; parity at 2.9% of Chameleon's FLOPs (Figure 8)",
                ),
                Finding(
                    "geneval_overall",
                    "transfusion",
                    "chameleon",
                    True,
                    "Figure 7: Transfusion's image generation ahead at every budget",
                ),
                Finding(
                    "fd_project_classifier_interval",
                    "transfusion",
                    "chameleon",
                    False,
                    "as FD above, Transfusion's images guided only at t <= 700 (against blank images)",
                ),
                Finding(
                    "geneval_overall_interval",
                    "transfusion",
                    "chameleon",
                    True,
                    "as composition above, Transfusion's images guided only at t <= 700",
                ),
                Finding(
                    "caption_cider_d",
                    "transfusion",
                    "chameleon",
                    True,
                    "Table 3 (7B): COCO CIDEr 27.2 vs 18.0",
                ),
                Finding(
                    "fortune_bits_per_byte",
                    "transfusion",
                    "chameleon",
                    False,
                    "Table 3-4: C4 perplexity 7.72 vs 8.41 (7B); text does not suffer",
                ),
            ),  # fmt: skip
            about="Images as diffused latent patches against images as discrete VQ codes in the vocabulary, "
            "the same trunk, tokenizer and data, with text documents (fortunes) mixed in.",
        ),
        Experiment(
            name="attention",
            title="Bidirectional against causal attention inside images (paper Table 5)",
            arms=(
                Arm(
                    "bidirectional",
                    (*LINEAR, "model.image_attention=bidirectional"),
                    "linear 2x2, bidirectional",
                ),
                Arm("causal", (*LINEAR, "model.image_attention=causal"), "linear 2x2, causal"),
            ),
            findings=(
                Finding(
                    "fd_project_classifier",
                    "bidirectional",
                    "causal",
                    False,
                    "Table 5 (0.76B, linear 2x2): FID 20.3 bidirectional vs 61.3 causal",
                ),
                Finding(
                    "caption_cider_d",
                    "bidirectional",
                    "causal",
                    True,
                    "Table 5: CIDEr 16.0 bidirectional vs 12.7 causal",
                ),
            ),  # fmt: skip
            metrics=("fd_project_classifier", "geneval_overall", "caption_cider_d"),
            about="The paper's mask lets the patches of one image see each other; the ablation makes "
            "them causal like text.",
        ),
        Experiment(
            name="patch-size",
            title="Patch size 1, 2, 4 with the linear and the U-Net patcher at equal FLOPs (paper Table 6)",
            arms=(
                Arm("linear-1", (*LINEAR, "model.patch_size=1"), "linear 1x1"),
                Arm("linear-2", (*LINEAR, "model.patch_size=2"), "linear 2x2"),
                Arm("linear-4", (*LINEAR, "model.patch_size=4"), "linear 4x4"),
                Arm("unet-2", (*UNET, "model.patch_size=2"), "U-Net 2x2"),
                Arm("unet-4", (*UNET, "model.patch_size=4"), "U-Net 4x4"),
            ),
            minutes=40.0,
            findings=(
                Finding(
                    "fd_project_classifier",
                    "linear-2",
                    "linear-4",
                    False,
                    "Table 6: linear FID 20.3 at 2x2, 25.6 at 4x4",
                ),
                Finding(
                    "fd_project_classifier",
                    "unet-4",
                    "linear-4",
                    False,
                    "Table 6: at 4x4 the U-Net keeps FID 16.0, the linear patcher 25.6",
                ),
            ),  # fmt: skip
            metrics=(
                "fd_project_classifier",
                "geneval_overall",
                "caption_accuracy",
                "sample_seconds_per_image",
            ),
            about="Larger patches put fewer positions per image in the sequence (cheaper training and "
            "sampling); the paper finds U-Net edges lose little with them.",
        ),
        Experiment(
            name="patcher",
            title="Linear against U-Net patcher, with bidirectional and causal image attention (paper Tables 5, 7)",
            arms=(
                Arm("linear", (*LINEAR,), "linear, bidirectional"),
                Arm("unet", (*UNET,), "U-Net, bidirectional"),
                Arm("linear-causal", (*LINEAR, "model.image_attention=causal"), "linear, causal"),
                Arm("unet-causal", (*UNET, "model.image_attention=causal"), "U-Net, causal"),
            ),
            minutes=40.0,
            findings=(
                Finding(
                    "fd_project_classifier",
                    "unet",
                    "linear",
                    False,
                    "Table 7 (0.16B, 2x2): FID 18.8 U-Net vs 37.6 linear",
                ),
                Finding(
                    "caption_cider_d",
                    "unet",
                    "linear",
                    True,
                    "Table 7 (0.16B): CIDEr 15.3 U-Net vs 6.2 linear",
                ),
                Finding(
                    "fd_project_classifier",
                    "unet-causal",
                    "linear-causal",
                    False,
                    "Table 5: with U-Net edges the causal/bidirectional gap almost vanishes (FID 16.8 vs 16.7)",
                ),
            ),  # fmt: skip
            metrics=("fd_project_classifier", "geneval_overall", "caption_cider_d"),
            about="U-Net down/up blocks as the image edges instead of one linear layer; the U-Net's own "
            "convolutions see the whole image, so causal attention should hurt it less.",
        ),
        Experiment(
            name="noise-limit",
            title="Limiting noise to t <= 500 for captioning pairs (paper Table 8)",
            arms=(
                Arm("limit-500", ("diffusion.noise_limit=500",), "t <= 500 when the image comes first"),
                Arm("no-limit", ("diffusion.noise_limit=1000",), "no limit"),
            ),
            base=("data.caption_first_prob=0.6",),
            findings=(
                Finding(
                    "caption_cider_d", "limit-500", "no-limit", True, "Table 8 (0.76B): CIDEr 29.4 vs 25.4"
                ),
                Finding("caption_accuracy", "limit-500", "no-limit", True, "Table 8: captioning improves"),
            ),  # fmt: skip
            metrics=("caption_cider_d", "caption_accuracy", "geneval_overall"),
            about="Image-first (captioning) pairs see mostly recognisable images when their noise is "
            "limited; 40% of pairs are image-first here so that captioning gets enough of them.",
        ),
        Experiment(
            name="mot",
            title="Modality-specific weights (Mixture-of-Transformers) against one shared trunk at equal training FLOPs",
            arms=(
                Arm("shared", (*UNET, "model.modality_weights=shared"), "shared weights"),
                Arm("mot", (*UNET, "model.modality_weights=mot"), "MoT: a text and an image copy"),
            ),
            budgets=(1.0, 2.0),
            minutes=45.0,
            text_corpus=True,
            metrics=(
                "fd_project_classifier",
                "geneval_overall",
                "caption_cider_d",
                "caption_accuracy",
                "fortune_bits_per_byte",
            ),  # fmt: skip
            findings=(
                Finding(
                    "fd_project_classifier",
                    "mot",
                    "shared",
                    False,
                    "MoT (arXiv 2411.04996), Transfusion setting: 760M MoT beats a 1.4B dense model on "
                    "image generation; at 7B dense image quality at about a third of the FLOPs",
                ),
                Finding("geneval_overall", "mot", "shared", True, "MoT: image generation improves"),
                Finding(
                    "caption_cider_d",
                    "mot",
                    "shared",
                    True,
                    "LMFusion (arXiv 2412.15188): image understanding +20% with modality-specific weights",
                ),
                Finding("caption_accuracy", "mot", "shared", True, "LMFusion: image understanding improves"),
                Finding(
                    "fortune_bits_per_byte",
                    "mot",
                    "shared",
                    False,
                    "MoT: text quality matches or beats the dense model's at equal FLOPs",
                ),
            ),  # fmt: skip
            about="Every block holds a text and an image copy of its norms, attention projections and "
            "feed-forward layer; each position goes through its modality's copy and attention runs "
            "over the whole sequence. Same FLOPs per position, twice the trunk's parameters.",
        ),
        Experiment(
            name="guidance",
            title="Classifier-free guidance weight on trained models (paper: 3 in ablations, 5 against Chameleon)",
            arms=(Arm("transfusion", tuple(UNET), "Transfusion"),),
            cfg_scales=(1.0, 1.5, 3.0, 5.0, 7.0),
            findings=(),
            metrics=("geneval_overall", "fd_project_classifier", "geneval_blank_rate"),
            about="One model per seed and budget, sampled at every guidance weight.",
        ),
    ]
}
