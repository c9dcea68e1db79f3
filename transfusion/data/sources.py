"""Data sources: each yields ``Record``s (image, text, or both). ``make_source(cfg, split)`` picks one.

- ``shapes``: the built-in synthetic scenes (``data/shapes.py``), rendered on the fly.
- ``shape-edits``: edits of those scenes, (input, instruction, output) triples (``data/edits.py``).
- ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` package, captions from class names.
- ``folder``: images with captions in ``.txt`` files of the same stem.
- ``jsonl``: a manifest, one ``{"image": path, "caption": text}`` per line (paths relative to it).
- ``text``: plain-text files (a file, or a folder of ``.txt``), documents split at blank lines.
- ``webdataset``: tar shards, ``jpg``/``png``/``webp`` + ``txt`` per key: local shards are indexed
  (map-style: workers, exact resume, ``transfusion encode``); remote URLs stream (optional extra).
- ``latents``: a dataset pre-encoded through the VAE by ``transfusion encode`` (``data/latents.py``).

File-based sources (folder, jsonl, text, webdataset) hold out ``data.val_fraction`` of their items
as the 'val' split (also used as 'test'), chosen by a hash of each item's name (its path, key or
text), so the split is stable as files are added; 'train' is the rest.

Unreadable items (a zero-byte or truncated image, a non-image, a caption that is not UTF-8, an image
smaller than the configured size) are skipped and counted by reason, with a warning naming the file;
with ``strict`` the first one stops the run with that message. Map-style sources return None for a
skipped index, so indices stay stable for exact resume.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from transfusion.config import DataConfig
from transfusion.data.base import Record

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
FASHION_TEMPLATES = ("a photo of {}", "{}", "a picture of {}")  # {} is "a dress", "an ankle boot"


def with_article(name: str) -> str:
    """'an ankle boot', 'a dress'."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadItem(ValueError):
    """An unreadable data item; ``reason`` names the kind of problem."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def fit_image(img: Image.Image, size: int, name: str) -> Image.Image:
    """RGB, shorter side resized to ``size``, centre-cropped; smaller images are refused."""
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < size:
        raise BadItem("too_small", f"{name}: image is {w}x{h}, smaller than the configured {size}x{size}")
    scale = size / min(w, h)
    if scale != 1:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _unit_hash(name: str) -> float:
    """A stable pseudo-random number in [0, 1) from a name."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def in_split(name: str, split: str, fraction: float) -> bool:
    """Whether the item called ``name`` belongs to ``split`` ('val' and 'test' are the held-out share)."""
    held_out = _unit_hash(name) < fraction
    return held_out if split in ("val", "test") else not held_out


def split_items(items: list[Any], names: list[str], split: str, fraction: float, what: str) -> list[Any]:
    """The items of ``split``. A set too small for the fraction to pick any item still holds one out
    (the one of smallest hash), so that held-out numbers always come from unseen items."""
    held = {i for i, n in enumerate(names) if in_split(n, "val", fraction)}
    if not held and fraction > 0 and len(items) >= 2:
        held = {min(range(len(names)), key=lambda i: _unit_hash(names[i]))}
    keep = [x for i, x in enumerate(items) if (i in held) == (split in ("val", "test"))]
    if not keep:
        raise ValueError(
            f"{what}: no items in the {split!r} split ({len(items)} items, data.val_fraction={fraction}); "
            "add data, or set data.val_fraction (held-out share) / train.eval_every=0 (no validation)"
        )
    return keep


def read_image(path: Path, size: int) -> Image.Image:
    try:
        if path.stat().st_size == 0:
            raise BadItem("empty", f"{path}: empty file")
        with Image.open(path) as im:
            im.load()
            return fit_image(im, size, str(path))
    except BadItem:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadItem("unreadable", f"{path}: not a readable image ({e})") from None


def read_caption(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadItem("not_utf8", f"{path}: caption is not UTF-8") from None


class _Skipping:
    """Counting and warning about skipped items, or stopping at the first one when strict."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped: Counter[str] = Counter()

    def skip(self, err: BadItem) -> None:
        if self.strict:
            raise ValueError(
                f"{err} (strict mode: data.strict=true; without it such items are skipped and counted)"
            )
        self.skipped[err.reason] += 1
        warnings.warn(f"skipping {err}", stacklevel=3)


class ShapesSource:
    def __init__(self, cfg: DataConfig, split: str):
        from transfusion.data.shapes import ShapesDataset

        seed = cfg.seed if split == "train" else cfg.seed + 1_000_003  # held-out scenes never overlap
        self.ds = ShapesDataset(
            cfg.image_size,
            seed,
            cfg.max_objects,
            cfg.length,
            cfg.descriptive_captions,
            cfg.position_share,
            cfg.canonical_relations,
            cfg.pairs_in_reading_order,
        )
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Record | None:
        return self.ds[i]

    def describe(self) -> str:
        return self.ds.describe()


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNIST:
    """Fashion-MNIST from Debian's package; 'train' = the 60k training set minus its last 5k
    ('val'), 'test' = the 10k test set."""

    def __init__(self, cfg: DataConfig, split: str):
        dirs = [Path(cfg.path)] if cfg.path else [Path(d) for d in FASHION_DIRS]
        found = next((d for d in dirs if (d / "train-images-idx3-ubyte.gz").is_file()), None)
        if found is None:
            raise ValueError(
                "Fashion-MNIST not found; install Debian's package: apt-get install dataset-fashion-mnist "
                f"(looked in {', '.join(map(str, dirs))})"
            )
        prefix = "t10k" if split == "test" else "train"
        images = _read_idx(found / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(found / f"{prefix}-labels-idx1-ubyte.gz")
        if split == "train":
            images, labels = images[:-5000], labels[:-5000]
        elif split == "val":
            images, labels = images[-5000:], labels[-5000:]
        self.images, self.labels, self.size, self.seed = images, labels, cfg.image_size, cfg.seed
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Record:
        label = int(self.labels[i])
        img = Image.fromarray(self.images[i]).convert("RGB")
        if self.size != 28:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        name = FASHION_CLASSES[label]
        template = random.Random(f"fmnist-{self.seed}-{i}").choice(FASHION_TEMPLATES)
        return Record(img, template.format(with_article(name)), {"label": label, "class": name})

    def describe(self) -> str:
        return f"fashion_mnist(size={self.size})"


class ImageTextFiles(_Skipping):
    """Image-caption pairs from a folder (sidecar .txt captions) or a JSONL manifest."""

    def __init__(self, cfg: DataConfig, split: str):
        super().__init__(cfg.strict)
        if not cfg.path:
            raise ValueError(f"data source {cfg.source!r} needs data.path")
        root = Path(cfg.path)
        if not root.exists():
            raise ValueError(f"data.path {root} does not exist")
        self.size = cfg.image_size
        self.items: list[tuple[Path, str | Path | None]] = []
        if cfg.source == "folder":
            for p in sorted(root.rglob("*")):
                if p.is_file() and p.suffix.lower() != ".txt":
                    side = p.with_suffix(".txt")
                    self.items.append((p, side if side.is_file() else None))
        else:
            for n, line in enumerate(root.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    path = row.get("image", row.get("path"))
                    text = row.get("caption", row.get("text"))
                except (json.JSONDecodeError, AttributeError):
                    raise ValueError(f"{root}:{n}: not a JSON object with 'image' and 'caption'") from None
                if not path:
                    raise ValueError(f"{root}:{n}: missing 'image'")
                p = Path(path)
                self.items.append((p if p.is_absolute() else root.parent / p, text))
        if not self.items:
            raise ValueError(f"no images found under {root}")
        names = [str(p.relative_to(root) if cfg.source == "folder" else p) for p, _ in self.items]
        self.items = split_items(self.items, names, split, cfg.val_fraction, str(root))
        self.path = root

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Record | None:
        path, caption = self.items[i]
        try:
            image = read_image(path, self.size)
            text = read_caption(caption) if isinstance(caption, Path) else caption
        except BadItem as e:
            self.skip(e)
            return None
        return Record(image, text or None, {"source": str(path)})

    def describe(self) -> str:
        return f"files({self.path}, {len(self.items)} items, size={self.size})"

    def fingerprint(self) -> str:
        """A hash of every item's files (path, size, modification time): changes when data is edited."""
        h = hashlib.blake2b(digest_size=8)
        for path, caption in self.items:
            for f in (path, caption) if isinstance(caption, Path) else (path,):
                try:
                    st = f.stat()
                    h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
                except OSError:
                    h.update(f"{f}:missing;".encode())
            if isinstance(caption, str):
                h.update(caption.encode("utf-8", "replace"))
        return h.hexdigest()


def split_documents(text: str) -> list[str]:
    """Documents of a text file: between lines holding a lone ``%`` when there are such lines (the
    fortune format), else between blank lines."""
    lines = text.split("\n")
    if any(line.strip() == "%" for line in lines):
        docs, current = [], []
        for line in lines:
            if line.strip() == "%":
                docs.append("\n".join(current))
                current = []
            else:
                current.append(line)
        return [*docs, "\n".join(current)]
    return text.split("\n\n")


class TextFiles(_Skipping):
    """Text-only documents from a .txt file or a folder of them, split at blank lines, or, in the
    fortune format (Debian's ``fortunes``: documents between lines holding a lone ``%``), at those
    lines. A folder's files are its ``*.txt`` files and its files without a suffix (fortune files)."""

    def __init__(self, cfg: DataConfig, split: str, path: str | None = None):
        super().__init__(cfg.strict)
        path = path or cfg.path
        if not path:
            raise ValueError("data source 'text' needs data.path (a .txt file or a folder of them)")
        root = Path(path)
        if not root.exists():
            raise ValueError(f"text data {root} does not exist")
        files = [root]
        if root.is_dir():
            files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in (".txt", ""))
        self.docs: list[str] = []
        for f in files:
            try:
                text = read_caption(f)
            except BadItem as e:
                self.skip(e)
                continue
            self.docs += [d.strip() for d in split_documents(text) if d.strip()]
        if not self.docs:
            raise ValueError(f"no text found in {root}")
        self.docs = split_items(self.docs, self.docs, split, cfg.val_fraction, str(root))
        self.path = root

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Record:
        return Record(None, self.docs[i], {"source": str(self.path)})

    def describe(self) -> str:
        return f"text({self.path}, {len(self.docs)} documents)"


class WebDatasetSource(_Skipping):
    """Tar shards read in order through the ``webdataset`` package (an iterable source)."""

    def __init__(self, cfg: DataConfig, split: str):
        super().__init__(cfg.strict)
        try:
            import webdataset  # noqa: F401
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "the webdataset source needs: pip install 'transfusion[webdataset]'"
            ) from e
        if not cfg.path:
            raise ValueError(
                "data source 'webdataset' needs data.path (a shard pattern such as data-{000..009}.tar)"
            )
        self.urls, self.size = cfg.path, cfg.image_size
        self.split, self.fraction = split, cfg.val_fraction

    def __iter__(self):
        import io

        import webdataset as wds

        for sample in wds.WebDataset(self.urls, shardshuffle=False):
            key = sample.get("__key__", "?")
            if not in_split(key, self.split, self.fraction):
                continue
            blob = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            try:
                if blob is None:
                    raise BadItem("unreadable", f"{key}: no image in the sample")
                try:
                    with Image.open(io.BytesIO(blob)) as im:
                        im.load()
                        image = fit_image(im, self.size, key)
                except (UnidentifiedImageError, OSError) as e:
                    raise BadItem("unreadable", f"{key}: not a readable image ({e})") from None
                try:
                    text = sample["txt"].decode("utf-8").strip() if "txt" in sample else None
                except UnicodeDecodeError:
                    raise BadItem("not_utf8", f"{key}: caption is not UTF-8") from None
            except BadItem as e:
                self.skip(e)
                yield None
                continue
            yield Record(image, text, {"source": key})

    def describe(self) -> str:
        return f"webdataset({self.urls})"


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``data-{000..099}.tar`` (zero-padded ranges) and ``{a,b}``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [x for c in choices for x in expand_braces(head + c + tail)]


def webdataset_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, as WebDataset groups them: ``dir/abc.seg.png`` -> (``dir/abc``,
    ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


@functools.lru_cache(maxsize=8)
def _tar_index(paths: tuple[str, ...], fingerprint: str) -> list[tuple[int, str, dict[str, tuple[int, int]]]]:
    """Every sample of the shards: (shard number, key, {extension: (data offset, size)}), in order.
    Read from the tar headers once per process and file state (the data itself is skipped)."""
    import tarfile

    items: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
    for n, path in enumerate(paths):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = webdataset_key(member.name)
                if not items or items[-1][:2] != (n, key):
                    items.append((n, key, {}))
                items[-1][2][ext.lower()] = (member.offset_data, member.size)
    return items


class TarShards(_Skipping):
    """WebDataset tar shards on local disk as a map-style source: the shards' headers are read once
    into an index of member offsets, and item i is read with one positioned read per file, so any
    process (a rank, a worker) reads any item without reading the shards before it. Exact resume,
    worker processes and ``transfusion encode`` need this; remote URLs stream (``WebDatasetSource``)."""

    def __init__(self, cfg: DataConfig, split: str):
        super().__init__(cfg.strict)
        self.paths = expand_braces(cfg.path)
        missing = [p for p in self.paths if not Path(p).is_file()]
        if missing:
            raise ValueError(
                f"data.path {cfg.path}: {missing[0]} does not exist ({len(missing)} of {len(self.paths)} shards missing)"
            )
        self.pattern, self.size = cfg.path, cfg.image_size
        items = _tar_index(tuple(self.paths), self.fingerprint())
        self.items = split_items(items, [key for _, key, _ in items], split, cfg.val_fraction, cfg.path)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        import os

        fd = os.open(self.paths[shard], os.O_RDONLY)
        try:
            return os.pread(fd, where[1], where[0])
        finally:
            os.close(fd)

    def __getitem__(self, i: int) -> Record | None:
        import io

        shard, key, members = self.items[i]
        try:
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            if ext is None:
                raise BadItem("unreadable", f"{key}: no image in the sample")
            try:
                with Image.open(io.BytesIO(self._read(shard, members[ext]))) as im:
                    im.load()
                    image = fit_image(im, self.size, key)
            except (UnidentifiedImageError, OSError) as e:
                raise BadItem("unreadable", f"{key}: not a readable image ({e})") from None
            try:
                text = self._read(shard, members["txt"]).decode("utf-8").strip() if "txt" in members else None
            except UnicodeDecodeError:
                raise BadItem("not_utf8", f"{key}: caption is not UTF-8") from None
        except BadItem as e:
            self.skip(e)
            return None
        return Record(image, text or None, {"source": key})

    def describe(self) -> str:
        return f"webdataset({self.pattern}, {len(self.items)} items, size={self.size})"

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for path in self.paths:
            st = Path(path).stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()


def is_local_pattern(pattern: str) -> bool:
    """Tar shards on this machine's filesystem (not ``http://``, ``s3://``, ``pipe:``)."""
    return "://" not in pattern and not pattern.startswith("pipe:")


def make_source(cfg: DataConfig, split: str = "train") -> Any:
    """The dataset ``cfg.source`` names, for split 'train', 'val' or 'test'."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if cfg.source == "shapes":
        return ShapesSource(cfg, split)
    if cfg.source == "shape-edits":
        from transfusion.data.edits import ShapeEditsDataset

        scenes = ShapesSource(cfg, split).ds if cfg.scene_share else None  # the scenes' own knobs apply
        return ShapeEditsDataset(cfg.image_size, cfg.seed, cfg.length, "train" if split == "train" else "test",
                                 scenes, cfg.scene_share)  # fmt: skip
    if cfg.source == "fashion_mnist":
        return FashionMNIST(cfg, split)
    if cfg.source in ("folder", "jsonl"):
        return ImageTextFiles(cfg, split)
    if cfg.source == "text":
        return TextFiles(cfg, split)
    if cfg.source == "latents":
        return latent_split(cfg, split)
    if not cfg.path:
        raise ValueError(
            "data source 'webdataset' needs data.path (a shard pattern such as data-{000..009}.tar)"
        )
    return TarShards(cfg, split) if is_local_pattern(cfg.path) else WebDatasetSource(cfg, split)


def latent_split(cfg: DataConfig, split: str) -> Any:
    """``--data latents``: ``data.path`` is a store made by ``transfusion encode`` (its ``train`` and
    ``val`` splits), or one split's store itself (a ``data.latent_cache``: training only)."""
    from transfusion.data.latents import INDEX, LatentShards

    if not cfg.path:
        raise ValueError("data source 'latents' needs data.path (a directory made by transfusion encode)")
    root = Path(cfg.path)
    sub = root / ("train" if split == "train" else "val")
    if (sub / INDEX).is_file():
        return LatentShards(sub)
    if split == "train" and (root / INDEX).is_file():
        return LatentShards(root)
    raise ValueError(
        f"data.path {root} holds no {'train' if split == 'train' else 'val'} latents ({sub / INDEX} is missing); "
        "encode that split with transfusion encode --splits train,val (or set train.eval_every=0)"
    )


def iterate(source: Any) -> Iterator[Record | None]:
    """A source's items in order, map-style (by index) or iterable alike (None for a skipped item)."""
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return (source[i] for i in range(len(source)))
    return iter(source)


def source_texts(cfg: DataConfig, count: int, split: str = "train") -> list[str]:
    """The first ``count`` non-empty texts of a source's split, in order (what a tokenizer trains on)."""
    from itertools import islice

    items = iterate(make_source(cfg, split))
    return [r.text for r in islice((r for r in items if r is not None and r.text), count)]
