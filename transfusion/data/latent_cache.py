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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from transfusion.checkpoint import atomic_write_text, save_tensors

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
    if out.exists():
        shutil.rmtree(out)  # stale (another VAE, changed data) or half-built: start over
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, buffer, shape = [], [], None
    bar = tqdm(total=count, desc="latent cache", disable=not progress, dynamic_ncols=True)
    for start in range(0, count, batch_size):
        records = [source[i] for i in range(start, min(count, start + batch_size))]
        images = [r.image for r in records if r is not None and r.image is not None]
        z = encode_images(images).float().cpu() if images else None
        shape = shape or (tuple(z.shape[1:]) if z is not None else None)
        it = iter(z) if z is not None else iter(())
        for r in records:
            ok = r is not None and r.image is not None
            buffer.append(next(it) if ok else None)
        bar.update(len(records))
        while len(buffer) >= shard_size or (buffer and start + batch_size >= count):
            chunk, buffer = buffer[:shard_size], buffer[shard_size:]
            if shape is None:
                raise ValueError("the source yielded no images to cache")
            stacked = torch.stack([x if x is not None else torch.full(shape, float("nan")) for x in chunk])
            name = f"shard_{len(shards):05d}.safetensors"
            save_tensors(tmp / name, {"latents": stacked})
            shards.append(name)
    bar.close()
    meta = {"count": count, "shard_size": shard_size, "shape": list(shape or ()), "vae_hash": vae_hash,
            "source": ident, "shards": shards}  # fmt: skip
    atomic_write_text(tmp / INDEX, json.dumps(meta, indent=2))
    tmp.rename(out)
    return out


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
            self._shard = (s, load_file(self.dir / self.meta["shards"][s])["latents"])
        z = self._shard[1][j]
        return None if torch.isnan(z).any() else z
