"""What every evaluator starts from: the output directory, the pipeline's decoder, and its sampling settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfusion.generate import Decoder, GenerationConfig


def prepare(
    pipe: Any,
    out_dir: str | Path,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    guidance_max_t: int | None = -1,
) -> tuple[Path, Decoder, GenerationConfig]:
    """(the output directory, created; the ``Pipeline``'s decoder; the image sampling settings: the
    checkpoint's, the paper's DDPM 250 steps with guidance 3 by default, unless told otherwise)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = pipe.settings(sampler=sampler, steps=steps, guidance=cfg_scale, guidance_max_t=guidance_max_t)
    return out, pipe.decoder, gen
