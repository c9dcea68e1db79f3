"""The Transfusion network: text embedding and LM head, image patcher in and out, one shared trunk.

``forward(batch)`` maps a packed ``MixedBatch`` whose ``latents`` are already noised (at
``batch.timesteps``) to next-token logits at every position and a noise prediction per image. The
network does no noise sampling, no losses and no decoding loop: see ``diffusion``, ``losses`` and
``generate``.

Shape legend: B rows, L positions, D width, V vocabulary, N images, n patches per image,
C/H/W latent channels/height/width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from transfusion import masks
from transfusion.config import ModelConfig
from transfusion.layers import (
    KV,
    Block,
    Pair,
    Prefix,
    RMSNorm,
    RotaryEmbedding,
    Route,
    Routing,
    axial_positions,
)
from transfusion.patching import make_patcher
from transfusion.sequence import MixedBatch


@dataclass
class Cached:
    """What a cached call returns: the new positions' keys/values per layer (to append to the cache)
    and the prediction the call is for."""

    kv: list[KV]
    logits: Tensor | None = None  # (R, V) next-token logits
    image_pred: Tensor | None = None  # (R, C, H, W) predicted noise (or velocity)


def _can_check(t: Tensor) -> bool:
    """Whether a data-dependent check is free here: on the CPU and not inside ``torch.compile`` (on a
    GPU it would wait for the device; in a compiled graph it would break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _continue(start: Tensor, q: int, device: torch.device) -> Tensor:
    """RoPE positions (R, q) of q new positions after each row's ``start`` (R,) cached ones."""
    return (start.to(device)[:, None] + torch.arange(q, device=device)[None, :]).long()


@dataclass
class ModelOutput:
    logits: Tensor  # (B, L, V) next-token logits at every position
    image_pred: Tensor  # (N, C, H, W) predicted noise (or velocity) of every image


class Transfusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.total_vocab, cfg.dim)
        self.patcher = None if cfg.discrete else make_patcher(cfg)  # discrete images are tokens
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.image_pos = (
            nn.Parameter(torch.zeros(cfg.patches_per_image, cfg.dim)) if cfg.image_pos_embed else None
        )  # (n, D): one learned vector per patch place, raster order
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.total_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation in one place.

        - every Linear and the embedding: normal(0, init_std), biases zero;
        - the residual output projections (attention ``wo``, MLP ``down``, both copies under MoT): std
          scaled by 1/sqrt(2 * n_layers) (GPT-2), so the residual stream's variance does not grow with depth;
        - RMSNorm weights: one;
        - the image output layer: zero (DiT), so an untrained model predicts zero noise and the
          diffusion loss starts at the variance of the target;
        - the patch-place vectors (``image_pos_embed``): zero, so they start as the paper's model.
        """
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for block in self.layers:
            for out in (block.attn.wo, block.mlp.down):
                for copy in (out.text, out.image) if isinstance(out, Pair) else (out,):
                    nn.init.normal_(copy.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
        if hasattr(self.patcher, "reset_parameters"):
            self.patcher.reset_parameters()
        if self.patcher is not None:
            self.patcher.zero_init_output()
        if self.image_pos is not None:
            nn.init.zeros_(self.image_pos)

    # --- pieces, shared by forward() and the cached API ---------------------------------------------
    @property
    def mot(self) -> bool:
        """Modality-specific weights (Mixture-of-Transformers): a text and an image copy per block."""
        return self.cfg.modality_weights == "mot"

    def route(self, image_index: Tensor, num_images: int) -> Routing:
        """Which positions take the image copies (patches; BOI and EOI are text), or None (shared);
        ``num_images`` images of ``patches_per_image`` positions each (known on the host)."""
        return Route.of(image_index > 0, num_images * self.cfg.patches_per_image) if self.mot else None

    def backend(self, device: torch.device) -> str:
        if self.cfg.attention == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        return self.cfg.attention

    def attention_mask(self, doc_ids: Tensor, image_index: Tensor, dense: bool = False) -> Any:
        """The rule of ``masks`` in the backend this model uses on this device (or dense), causal
        inside images too when ``image_attention`` is 'causal' (no position is then in an image for
        the rule)."""
        if self.cfg.image_attention == "causal":
            image_index = torch.zeros_like(image_index)
        if self.backend(doc_ids.device) == "flex" and not dense:
            return masks.block_mask(doc_ids, image_index)
        return masks.dense_mask(doc_ids, image_index)

    def patch_vectors(self, latents: Tensor, timesteps: Tensor) -> tuple[Tensor, Any]:
        """Noisy latents (N, C, H, W) at timesteps (N,) -> patch vectors (N, n, D) and the patcher's
        context, with the patch-place vectors added under ``image_pos_embed``."""
        patches, ctx = self.patcher.encode(latents, timesteps)
        if self.image_pos is not None:
            patches = patches + self.image_pos.to(patches.dtype)
        return patches, ctx

    def embed(
        self, ids: Tensor, patch_mask: Tensor, latents: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Any]:
        """Token embeddings, with the patch vectors of every image written at its patch positions
        (``patch_mask`` must hold exactly N x n positions: ``pack`` lays them out so)."""
        x = self.tok_emb(ids)  # (B, L, D)
        if latents.shape[0] == 0:
            return x, None
        patches, ctx = self.patch_vectors(latents.to(x.dtype), timesteps)  # (N, n, D)
        if _can_check(ids) and int(patch_mask.sum()) != patches.shape[0] * patches.shape[1]:
            raise ValueError(
                f"{int(patch_mask.sum())} patch positions for {patches.shape[0]} images x {patches.shape[1]} patches"
            )
        x = x.masked_scatter(patch_mask[..., None], patches.to(x.dtype))
        return x, ctx

    def trunk(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Any,
        past: list[Prefix] | None = None,
        image_index: Tensor | None = None,
        keep_kv: bool = True,
        route: Routing = None,
    ) -> tuple[Tensor, list[KV]]:
        """Run every block; returns the final-normed hidden states and each layer's new (k, v)
        (none with ``keep_kv=False``: training does not hold every layer's keys and values to the end
        of the forward, which under activation checkpointing would cost more than the checkpoints).
        ``image_index`` gives image patches their 2D RoPE positions when ``rope_2d`` is on; ``route``
        which positions take the image copies of the weights (``modality_weights=mot``)."""
        axial = None
        if self.cfg.rope_2d and image_index is not None:
            axial = axial_positions(positions, image_index, self.cfg.patches_per_side)
        cos, sin = self.rope(positions, axial)
        new_kv = []
        for i, block in enumerate(self.layers):
            x, kv = block(x, cos, sin, mask, None if past is None else past[i], route, keep_kv)
            if keep_kv:
                new_kv.append(kv)
        return self.norm(x), new_kv

    def image_outputs(self, h: Tensor, patch_mask: Tensor, ctx: Any, num_images: int) -> Tensor:
        """Hidden states at patch positions -> latent-shaped predictions (N, C, H, W)."""
        n = self.cfg.patches_per_image
        # the patch positions in order, with the count the host knows (``Route.of``): ``h[patch_mask]``
        # would be a nonzero, whose output size the host waits for
        at = Route.of(patch_mask, num_images * n).image
        hp = h.reshape(-1, h.shape[-1])[at].view(num_images, n, -1)  # (N, n, D)
        return self.patcher.decode(hp, ctx)

    # --- the training / scoring forward ----------------------------------------------------------
    def forward(self, batch: MixedBatch) -> ModelOutput:
        if batch.num_images and _can_check(batch.timesteps) and bool((batch.timesteps < 0).any()):
            raise ValueError("batch has images without a timestep; noise them first (diffusion)")
        patch_mask = batch.patch_mask
        x, ctx = self.embed(batch.ids, patch_mask, batch.latents, batch.timesteps)  # (B, L, D)
        mask = self.attention_mask(batch.doc_ids, batch.image_index)
        route = self.route(batch.image_index, batch.num_images)
        h, _ = self.trunk(
            x, batch.positions, mask, image_index=batch.image_index, keep_kv=False, route=route
        )  # (B, L, D)
        logits = self.lm_head(h)  # (B, L, V)
        if batch.num_images:
            image_pred = self.image_outputs(h, patch_mask, ctx, batch.num_images)
        else:
            image_pred = batch.latents.new_zeros(batch.latents.shape)
            if self.patcher is not None and torch.is_grad_enabled():
                image_pred = image_pred + 0.0 * self.idle_image_term(x)
        return ModelOutput(logits=logits, image_pred=image_pred.float())

    def idle_image_term(self, like: Tensor) -> Tensor:
        """A zero that depends on every image-side parameter outside the trunk (the patcher in and
        out, its timestep MLP, the patch-place vectors): one blank latent through the patcher.

        A micro-batch that holds only text would otherwise leave them out of the backward pass, and
        under torchrun that breaks the step: DDP (``find_unused_parameters=False``) waits for their
        gradients forever or dies with "Expected to have finished reduction", and FSDP2's ranks
        reduce-scatter different sets of gradients. Added times 0 to the (empty) image prediction,
        every parameter gets a gradient (zero) on every rank, whatever its micro-batch holds; the
        image copies of an MoT trunk take part through their (empty) share of the positions."""
        c = self.cfg
        blank = like.new_zeros(1, c.latent_channels, c.latent_size, c.latent_size)
        patches, ctx = self.patch_vectors(blank, torch.zeros(1, device=like.device, dtype=torch.long))
        return self.patcher.decode(patches, ctx).float().sum()

    # --- decoding: the public cached API -----------------------------------------------------------
    # The caller keeps the keys/values (``generate.KVCache``) and passes, per layer, a ``Prefix`` of
    # what each row has cached; every call returns the new positions' keys/values for it to append.
    def prefill(self, batch: MixedBatch, last: Tensor) -> Cached:
        """Whole prompts, one per row (clean prompt images at t = 0): the next-token logits (R, V) at
        positions ``last`` (R,) of each row, and every position's keys/values."""
        x, _ = self.embed(batch.ids, batch.patch_mask, batch.latents, batch.timesteps.clamp(min=0))
        h, kv = self.trunk(
            x,
            batch.positions,
            self.attention_mask(batch.doc_ids, batch.image_index, dense=True),
            image_index=batch.image_index,
            route=self.route(batch.image_index, batch.num_images),
        )
        rows = torch.arange(h.shape[0], device=h.device)
        return Cached(kv=kv, logits=self.lm_head(h[rows, last.to(h.device)]).float())

    def extend_text(self, tokens: Tensor, start: Tensor, past: list[Prefix]) -> Cached:
        """One token per row (R,) after each row's ``start`` (R,) cached positions: its next-token
        logits (R, V) and keys/values."""
        x = self.tok_emb(tokens.to(self.tok_emb.weight.device)[:, None])  # (R, 1, D)
        h, kv = self.trunk(x, _continue(start, 1, x.device), None, past, route="text" if self.mot else None)
        return Cached(kv=kv, logits=self.lm_head(h[:, -1]).float())

    def extend_image(self, latents: Tensor, t: Tensor, start: Tensor, past: list[Prefix]) -> Cached:
        """One image per row, latents (R, C, H, W) at timesteps t (R,), as the n positions after each
        row's ``start`` cached ones (bidirectional among themselves, or causal under causal image
        attention): the predicted noise (or velocity) (R, C, H, W) and the patches' keys/values
        (commit them for a clean image, t = 0)."""
        device = self.tok_emb.weight.device
        patches, ctx = self.patch_vectors(
            latents.to(device, self.tok_emb.weight.dtype), t.to(device)
        )  # (R, n, D)
        if self.cfg.image_attention == "causal":
            past = [dataclasses.replace(p, causal=True) for p in past]
        positions = _continue(start, patches.shape[1], device)
        h, kv = self.trunk(
            patches,
            positions,
            None,
            past,
            image_index=torch.ones_like(positions),
            route="image" if self.mot else None,
        )
        return Cached(kv=kv, image_pred=self.patcher.decode(h, ctx).float())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n
