"""Encode a map-style dataset once through the VAE and keep the latents on disk.

Layout: ``shard_00000.safetensors`` ... (each a ``latents`` tensor (n, C, h, w)) and ``index.json``
(``count``, ``shard_size``, ``shape``, ``vae_hash``, ``source``). Shards are written to temporary names
and renamed; ``index.json`` is written last, so a crash never leaves an index that claims missing or
partial shards. A cache whose ``vae_hash`` differs from the current VAE's, or whose ``source`` (description and
file fingerprint) differs from the data's, is stale: ``build_latent_cache`` rebuilds it, and
``LatentCache`` refuses another VAE's cache with a clear error. Items the source skips (None,
unreadable) are stored as NaN latents and the loader skips them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transfusion.io import atomic_directory, atomic_write_text, load_tensors, save_tensors

INDEX = "index.json"


def source_id(source: Any) -> str:
    """What the cache was built from: the source's description and, where it has one, a fingerprint
    of its files (names, sizes, modification times), so that edited data is re-encoded."""
    text = source.describe() if hasattr(source, "describe") else type(source).__name__
    return f"{text} {source.fingerprint()}" if hasattr(source, "fingerprint") else text


def cache_is_valid(
    directory: str | Path, vae_hash: str, count: int | None = None, source: str | None = None
) -> bool:
    """A complete cache built with this VAE (and, when given, ``count`` items of this ``source_id``)."""
    index = Path(directory) / INDEX
    if not index.is_file():
        return False
    meta = json.loads(index.read_text())
    shards_ok = all((Path(directory) / s).is_file() for s in meta["shards"])
    same_data = (count is None or meta["count"] == count) and (source is None or meta["source"] == source)
    return meta["vae_hash"] == vae_hash and shards_ok and same_data


def build_latent_cache(
    source: Any,
    encode_images: Callable[[list], torch.Tensor],
    vae_hash: str,
    out_dir: str | Path,
    count: int,
    batch_size: int = 64,
    shard_size: int = 4096,
    progress: bool = True,
) -> Path:
    """Encode items 0..count-1 of ``source``; reuse an existing valid cache, rebuild a stale one."""
    out = Path(out_dir)
    ident = source_id(source)
    if cache_is_valid(out, vae_hash, count, ident):
        return out
    with atomic_directory(out) as tmp:  # a stale cache (another VAE, changed data) is replaced whole
        shards, shape = _encode_shards(source, encode_images, count, batch_size, shard_size, tmp, progress)
        meta = {"count": count, "shard_size": shard_size, "shape": list(shape), "vae_hash": vae_hash,
                "source": ident, "shards": shards}  # fmt: skip
        atomic_write_text(tmp / INDEX, json.dumps(meta, indent=2))
    return out


def _encode_shards(
    source: Any, encode_images: Callable[[list], torch.Tensor], count: int, batch_size: int, shard_size: int,
    directory: Path, progress: bool,
) -> tuple[list[str], tuple[int, ...]]:  # fmt: skip
    """Encode items 0..count-1 into ``shard_size`` shards in ``directory``; (shard names, latent shape)."""
    shards: list[str] = []
    buffer: list[torch.Tensor | None] = []
    shape = None
    bar = tqdm(total=count, desc="latent cache", disable=not progress, dynamic_ncols=True)
    for start in range(0, count, batch_size):
        records = [source[i] for i in range(start, min(count, start + batch_size))]
        images = [r.image for r in records if r is not None and r.image is not None]
        z = encode_images(images).float().cpu() if images else None
        shape = shape or (tuple(z.shape[1:]) if z is not None else None)
        it = iter(z) if z is not None else iter(())
        buffer += [next(it) if r is not None and r.image is not None else None for r in records]
        bar.update(len(records))
        while len(buffer) >= shard_size or (buffer and start + batch_size >= count):
            chunk, buffer = buffer[:shard_size], buffer[shard_size:]
            if shape is None:
                raise ValueError("the source yielded no images to cache")
            stacked = torch.stack([x if x is not None else torch.full(shape, float("nan")) for x in chunk])
            shards.append(f"shard_{len(shards):05d}.safetensors")
            save_tensors(directory / shards[-1], {"latents": stacked})
    bar.close()
    return shards, shape or ()


class LatentCache:
    """Read latents by index; refuses a cache built with another VAE."""

    def __init__(self, directory: str | Path, vae_hash: str):
        self.dir = Path(directory)
        index = self.dir / INDEX
        if not index.is_file():
            raise ValueError(f"{self.dir} is not a complete latent cache (no {INDEX}); build it first")
        self.meta = json.loads(index.read_text())
        if self.meta["vae_hash"] != vae_hash:
            raise ValueError(
                f"latent cache {self.dir} was built with VAE {self.meta['vae_hash']}, not the current "
                f"{vae_hash}; rebuild it (build_latent_cache) or point data.latent_cache elsewhere"
            )
        self._shard: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getitem__(self, i: int) -> torch.Tensor | None:
        s, j = divmod(i, self.meta["shard_size"])
        if self._shard is None or self._shard[0] != s:
            self._shard = (s, load_tensors(self.dir / self.meta["shards"][s])["latents"])
        z = self._shard[1][j]
        return None if torch.isnan(z).any() else z
