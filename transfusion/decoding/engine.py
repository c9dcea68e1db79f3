"""The decoding engine: rows join, every tick advances every row one step in its mode, rows leave.

``Engine(rows=R, capacity=C)`` holds caches of R rows x C positions. ``add(row)`` queues a request;
at the next ``tick`` it takes a free row of the caches and its prompt is prefilled (all rows admitted
at one tick in one batch); then the rows in text mode take one token, the rows drawing an image one
denoising step (or one code), each mode as one batch (``decoding.modes``); a row that is done, or
cancelled, frees its cache row at the end of the tick. ``Decoder.generate`` is an engine whose rows
all join at the first tick and which ticks until they are done; ``transfusion serve`` keeps one
engine running and adds requests as they come, so requests of any mode share the batches.

A row's output does not depend on the other rows: each has its own generator, settings and cache row,
and attention never crosses rows (batched output equals one-at-a-time output, tested).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from transfusion.decoding.cache import KVCache
from transfusion.decoding.modes import CodeMode, DiffusionMode, Row, TextMode
from transfusion.decoding.steps import CachedSteps
from transfusion.lora import lora_layers, rows_using
from transfusion.model import Transfusion
from transfusion.sequence import Specials, sample_length


class Engine:
    def __init__(
        self,
        model: Transfusion,
        tokenizer: object,
        steps: CachedSteps,
        rows: int,
        capacity: int,
        progress: Callable[[int], None] | None = None,
    ):
        cfg = model.cfg
        self.model, self.tok, self.steps, self.progress = model, tokenizer, steps, progress
        self.sp = Specials.of(tokenizer)
        self.n = cfg.patches_per_image
        self.latent_shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        self.code_offset = cfg.vocab_size
        # tokens training never predicts as text (BOS opens, EOI follows an image, PAD pads, and the
        # image codes of a discrete model, sampled only inside an image): not sampled as text
        banned = {self.sp.bos, self.sp.eoi, self.sp.pad} - {self.sp.eos, self.sp.boi}
        banned |= set(range(cfg.vocab_size, cfg.total_vocab))
        self.banned = torch.tensor(sorted(banned), dtype=torch.long)
        self.cache = steps.cache("rows", rows, capacity)
        self.slots: list[Row | None] = [None] * rows
        self.pending: deque[Row] = deque()
        self.text_mode = TextMode()
        self.image_mode = CodeMode() if cfg.discrete else DiffusionMode()
        self._uncond: dict[str | None, KVCache] = {}
        self.lora = bool(lora_layers(model))  # unmerged adapters: every call says which row uses which
        self._twins: KVCache | None = None

    # --- rows joining and leaving -----------------------------------------------------------------
    def add(self, row: Row) -> Row:
        """Queue ``row``; it joins at the next tick that has a free cache row."""
        length = sample_length(row.sample, self.n)
        if length > self.cache.capacity:
            raise ValueError(
                f"prompt needs {length} positions but the context is {self.cache.capacity}; shorten it"
            )
        self.pending.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop ``row``: its cache row is freed at the end of the next tick (or it never joins)."""
        row.cancelled = True

    @property
    def active(self) -> list[Row]:
        """The rows holding a cache row, in cache-row order."""
        return [row for row in self.slots if row is not None]

    @property
    def idle(self) -> bool:
        return not self.pending and not self.active

    def free_rows(self) -> int:
        return sum(row is None for row in self.slots)

    def tick(self) -> None:
        """Admit queued rows, then one step of every row in text mode and of every row drawing."""
        self._admit()
        live = [row for row in self.active if not row.done and not row.cancelled]
        self.text_mode.tick(self, [row for row in live if not row.drawing])
        self.image_mode.tick(
            self, [row for row in self.active if row.drawing and not row.done and not row.cancelled]
        )
        self._release()

    def _admit(self) -> None:
        while self.pending and self.pending[0].cancelled:
            self.pending.popleft().done = True
        free = [i for i, row in enumerate(self.slots) if row is None]
        joining: list[Row] = []
        while self.pending and free:
            row = self.pending.popleft()
            if row.cancelled:
                row.done = True
                continue
            row.slot = free.pop(0)
            self.slots[row.slot] = row
            self.cache.lens[row.slot] = 0
            joining.append(row)
        if not joining:
            return
        with self.adapters([r.adapter for r in joining]):
            logits = self.steps.prefill(
                self.cache, torch.tensor([r.slot for r in joining]), [r.sample for r in joining]
            )
        for j, row in enumerate(joining):
            row.logits = logits[j]
            row.emit("start", slot=row.slot)
            if row.force_image:
                self.image_mode.start(self, row)

    def _release(self) -> None:
        for i, row in enumerate(self.slots):
            if row is not None and (row.done or row.cancelled):
                self.slots[i] = None
                if not row.cancelled:
                    row.emit("done", out=row.out)
                row.done = True

    # --- what the modes share ---------------------------------------------------------------------
    def end(self, row: Row) -> None:
        self.flush_text(row)
        row.done = True

    def flush_text(self, row: Row) -> None:
        if row.tokens:
            row.out.append(self.tok.decode(row.tokens))
            row.tokens = []

    def unconditional(self, adapter: str | None = None) -> KVCache:
        """The one cached BOS BOI every guidance twin (of rows using ``adapter``) reads, made when first needed."""
        if adapter not in self._uncond:
            with self.adapters([adapter]):
                self._uncond[adapter] = self.steps.unconditional_prefix()
        return self._uncond[adapter]

    def adapters(self, names: list[str | None]) -> Any:
        """Batch row i of the calls inside uses adapter ``names[i]`` (``lora.rows_using``); nothing to
        do for a model without unmerged adapters."""
        if not self.lora:
            if any(n is not None for n in names):
                raise KeyError(f"no adapter called {next(n for n in names if n)!r} is loaded (loaded: none)")
            return nullcontext()
        return rows_using(self.model, names)

    def twin_cache(self) -> KVCache:
        """Discrete images: a row per cache row for the twins (BOS BOI and the codes so far)."""
        if self._twins is None:
            self._twins = self.steps.cache("twins", len(self.slots), self.n + 2)
        return self._twins
