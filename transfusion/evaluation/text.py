"""Held-out text scored by the model: bits per byte and per-token perplexity."""

from __future__ import annotations

from typing import Any

import torch

from transfusion.evaluation import metrics as M
from transfusion.losses import text_nll
from transfusion.sequence import Image, Sample, Specials, Text, pack, sample_length


@torch.no_grad()
def text_scores(
    model: Any, tokenizer: Any, texts: list[str], batch_size: int = 64, before_image: bool = False
) -> dict[str, float]:
    """Bits per byte and per-token perplexity of ``texts`` as text-only samples (BOS text EOS, one per
    row, ``batch_size`` rows at a time). Bytes count the UTF-8 text and EOS, which the loss also
    predicts; a text longer than the model's context is cut to it. ``before_image``: each text as the
    caption of a caption-first pair (BOS text BOI image EOI EOS), the text and the BOI after it scored
    (the image, after them, cannot change their loss): a captioning model's own text, where EOS right
    after a caption is a token it never learnt to expect."""
    sp = Specials.of(tokenizer)
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len - (model.cfg.patches_per_image + 2 if before_image else 0)
    c = model.cfg
    blank = torch.zeros(c.latent_channels, c.latent_size, c.latent_size)
    nll, tokens = 0.0, 0
    for i in range(0, len(texts), batch_size):
        chunk = [
            Sample(
                [Text(tokenizer.encode(t)[: limit - 2]), *([Image(blank, t=0)] if before_image else [])],
                text_loss=True,
                eos=not before_image,
            )  # fmt: skip
            for t in texts[i : i + batch_size]
        ]
        longest = max(sample_length(s, c.patches_per_image) for s in chunk)
        batch = pack(chunk, longest, sp, model.cfg.patches_per_image, one_per_row=True).to(device)
        total, count = text_nll(model(batch).logits, batch.text_targets)
        nll, tokens = nll + float(total), tokens + int(count)
    n_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts)
    return {"text_bits_per_byte": M.bits_per_byte(nll, n_bytes), "text_perplexity": M.perplexity(nll, tokens)}
