"""The attention rule, defined once, and its two backends.

    allowed(q, k) = same sample AND (k <= q OR same image)

"Same image" means both positions hold patches of one image (``image_index`` equal and non-zero);
"same sample" keeps packed samples apart. ``rule`` is written with elementwise tensor operations, so
the dense mask (SDPA, the CPU default) broadcasts it over whole index tensors and the FlexAttention
``mask_mod`` (the CUDA default) calls it on scalar indices: one definition, two backends.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def rule(doc_q: Tensor, doc_k: Tensor, img_q: Tensor, img_k: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
    """Causal OR bidirectional within an image, never across samples."""
    same_image = (img_q == img_k) & (img_q > 0)
    return (doc_q == doc_k) & ((k_idx <= q_idx) | same_image)


def dense_mask(
    doc_ids: Tensor,
    image_index: Tensor,
    q_doc: Tensor | None = None,
    q_image: Tensor | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Boolean mask (B, 1, Lq, Lk) for ``scaled_dot_product_attention`` (True = may attend).

    Keys are described by ``doc_ids``/``image_index`` (B, Lk). Queries default to the same positions;
    for cached decoding pass the queries' own ``q_doc``/``q_image`` (B, Lq) and their absolute offset.
    """
    q_doc = doc_ids if q_doc is None else q_doc
    q_image = image_index if q_image is None else q_image
    Lq, Lk = q_doc.shape[1], doc_ids.shape[1]
    q_idx = torch.arange(q_offset, q_offset + Lq, device=doc_ids.device)[:, None]  # (Lq, 1)
    k_idx = torch.arange(Lk, device=doc_ids.device)[None, :]  # (1, Lk)
    m = rule(
        q_doc[:, :, None], doc_ids[:, None, :], q_image[:, :, None], image_index[:, None, :], q_idx, k_idx
    )
    return m[:, None]  # (B, 1, Lq, Lk)


def mask_mod_for(doc_ids: Tensor, image_index: Tensor) -> Any:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` closing over the (B, L) index tensors."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return rule(
            doc_ids[b, q_idx],
            doc_ids[b, kv_idx],
            image_index[b, q_idx],
            image_index[b, kv_idx],
            q_idx,
            kv_idx,
        )

    return mask_mod


def block_mask(doc_ids: Tensor, image_index: Tensor, compiled: bool | None = None) -> Any:
    """FlexAttention ``BlockMask`` for the rule (the CUDA default: sparse blocks are skipped).

    Built by a compiled ``create_block_mask`` on CUDA (``compiled``, default: on CUDA): uncompiled it
    materialises the (B, 1, L, L) booleans and their intermediates on every forward (about 134 MB each
    at 8 x 4096); compiled, it evaluates the rule block by block. On the CPU it stays eager."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = doc_ids.shape
    compiled = doc_ids.is_cuda if compiled is None else compiled
    return create_block_mask(
        mask_mod_for(doc_ids, image_index), B, None, L, L, device=doc_ids.device, _compile=compiled
    )


def reference_mask(doc_ids: Tensor, image_index: Tensor) -> Tensor:
    """The rule as a plain double loop, for tests: (B, L, L) bool."""
    B, L = doc_ids.shape
    out = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                same_doc = doc_ids[b, q] == doc_ids[b, k]
                same_img = image_index[b, q] != 0 and image_index[b, q] == image_index[b, k]
                out[b, q, k] = bool(same_doc and (k <= q or same_img))
    return out
