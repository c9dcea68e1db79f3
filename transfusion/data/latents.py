"""Datasets pre-encoded through the VAE: latent shards that training streams without decoding an image.

A latent store is a directory::

    build.json                  what is being encoded (VAE hash, source, item count, shard size, dtype),
                                written first: a build interrupted at any point resumes from it
    shard_00000.safetensors     {"latents": (n, C, h, w)}: items k*S .. k*S + n - 1 of the source, in
    shard_00000.json            order, with their texts and names; an item the source could not read
    ...                         is a NaN latent and a null text, so item i is always row i
    index.json                  written last, once every shard is on disk: the store is complete

``build_latents`` encodes a map-style source into one (``transfusion encode``, and ``data.latent_cache``
for training): under torchrun every rank encodes its own shards (k = rank, rank + world, ...), each
written under a temporary name and renamed, so an interrupted build resumes shard by shard; worker
processes decode and resize images while the VAE encodes on the device. ``LatentShards`` reads a
store as a data source (``--data latents``): records carry a latent instead of an image.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transfusion import distributed as D
from transfusion.data.base import Record
from transfusion.data.workers import ordered
from transfusion.io import atomic_write_text, load_tensors, save_tensors

INDEX, BUILD = "index.json", "build.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def source_id(source: Any) -> str:
    """What a store was built from: the source's description and, where it has one, a fingerprint
    of its files (names, sizes, modification times), so that edited data is re-encoded."""
    text = source.describe() if hasattr(source, "describe") else type(source).__name__
    return f"{text} {source.fingerprint()}" if hasattr(source, "fingerprint") else text


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def store_is_complete(directory: str | Path, vae_hash: str | None = None, source: str | None = None) -> bool:
    index = Path(directory) / INDEX
    if not index.is_file():
        return False
    meta = json.loads(index.read_text())
    files = all((Path(directory) / f"{shard_name(k)}.safetensors").is_file() for k in range(meta["shards"]))
    return files and vae_hash in (None, meta["vae_hash"]) and source in (None, meta["source"])


def build_latents(
    source: Any,
    encode: Callable[[torch.Tensor], torch.Tensor],
    vae_hash: str,
    out: str | Path,
    count: int | None = None,
    *,
    dtype: str = "float32",
    shard_size: int = 4096,
    batch_size: int = 64,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    replace: bool = True,
    progress: bool = True,
) -> Path:
    """Encode items 0 .. count - 1 of a map-style ``source`` into a store at ``out`` (every rank of
    ``world`` calls it; rank r encodes shards r, r + world, ...). ``encode`` maps uint8 pixels
    (N, S, S, 3) to latents scaled for diffusion (N, C, h, w). A complete store of this VAE and source
    is reused; a partial one is resumed; one of another VAE or source is replaced (``replace``) or
    refused with a one-line error."""
    out = Path(out)
    count = len(source) if count is None else count
    plan = {"vae_hash": vae_hash, "source": source_id(source), "count": count, "shard_size": shard_size,
            "dtype": dtype, "shards": -(-count // shard_size)}  # fmt: skip
    if (
        store_is_complete(out, vae_hash, plan["source"])
        and json.loads((out / INDEX).read_text())["count"] == count
    ):
        return out
    if world > 1:  # ranks wait for rank 0's files below: they must see them (node-local disks do not)
        D.check_shared_directory(out, "the latent store")
    if rank == 0:
        _begin(out, plan, replace)
    _wait_for(out / BUILD, plan)
    bar = tqdm(total=count, desc=f"encode (rank {rank})" if world > 1 else "encode", disable=not progress,
               dynamic_ncols=True, unit="img")  # fmt: skip
    for k in range(rank, plan["shards"], world):
        items = range(k * shard_size, min(count, (k + 1) * shard_size))
        if not (out / f"{shard_name(k)}.safetensors").is_file():
            _encode_shard(source, encode, items, out / shard_name(k), DTYPES[dtype], batch_size, workers)
        bar.update(len(items))
    bar.close()
    if rank == 0:
        _finish(out, plan)
    _wait_for(out / INDEX, None)
    return out


def _begin(out: Path, plan: dict[str, Any], replace: bool) -> None:
    """Start or resume a build: ``build.json`` names what is being encoded."""
    build = out / BUILD
    if out.exists() and any(out.iterdir()):
        same = build.is_file() and json.loads(build.read_text()) == plan
        if not same and not replace:
            raise ValueError(
                f"{out} holds latents of another VAE, source or layout; choose another --out or remove it"
            )
        if not same:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not build.is_file():
        atomic_write_text(build, json.dumps(plan, indent=2))


def _wait_for(path: Path, plan: dict[str, Any] | None, seconds: float = 24 * 3600) -> None:
    """Ranks other than 0 wait for rank 0's file (not a collective: encoding a large set can take
    longer than a process group's timeout)."""
    deadline = time.time() + seconds
    while not (path.is_file() and (plan is None or json.loads(path.read_text()) == plan)):
        if time.time() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s for {path}")
        time.sleep(0.5)


def _encode_shard(source: Any, encode: Any, items: range, stem: Path, dtype: torch.dtype, batch_size: int,
                  workers: int) -> None:  # fmt: skip
    """One shard: images read (in workers) in order, encoded in batches, written atomically, the
    texts first and the latents last (a shard counts as done once its latents exist)."""
    latents, texts, names = [], [], []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        z = encode(torch.stack([px for _, px in pending])).float().cpu()
        for (j, _), zj in zip(pending, z):
            latents[j] = zj
        pending.clear()

    for j, (pixels, text, name) in enumerate(ordered(lambda i: read_pixels(source, i), items, workers)):
        latents.append(None)
        texts.append(text)
        names.append(name)
        if pixels is not None:
            pending.append((j, pixels))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    shape = next((z.shape for z in latents if z is not None), None)
    if shape is None:
        raise ValueError(
            f"items {items.start}..{items.stop - 1} of {source_id(source)} hold no readable image"
        )
    stacked = torch.stack([z if z is not None else torch.full(shape, float("nan")) for z in latents]).to(
        dtype
    )
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"texts": texts, "names": names}))
    save_tensors(stem.with_suffix(".safetensors"), {"latents": stacked})


def read_pixels(source: Any, i: int) -> tuple[torch.Tensor | None, str | None, str]:
    """Item i as (uint8 pixels (S, S, 3) or None when unreadable or text-only, text, name)."""
    import numpy as np

    try:
        record = source[i]
    except (OSError, ValueError):
        record = None
    if record is None or record.image is None:
        return None, getattr(record, "text", None), f"item {i}"
    pixels = torch.from_numpy(np.asarray(record.image.convert("RGB"), dtype=np.uint8).copy())
    return pixels, record.text, (record.meta or {}).get("source", f"item {i}")


def _finish(out: Path, plan: dict[str, Any]) -> None:
    """Rank 0, once every shard exists: count the unreadable items, write index.json."""
    for k in range(plan["shards"]):
        _wait_for(out / f"{shard_name(k)}.safetensors", None)
    skipped = 0
    shape = None
    for k in range(plan["shards"]):
        z = load_tensors(out / f"{shard_name(k)}.safetensors")["latents"]
        skipped += int(torch.isnan(z.flatten(1)).any(1).sum())
        shape = list(z.shape[1:])
    atomic_write_text(out / INDEX, json.dumps({**plan, "shape": shape, "skipped": skipped}, indent=2))


class LatentShards:
    """A latent store as a map-style source: item i is a ``Record`` with ``latent`` (C, h, w, in the
    store's dtype: the loader makes it fp32 when it stacks a batch) and the text it was encoded with,
    or None for an item the encoder could not read."""

    def __init__(self, directory: str | Path, vae_hash: str | None = None):
        self.dir = Path(directory)
        if not store_is_complete(self.dir):
            raise ValueError(
                f"{self.dir} is not a complete latent store (no {INDEX}); build it first: transfusion encode"
            )
        self.meta = json.loads((self.dir / INDEX).read_text())
        if vae_hash is not None and self.meta["vae_hash"] != vae_hash:
            raise ValueError(
                f"latents in {self.dir} were encoded with VAE {self.meta['vae_hash']}, not the run's {vae_hash}; "
                "encode them again with this VAE or give the run the VAE they were made with"
            )
        self.skipped: Counter[str] = Counter()
        self._open: dict[int, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _shard(self, k: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Shard k's latents (read whole: a reader walks through a shard item after item), which rows
        hold an item the encoder could not read, and its texts; the last two shards read are kept."""
        if k not in self._open:
            if len(self._open) >= 2:
                self._open.pop(next(iter(self._open)))
            latents = load_tensors(self.dir / f"{shard_name(k)}.safetensors")["latents"]
            unreadable = torch.isnan(latents.flatten(1)).any(1)
            texts = json.loads((self.dir / f"{shard_name(k)}.json").read_text())
            self._open[k] = (latents, unreadable, texts)
        return self._open[k]

    def __getitem__(self, i: int) -> Record | None:
        k, j = divmod(i, self.meta["shard_size"])
        latents, unreadable, texts = self._shard(k)
        if unreadable[j]:
            self.skipped["unreadable"] += 1
            return None
        return Record(None, texts["texts"][j], {"source": texts["names"][j]}, latent=latents[j].clone())

    def describe(self) -> str:
        return f"latents({self.dir}, {len(self)} items, vae {self.meta['vae_hash']})"

    def fingerprint(self) -> str:
        return str(self.meta["source"])
