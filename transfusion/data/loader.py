"""The training loader: records -> paired samples -> encoded latents -> packed ``MixedBatch``es.

Every batch has exactly ``train.batch_size`` rows of ``train.seq_len`` positions. A loader is one data
stream of ``world_size``: it reads source indices ``rank``, ``rank + world_size``, ...; sample i is paired
with a generator seeded by (seed, i), so the stream of batches is a pure function of the position, and
``state_dict()`` (the next index, the sample carried over to the next batch, the counters) is all exact
resume needs. Reading an index (the file, decoding and resizing its image, pairing, tokenizing) is
``SampleReader.read``, done ahead of the step in ``data.num_workers`` worker processes when there are
any, with the same result. The images of a batch are encoded together on the VAE's device
(``encode_images``), or come already encoded from a latent store.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from transfusion.config import Config
from transfusion.data.pairing import pair
from transfusion.data.sources import TextFiles, make_source
from transfusion.data.workers import ordered
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

EncodeFn = Callable[[Tensor], Tensor]
"""uint8 pixels (N, S, S, 3) -> latents scaled for diffusion (N, C, h, w) (``training.image_encoder``)."""


@dataclass
class Read:
    """Source index ``index`` read and paired: what a worker process hands back to the loader."""

    index: int
    sample: Sample | None
    """The paired sample (its images' latents still to fill), or None: the item was skipped."""
    pixels: Tensor | None = None
    """The sample's images as uint8 pixels (K, S, S, 3), in the order of its image segments, for the encoder."""
    latent: Tensor | None = None
    """The image already encoded (a latent store)."""
    where: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    """Counter increments when skipped: 'skipped' or 'data_errors', and 'skipped_<reason>'."""
    item: int = 0
    """Which source item the index reads (sources are cycled)."""

    def to_wire(self) -> Read:
        """What crosses from a worker: tensors as numpy arrays, the images' empty latents left out
        (the loader fills them), so nothing goes through a shared-memory file per tensor."""
        sample = None
        if self.sample is not None:
            segs = [
                dataclasses.replace(s, latent=None) if isinstance(s, Image) else s
                for s in self.sample.segments
            ]
            sample = dataclasses.replace(self.sample, segments=segs)
        pixels = None if self.pixels is None else self.pixels.numpy()
        latent = None if self.latent is None else self.latent.numpy()
        return dataclasses.replace(self, sample=sample, pixels=pixels, latent=latent)

    def from_wire(self) -> Read:
        pixels = None if self.pixels is None else torch.from_numpy(self.pixels)
        latent = None if self.latent is None else torch.from_numpy(self.latent)
        return dataclasses.replace(self, pixels=pixels, latent=latent)


class SampleReader:
    """Reads one source index into a paired ``Read``: the record (decoding and resizing its image),
    pairing and tokenizing. A pure function of the index, run in worker processes when there are any."""

    def __init__(self, cfg: Config, tokenizer: Any, split: str = "train", source: Any = None):
        self.cfg, self.tok = cfg, tokenizer
        self.source = source if source is not None else make_source(cfg.data, split)
        # language documents mixed in beside the main source (data.text_path, data.text_only_ratio)
        self.text_source = TextFiles(cfg.data, split, cfg.data.text_path) if cfg.data.text_path else None
        self.map_style = hasattr(self.source, "__getitem__") and hasattr(self.source, "__len__")
        self._iter: Iterator[Any] | None = None
        self._iter_pos = 0
        self._epoch_len = 0  # items per pass of an iterable source, once measured
        self._seed_tag = f"{cfg.data.seed}-{split}"

    def item(self, i: int) -> int:
        """Which source item index i reads (sources are cycled)."""
        if self.map_style:
            return i % len(self.source)
        return i % self._epoch_len if self._epoch_len else i

    def _record(self, i: int) -> Any:
        if self.map_style:
            return self.source[i % len(self.source)]
        # an iterable source (remote WebDataset shards): read forward to index i, modulo the epoch's
        # length once the first pass has measured it
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

    def read(self, i: int) -> Read:
        if self.text_source is not None:  # this index is a language document instead
            if random.Random(f"{self._seed_tag}-text-{i}").random() < self.cfg.data.text_only_ratio:
                record = self.text_source[i % len(self.text_source)]
                return Read(i, Sample([Text(self.tok.encode(record.text))]), where=f"text item {i}", item=-1)
        before = Counter(getattr(self.source, "skipped", {}))
        try:
            record = self._record(i)
        except (OSError, ValueError) as e:
            if self.cfg.data.strict:
                raise
            import warnings

            warnings.warn(f"skipping item {i}: {e}", stacklevel=2)
            return Read(i, None, skipped={"data_errors": 1}, item=self.item(i))
        if record is None:
            after = Counter(getattr(self.source, "skipped", {})) - before
            reasons = {
                f"skipped_{reason}": n for reason, n in after.items()
            }  # empty, unreadable, not_utf8, too_small
            return Read(i, None, skipped={"skipped": 1, **reasons}, item=self.item(i))
        rng = random.Random(f"{self._seed_tag}-{i}")
        sample = pair(record, self.tok.encode, self.cfg.data, rng)
        pixels = None
        images = [record.image] + ([record.target] if record.target is not None else [])
        if record.image is not None and any(isinstance(s, Image) for s in sample.segments):
            pixels = torch.from_numpy(
                np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
            )
        latent = record.latent if any(isinstance(s, Image) for s in sample.segments) else None
        where = (getattr(record, "meta", None) or {}).get("source", f"item {i}")
        return Read(i, sample, pixels, latent, where, item=self.item(i))


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
        workers: int | None = None,
    ):
        """Stream ``rank`` of ``world_size``: source indices rank, rank + world_size, ... . ``workers``
        processes read ahead (default ``data.num_workers``; none for a source that can only be read
        in order, a remote WebDataset)."""
        self.cfg, self.encode = cfg, encode_images
        self.rank, self.world = rank, world_size
        self.reader = SampleReader(cfg, tokenizer, split, source)
        self.source = self.reader.source
        self.workers = cfg.data.num_workers if workers is None else workers
        if self.workers and not self.reader.map_style:
            self.workers = 0  # reading forward through a stream cannot be shared out
        self.sp = Specials.of(tokenizer)
        self.n_patches = cfg.model.patches_per_image
        self.next_index = rank  # the next source index this stream reads
        self.carry: int | None = None  # index of a sample that did not fit the last batch
        self._carried: Read | None = None  # ... and the sample itself, while it is in memory
        self.stats: Counter[str] = Counter()
        self.skipped_items: set[int] = set()  # distinct source items skipped (stats count encounters)
        self._reads: Iterator[Read] | None = None

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
        self._carried, self._reads = None, None  # workers restart at the new position

    def _next_read(self) -> Read:
        if self._carried is not None:
            read, self._carried, self.carry = self._carried, None, None
            return read
        if self.carry is not None:  # resumed with a carried sample: read it again
            read, self.carry = self.reader.read(self.carry), None
            return read
        if self._reads is None:
            indices = itertools.count(self.next_index, self.world)
            self._reads = ordered(self.reader.read, indices, self.workers, self.cfg.data.prefetch,
                                  send=Read.to_wire, receive=Read.from_wire)  # fmt: skip
        self.next_index += self.world
        return next(self._reads)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> MixedBatch:
        """The next ``batch_size`` rows: samples in index order, placed by the packing planner until
        the next one would open a row too many (it then starts the next batch)."""
        cfg = self.cfg
        B, L = cfg.train.batch_size, cfg.train.seq_len
        planner = RowPlanner(L, max_rows=B)
        chosen: list[Read] = []
        while True:
            read = self._next_read()
            if read.sample is None:
                self.stats.update(read.skipped)
                self.skipped_items.add(read.item)
                continue
            fitted = fit_length(read.sample, L, self.n_patches, cfg.data.truncate, read.where)
            if not planner.add(sample_length(fitted, self.n_patches)):
                self._carried, self.carry = read, read.index  # starts the next batch
                break
            self.stats["truncated"] += int(fitted is not read.sample)
            chosen.append(dataclasses.replace(read, sample=fitted))
        self._fill_latents(chosen)
        samples = [r.sample for r in chosen]
        if cfg.model.discrete:  # codes become tokens, in the same positions the plan counted
            samples = [images_as_tokens(s, self.sp, cfg.model.vocab_size) for s in samples]
        batch = pack(samples, L, self.sp, self.n_patches, num_rows=B, rows=planner.rows)
        self.stats["samples"] += len(chosen)
        return batch

    def _fill_latents(self, chosen: list[Read]) -> None:
        """Every image's latent: read from a latent store, or the batch's pixels encoded together."""
        todo = [(r, seg, k) for r in chosen for k, seg in enumerate(s for s in r.sample.segments if isinstance(s, Image))]  # fmt: skip
        to_encode = [(r, seg, k) for r, seg, k in todo if r.latent is None]
        if to_encode:
            with torch.no_grad():
                latents = self.encode(torch.stack([r.pixels[k] for r, _, k in to_encode])).float().cpu()
            for (_, seg, _), z in zip(to_encode, latents):
                seg.latent = z
        for r, seg, _ in todo:
            if r.latent is not None:
                seg.latent = r.latent.float()
