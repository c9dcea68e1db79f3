"""The model's cached calls on the decoder's caches, in one place: a prompt prefilled, a token per row,
an image per row at a timestep (with guidance twins reading one shared unconditional prefix).

Each call picks the default path (attention over the filled part of the cache, a sub-batch of rows
that are not consecutive gathered) or the static one that CUDA graphs replay (``decoding.graphs``:
whole-capacity attention masked on the device, consecutive rows, room left in every row). With static
steps the caches live as long as this object (the last few shapes kept: ``cache``), so that graphs
captured over them are replayed by later calls.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from transfusion.decoding import graphs
from transfusion.decoding.cache import KVCache, consecutive
from transfusion.model import Transfusion
from transfusion.sequence import Sample, Specials, Text, pack, sample_length

KEPT_CACHES = 4
"""Caches kept between calls with static steps (the rows', the guidance twins', a spare shape); each
holds the CUDA graphs captured over it."""


class CachedSteps:
    def __init__(self, model: Transfusion, specials: Specials, static: bool, capture: bool):
        self.model, self._specials = model, specials
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n = model.cfg.patches_per_image
        self.static = graphs.StaticSteps(model, capture) if static else None
        self._caches: OrderedDict[tuple, KVCache] = OrderedDict()

    def cache(self, kind: str, rows: int, capacity: int) -> KVCache:
        """An empty cache of ``rows`` x ``capacity``. With static steps, the last few are kept
        (capacity rounded up to 64 slots, so that calls with prompts of similar length share one)
        with the graphs captured over them; otherwise a fresh one."""
        if self.static is None:
            return KVCache(self.model, rows, capacity, self.device, self.dtype)
        if kind == "rows":
            capacity = min(self.model.cfg.max_seq_len, -(-capacity // 64) * 64)
        key = (kind, rows, capacity)
        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= KEPT_CACHES:
                self.static.forget(self._caches.popitem(last=False)[1])
            cache = KVCache(self.model, rows, capacity, self.device, self.dtype)
        else:
            cache.reset()
        self._caches[key] = cache
        return cache

    def _static_rows(self, cache: KVCache, rows: Tensor, room: int) -> int | None:
        """The first row when the static steps apply: they are on, the rows are consecutive and each
        has ``room`` free slots."""
        if self.static is None or int(cache.lens[rows].max()) + room > cache.capacity:
            return None
        return consecutive(rows)

    def prefill(self, cache: KVCache, rows: Tensor, samples: list[Sample]) -> Tensor:
        """Run whole prompts (packed one per row) into ``rows`` of the cache; returns last-position
        logits (R, V)."""
        lengths = [sample_length(s, self.n) for s in samples]
        if max(lengths) > cache.capacity:
            raise ValueError(
                f"prompt needs {max(lengths)} positions but the context is {cache.capacity}; shorten it"
            )
        b = pack(samples, max(lengths), self._specials, self.n, one_per_row=True).to(self.device)
        out = self.model.prefill(b, torch.tensor(lengths) - 1)
        cache.commit(rows, out.kv, torch.tensor(lengths))
        return out.logits

    def text(self, cache: KVCache, rows: Tensor, tokens: list[int]) -> Tensor:
        """Feed one token per row and commit it; returns next-token logits (R, V)."""
        r0 = self._static_rows(cache, rows, 1)
        if r0 is not None:
            start = cache.lens[rows].to(self.device)
            logits = self.static.text(cache, r0, torch.tensor(tokens, device=self.device), start)
            cache.lens[rows] += 1
            return logits
        out = self.model.extend_text(torch.tensor(tokens), cache.starts(rows), cache.prefix(rows))
        cache.commit(rows, out.kv, torch.ones(len(rows), dtype=torch.long))
        return out.logits

    def image(self, cache: KVCache, rows: Tensor, images: Tensor, t: Tensor, commit: bool) -> Tensor:
        """Images (R, C, H, W) at timesteps t (R,) as the rows' next n positions; returns the
        prediction (R, C, H, W). ``commit`` writes their keys/values (for clean images, t = 0)."""
        r0 = None if commit else self._static_rows(cache, rows, 0)
        if r0 is not None:
            start = cache.lens[rows].to(self.device)
            return self.static.image(cache, r0, images.to(self.device, self.dtype), t.to(self.device), start)
        out = self.model.extend_image(images, t, cache.starts(rows), cache.prefix(rows))
        if commit:
            cache.commit(rows, out.kv, torch.full((len(rows),), self.n, dtype=torch.long))
        return out.image_pred

    def image_pair(self, cache: KVCache, uncond: KVCache, rows: Tensor, images: Tensor, t: Tensor) -> Tensor:
        """One forward over R conditional rows and their R unconditional twins: (2R, C, H, W), the
        conditional predictions first. ``uncond`` is a one-row cache shared by every twin."""
        x, tt = torch.cat([images, images]), torch.cat([t, t])
        r0 = self._static_rows(cache, rows, 0)
        if r0 is not None:
            start = cache.lens[rows].to(self.device)
            return self.static.image(
                cache, r0, x.to(self.device, self.dtype), tt.to(self.device), start, uncond
            )
        out = self.model.extend_image(x, tt, cache.starts(rows, uncond), cache.prefix(rows, uncond))
        return out.image_pred

    def image_guided(
        self,
        cache: KVCache,
        uncond: KVCache | None,
        rows: Tensor,
        images: Tensor,
        t: Tensor,
        twins: list[int],
    ) -> Tensor:
        """One forward over R conditional rows and the unconditional twins of rows ``twins`` (indices
        into the R): (R + len(twins), C, H, W), conditional predictions first. Every twin reads the
        one cached BOS BOI of ``uncond``."""
        if twins and len(twins) == len(rows):
            return self.image_pair(cache, uncond, rows, images, t)
        if not twins:
            return self.image(cache, rows, images, t, commit=False)
        sel = torch.tensor(twins)
        x, tt = torch.cat([images, images[sel]]), torch.cat([t, t[sel]])
        start, past = cache.starts(rows, uncond, len(twins)), cache.prefix(rows, uncond, len(twins))
        return self.model.extend_image(x, tt, start, past).image_pred

    def unconditional_prefix(self) -> KVCache:
        """BOS BOI in a one-row cache: what training shows before an image whose text was dropped
        (computed on every call: the model may have trained since the last one)."""
        uncond = self.cache("uncond", 1, 2)
        self.prefill(
            uncond, torch.zeros(1, dtype=torch.long), [Sample([Text([self._specials.boi])], eos=False)]
        )
        return uncond
