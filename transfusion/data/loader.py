"""The training loader: records -> paired samples -> encoded latents -> packed ``MixedBatch``es.

Every batch has exactly ``train.batch_size`` rows of ``train.seq_len`` positions. Index i of the
source is read by rank ``i % world_size``; sample i is paired with a generator seeded by (seed, i), so
the stream of batches is a pure function of the position, and ``state_dict()`` (the next index, the
sample carried over to the next batch, the counters) is all exact resume needs. Images of a batch are
encoded together, through ``encode_images`` (the VAE, scaled for diffusion) or a latent cache.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image as PILImage
from torch import Tensor

from transfusion.config import Config
from transfusion.data.pairing import pair
from transfusion.data.sources import TextFiles, make_source
from transfusion.sequence import (
    Image,
    MixedBatch,
    RowPlanner,
    Sample,
    Specials,
    Text,
    fit_length,
    images_as_tokens,
    pack,
    sample_length,
)

EncodeFn = Callable[[list[PILImage.Image]], Tensor]


class BatchLoader:
    def __init__(
        self,
        cfg: Config,
        tokenizer: Any,
        encode_images: EncodeFn,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        source: Any = None,
        latent_cache: Any = None,
    ):
        self.cfg, self.tok, self.encode = cfg, tokenizer, encode_images
        self.rank, self.world = rank, world_size
        self.source = source if source is not None else make_source(cfg.data, split)
        # language documents mixed in beside the main source (data.text_path, data.text_only_ratio)
        self.text_source = TextFiles(cfg.data, split, cfg.data.text_path) if cfg.data.text_path else None
        self.map_style = hasattr(self.source, "__getitem__") and hasattr(self.source, "__len__")
        self.cache = latent_cache
        self.sp = Specials.of(tokenizer)
        self.n_patches = cfg.model.patches_per_image
        self.next_index = rank  # the next source index this rank reads
        self.carry: int | None = None  # index of a sample that did not fit the last batch
        self.stats: Counter[str] = Counter()
        self.skipped_items: set[int] = set()  # distinct source items skipped (stats count encounters)
        self._iter: Iterator[Any] | None = None
        self._iter_pos = 0
        self._epoch_len = 0  # items per pass of an iterable source, once measured
        self._seed_tag = f"{cfg.data.seed}-{split}"

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "next_index": self.next_index,
            "carry": self.carry,
            "stats": dict(self.stats),
            "skipped_items": sorted(self.skipped_items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_index, self.carry = int(state["next_index"]), state["carry"]
        self.stats = Counter(state.get("stats", {}))
        self.skipped_items = set(state.get("skipped_items", []))
        self._iter = None

    def _item(self, i: int) -> int:
        """Which source item index i reads (sources are cycled)."""
        if self.map_style:
            return i % len(self.source)
        return i % self._epoch_len if self._epoch_len else i

    # --- reading --------------------------------------------------------------------------------------
    def _record(self, i: int) -> Any:
        if self.map_style:
            return self.source[i % len(self.source)]
        # an iterable source (WebDataset shards): read forward to index i, modulo the epoch's length
        # once the first pass has measured it
        if self._epoch_len:
            i %= self._epoch_len
        if self._iter is None or self._iter_pos > i:
            self._iter, self._iter_pos = iter(self.source), 0
        while True:
            try:
                rec = next(self._iter)
            except StopIteration:
                if self._iter_pos == 0:
                    raise ValueError(f"{self.source.describe()} yields no items for this split") from None
                self._epoch_len = self._iter_pos
                i %= self._epoch_len
                self._iter, self._iter_pos = iter(self.source), 0
                continue
            self._iter_pos += 1
            if self._iter_pos - 1 == i:
                return rec

    def _sample(self, i: int) -> tuple[Sample, Any] | None:
        if self.text_source is not None:  # this index is a language document instead
            if random.Random(f"{self._seed_tag}-text-{i}").random() < self.cfg.data.text_only_ratio:
                record = self.text_source[i % len(self.text_source)]
                return Sample([Text(self.tok.encode(record.text))]), record
        before = Counter(getattr(self.source, "skipped", {}))
        try:
            record = self._record(i)
        except (OSError, ValueError) as e:
            if self.cfg.data.strict:
                raise
            self.stats["data_errors"] += 1
            self.skipped_items.add(self._item(i))
            import warnings

            warnings.warn(f"skipping item {i}: {e}", stacklevel=2)
            return None
        if record is None:
            self.stats["skipped"] += 1
            self.skipped_items.add(self._item(i))
            for reason, n in (Counter(getattr(self.source, "skipped", {})) - before).items():
                self.stats[f"skipped_{reason}"] += n  # by reason: empty, unreadable, not_utf8, too_small
            return None
        rng = random.Random(f"{self._seed_tag}-{i}")
        return pair(record, self.tok.encode, self.cfg.data, rng), record

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> MixedBatch:
        """The next ``batch_size`` rows: samples in index order, placed by the packing planner until
        the next one would open a row too many (it then starts the next batch)."""
        cfg = self.cfg
        B, L = cfg.train.batch_size, cfg.train.seq_len
        planner = RowPlanner(L, max_rows=B)
        chosen: list[tuple[int, Sample, Any]] = []
        while True:
            if self.carry is not None:
                i, self.carry = self.carry, None
            else:
                i = self.next_index
                self.next_index += self.world
            got = self._sample(i)
            if got is None:
                continue
            sample, record = got
            where = (getattr(record, "meta", None) or {}).get("source", f"item {i}")
            fitted = fit_length(sample, L, self.n_patches, cfg.data.truncate, where)
            if not planner.add(sample_length(fitted, self.n_patches)):
                self.carry = i  # starts the next batch
                break
            self.stats["truncated"] += int(fitted is not sample)
            chosen.append((i, fitted, record))
        self._fill_latents(chosen)
        samples = [s for _, s, _ in chosen]
        if cfg.model.discrete:  # codes become tokens, in the same positions the plan counted
            samples = [images_as_tokens(s, self.sp, cfg.model.vocab_size) for s in samples]
        batch = pack(samples, L, self.sp, self.n_patches, num_rows=B, rows=planner.rows)
        self.stats["samples"] += len(chosen)
        return batch

    def _fill_latents(self, chosen: list[tuple[int, Sample, Any]]) -> None:
        todo = [(i, seg, rec) for i, s, rec in chosen for seg in s.segments if isinstance(seg, Image)]
        if not todo:
            return
        if self.cache is not None:
            latents = torch.stack([self.cache[i % len(self.cache)] for i, _, _ in todo])
        else:
            with torch.no_grad():
                latents = self.encode([rec.image for _, _, rec in todo]).float().cpu()
        for (_, seg, _), z in zip(todo, latents):
            seg.latent = z
