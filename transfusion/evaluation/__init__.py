"""Evaluation: the paper's kinds of metric on the built-in datasets, and the report.

- ``metrics``: pure metric functions (composition scores, CIDEr-D, bits per byte, Fréchet distance).
- ``scenes``: the shape scenes read back (detector, judges of images and captions).
- ``shapes``: GenEval-style composition, captioning, text and FD for a model trained on the scenes.
- ``fashion``: class-conditional generation and captioning for a model trained on Fashion-MNIST.
- ``text``: held-out text scored (bits per byte, perplexity).
- ``report``: the self-contained HTML page of a run.

``evaluate_checkpoint`` picks the evaluator for the data a model was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def evaluate_checkpoint(
    pipe: Any,
    out_dir: str | Path,
    prompts_per_kind: int,
    captions: int,
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    inception: str | None = None,
    guidance_max_t: int | None = -1,
    relation_wording: str = "auto",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, details for the report) of the model of ``pipe`` (a ``Pipeline``) trained on the shape
    scenes or Fashion-MNIST (``prompts_per_kind`` is then per class); writes ``metrics.json`` in
    ``out_dir``. Images are sampled with the checkpoint's settings unless ``steps``, ``sampler``,
    ``cfg_scale`` or ``guidance_max_t`` (-1: the checkpoint's; None: every step) say otherwise.
    ``relation_wording`` (shape scenes): how prompts that state a relation reach the model
    (``Pipeline.reads_in_reading_order``)."""
    source = pipe.config.data.source
    if source == "fashion_mnist":
        from transfusion.evaluation.fashion import evaluate_fashion

        return evaluate_fashion(pipe, out_dir, prompts_per_kind, captions, steps, sampler, cfg_scale, seed,
                                guidance_max_t=guidance_max_t)  # fmt: skip
    if source != "shapes":
        raise ValueError(
            "evaluation judges the built-in shape scenes or Fashion-MNIST; this checkpoint was trained on "
            f"{source!r}"
        )
    from transfusion.evaluation.shapes import evaluate

    return evaluate(pipe, out_dir, prompts_per_kind, captions, steps, sampler, cfg_scale, seed, inception,
                    guidance_max_t=guidance_max_t, relation_wording=relation_wording)  # fmt: skip
