"""The paper's rules for turning a record into a training ``Sample``.

- A captioned image is ordered caption-first with probability ``caption_first_prob`` (0.8), else
  image-first; an image-first image is noise-limited (t <= 500) so the model mostly learns to describe
  recognisable images (PAPER.md).
- With ``describe_in_reading_order``, an image-first caption that states a relation names the upper or
  left object first (``shapes.reading_order``); caption-first captions keep their wording.
- With probability ``cond_dropout`` (0.1) the caption of a caption-first pair is dropped, leaving the
  image alone after BOS: the unconditional branch classifier-free guidance needs.
- An edit (a record with a ``target``) is the paper's section 4.4 sequence: the input image, clean and
  without a loss (``Image.condition``), the instruction, then the output image, trained as any image;
  the loss is on the output image only (no text loss on the instruction).
- ``image_only_ratio`` of captioned records are used as an image alone; ``text_only_ratio`` of them as
  their caption alone, unless ``text_path`` names a text corpus: then the loader mixes that corpus's
  documents in at ``text_only_ratio`` instead.

All randomness comes from the ``random.Random`` passed in, which the loader seeds per (seed, index), so
sample i is the same whatever the order or number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from transfusion.config import DataConfig
from transfusion.data.base import Record
from transfusion.sequence import Image, Sample, Text

PLACEHOLDER = torch.empty(0)
"""Image latents are filled in by the loader once it knows which samples fit a batch."""


def pair(record: Record, tokenize: Callable[[str], list[int]], cfg: DataConfig, rng: random.Random) -> Sample:
    """A Sample whose Image segments hold ``PLACEHOLDER`` latents: ``record.image`` (and, for an edit,
    ``record.target`` after it)."""
    if record.target is not None:
        return Sample([Image(PLACEHOLDER, condition=True), Text(tokenize(record.text or "")),
                       Image(PLACEHOLDER, seed=rng.getrandbits(62))], text_loss=False)  # fmt: skip
    has_image, has_text = record.has_image, bool(record.text)
    if has_image and has_text:
        u = rng.random()
        text_only = 0.0 if cfg.text_path else cfg.text_only_ratio  # with text_path, text comes from there
        if u < text_only:
            has_image = False
        elif u < text_only + cfg.image_only_ratio:
            has_text = False
    if not has_image:
        return Sample([Text(tokenize(record.text or ""))])
    if not has_text:
        return Sample([Image(PLACEHOLDER, seed=rng.getrandbits(62))])
    seed = rng.getrandbits(62)
    if rng.random() < cfg.caption_first_prob:
        if rng.random() < cfg.cond_dropout:
            return Sample([Image(PLACEHOLDER, seed=seed)])  # conditioning dropped: unconditional image
        return Sample([Text(tokenize(record.text)), Image(PLACEHOLDER, seed=seed)])
    text = record.text
    if cfg.describe_in_reading_order:
        from transfusion.data.shapes import reading_order

        text = reading_order(text)
    return Sample([Image(PLACEHOLDER, noise_limited=True, seed=seed), Text(tokenize(text))])
