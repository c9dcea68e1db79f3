"""What trains when starting from a pretrained LLM: freeze the text side (an LMFusion-style start,
Shi et al. 2024, without its separate image copies of the trunk), train the image side, chosen trunk
layers, and optionally only the new rows (BOI, EOI...) of the embedding and LM head."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transfusion.pretrained.hf import TEXT_PREFIXES, added_token_ids
from transfusion.tokenizer import HFTokenizer

_ROWS_ATTR = "_transfusion_trained_rows"


@dataclass
class TextFreeze:
    """What ``freeze_text`` did. Call ``attach(optimizer)`` once the optimizer exists (before its
    first step, and before loading its state on resume) when embedding rows train."""

    trainable: list[str]
    """Parameter names trained in full."""
    frozen: list[str]
    """Parameter names with ``requires_grad=False``."""
    new_rows: list[int]
    """Rows of the embedding and LM head that train (the rest of those matrices is frozen)."""
    row_masked: list[str] = field(default_factory=list)
    """Parameter names trained in ``new_rows`` only (gradient mask)."""
    row_params: list[nn.Parameter] = field(default_factory=list, repr=False)
    handles: list[Any] = field(default_factory=list, repr=False)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Move the row-masked matrices into a parameter group without weight decay.

        Their frozen rows get zero gradients, so Adam moves them by exactly zero; but decoupled
        weight decay (AdamW) would still shrink them by ``lr * weight_decay`` per step. Outside
        that group they stay bit-identical. (The new rows then train without weight decay.)"""
        ids = {id(p) for p in self.row_params}
        moved: list[nn.Parameter] = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in ids and all(p is not q for q in moved)]
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        if any(optimizer.state.get(p) for p in moved):
            raise ValueError("attach() must run before the optimizer's first step")
        if moved:
            optimizer.add_param_group({"params": moved, "weight_decay": 0.0})

    def remove(self) -> None:
        """Undo the gradient masks (not ``requires_grad``)."""
        for h in self.handles:
            h.remove()
        for p in self.row_params:
            if hasattr(p, _ROWS_ATTR):
                delattr(p, _ROWS_ATTR)
        self.handles.clear()


def freeze_text(
    model: nn.Module,
    train_layers: Iterable[int] | None = None,
    train_embeddings_new_rows: bool = True,
    tokenizer: HFTokenizer | None = None,
) -> TextFreeze:
    """Freeze the language model's weights; train the image side and what is chosen here.

    - frozen: the embedding, the LM head, every trunk layer not in ``train_layers``, the final norm;
    - trained: everything else (the patcher: the image-specific parts; with modality-specific
      weights, the image copies of every layer: LMFusion, Shi et al. 2024) and the layers in
      ``train_layers`` (indices; negative ones count from the end);
    - ``train_embeddings_new_rows``: the rows of the ids the tokenizer added (BOI, EOI...; needs
      ``tokenizer``) train through a gradient mask on the embedding and LM head; call
      ``attach(optimizer)`` on the result so weight decay leaves the other rows alone. Otherwise
      those rows stay at their mean initialisation.

    With ``train_layers`` empty the text behaviour cannot change (the patcher does not touch
    text-only sequences; BOI/EOI logits can only move probability mass onto BOI/EOI). Call it before
    wrapping the model (DDP records the parameters that need gradients) and before building the
    optimizer. Works under DDP; under FSDP2 (which replaces the parameters, and the hooks with them)
    use ``train_embeddings_new_rows=False``.
    """
    model = getattr(model, "module", model)
    n_layers = len(model.layers)
    chosen: set[int] = set()
    for i in train_layers or []:
        if not -n_layers <= int(i) < n_layers:
            raise ValueError(
                f"train_layers: layer {i} does not exist (the model has {n_layers}: 0..{n_layers - 1})"
            )
        chosen.add(int(i) % n_layers)
    trained_prefixes = tuple(f"layers.{i}." for i in sorted(chosen))
    trainable, frozen = [], []
    for name, p in model.named_parameters():
        # with modality-specific weights the image copies of the trunk are image side (LMFusion)
        train = not name.startswith(TEXT_PREFIXES) or name.startswith(trained_prefixes) or ".image." in name
        p.requires_grad_(train)
        (trainable if train else frozen).append(name)
    freeze = TextFreeze(trainable=trainable, frozen=frozen, new_rows=[])
    if not train_embeddings_new_rows:
        return freeze
    if tokenizer is None or not hasattr(tokenizer, "base_vocab_size"):
        raise ValueError(
            "freeze_text: train_embeddings_new_rows needs the HFTokenizer (tokenizer=...) to know which "
            "rows are new; or pass train_embeddings_new_rows=False"
        )
    rows = added_token_ids(tokenizer)
    freeze.new_rows = rows
    params = [model.tok_emb.weight]
    if model.lm_head.weight is not model.tok_emb.weight:
        params.append(model.lm_head.weight)
    for p in params:
        mask = torch.zeros(p.shape[0], 1, dtype=torch.bool)
        mask[rows] = True
        p.requires_grad_(True)
        freeze.handles.append(p.register_hook(row_mask_hook(mask)))
        setattr(p, _ROWS_ATTR, rows)
        freeze.row_params.append(p)
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        freeze.frozen.remove(names[id(p)])
        freeze.row_masked.append(names[id(p)])
    return freeze


def row_mask_hook(mask: torch.Tensor) -> Any:
    """A gradient hook that zeroes every row outside ``mask`` (rows x 1, bool). The mask follows the
    gradient to its device: the model is frozen on the CPU and moved to a GPU afterwards, and a mask
    left on the CPU would make the first backward on CUDA fail."""
    on: dict[torch.device, torch.Tensor] = {}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        m = on.get(grad.device)
        if m is None:
            m = on[grad.device] = mask.to(grad.device)
        return torch.where(m, grad, torch.zeros_like(grad))

    return hook


def trainable_parameters_summary(model: nn.Module) -> str:
    """A small table: parameters per part of the model (tok_emb, patcher, layers.i, norm, lm_head)
    and how many of them train (row-masked matrices count their trained rows only)."""
    model = getattr(model, "module", model)
    groups: dict[str, list[int]] = {}
    notes: dict[str, str] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        total, trained = groups.setdefault(group, [0, 0])
        rows = getattr(p, _ROWS_ATTR, None)
        if rows is not None and p.requires_grad:
            n = len(rows) * math.prod(p.shape[1:])
            notes[group] = f"rows {rows[0]}..{rows[-1]}" if len(rows) > 1 else f"row {rows[0]}"
        else:
            n = p.numel() if p.requires_grad else 0
        groups[group] = [total + p.numel(), trained + n]
    lm_head, tok_emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
    if lm_head is not None and tok_emb is not None and lm_head.weight is tok_emb.weight:
        notes["tok_emb"] = ", ".join(filter(None, [notes.get("tok_emb"), "tied with lm_head"]))
    all_total = sum(t for t, _ in groups.values())
    all_trained = sum(n for _, n in groups.values())
    width = max(len(g) for g in groups)
    lines = [f"trainable parameters: {all_trained:,} of {all_total:,} ({100 * all_trained / all_total:.2f}%)"]
    for group, (total, trained) in groups.items():
        state = "trained" if trained == total else "frozen" if trained == 0 else f"{trained:,} trained"
        note = f" ({notes[group]})" if group in notes else ""
        lines.append(f"  {group:<{width}}  {total:>14,}  {state}{note}")
    return "\n".join(lines)
