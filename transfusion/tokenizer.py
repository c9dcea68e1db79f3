"""Tokenizers: text <-> integer ids, with the special ids BOS, EOS, BOI, EOI and PAD.

``ByteTokenizer`` needs no files: ids 0-255 are UTF-8 bytes and 256-260 the specials. ``HFTokenizer``
wraps a local ``tokenizer.json`` (the ``tokenizers`` package, extra ``hf``) and adds BOI/EOI (and
PAD/BOS/EOS when the file lacks them) as new ids at the end of its vocabulary. ``train_bpe`` makes
such a file from your own text: a byte-level BPE (every string encodes; frequent words become one
token), as the paper's Llama-2 tokenizer is a BPE; ``transfusion train-tokenizer`` runs it on a data
source's captions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from transfusion.io import atomic_write_with


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end]
        raise ValueError(
            f"text holds {bad!r} at index {e.start}, a lone surrogate that is not valid Unicode and has no "
            "UTF-8 form; decode your source with errors='replace' or remove it"
        ) from None


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; BOS=256, EOS=257, BOI=258, EOI=259, PAD=260."""

    bos_id = 256
    eos_id = 257
    boi_id = 258
    eoi_id = 259
    pad_id = 260

    @property
    def vocab_size(self) -> int:
        return 261

    @property
    def special_ids(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def decode(self, ids: list[int], errors: str = "replace") -> str:
        """Bytes back to text, skipping special ids. A model may emit bytes that are not valid UTF-8:
        by default they become U+FFFD; ``errors='strict'`` raises instead."""
        out = bytes(i for i in ids if 0 <= i < 256)
        try:
            return out.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise ValueError(f"ids are not valid UTF-8 at byte {e.start}: {out[e.start : e.end]!r}") from None

    def to_dict(self) -> dict:
        return {"kind": "bytes"}


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` with Transfusion's special tokens added.

    Existing BOS/EOS/PAD tokens of the file are reused when found (``<s>``, ``</s>``,
    ``<|endoftext|>``...); BOI and EOI are always new ids appended after the vocabulary.
    """

    BOI, EOI = "<|begin_of_image|>", "<|end_of_image|>"
    _BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|im_start|>", "<|endoftext|>")
    _EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
    _PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _Tok
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "HFTokenizer needs the 'tokenizers' package: pip install 'transfusion[hf]'"
            ) from e
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.path = str(file.resolve())
        self._tok = _Tok.from_file(str(file))
        self._base_size = self._tok.get_vocab_size(with_added_tokens=True)

        def find(names: tuple[str, ...]) -> int | None:
            for name in names:
                i = self._tok.token_to_id(name)
                if i is not None:
                    return i
            return None

        from tokenizers import AddedToken

        new = [self.BOI, self.EOI]
        bos, eos, pad = find(self._BOS_NAMES), find(self._EOS_NAMES), find(self._PAD_NAMES)
        new += [n for n, i in (("<|bos|>", bos), ("<|eos|>", eos), ("<|pad|>", pad)) if i is None]
        self._tok.add_special_tokens([AddedToken(t, special=True) for t in new])
        self.boi_id = self._tok.token_to_id(self.BOI)
        self.eoi_id = self._tok.token_to_id(self.EOI)
        self.bos_id = bos if bos is not None else self._tok.token_to_id("<|bos|>")
        self.eos_id = eos if eos is not None else self._tok.token_to_id("<|eos|>")
        self.pad_id = pad if pad is not None else self._tok.token_to_id("<|pad|>")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def base_vocab_size(self) -> int:
        """Size of the file's own vocabulary, before BOI/EOI were added."""
        return self._base_size

    def encode(self, text: str) -> list[int]:
        _utf8(text)  # same clear error for lone surrogates
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        specials = {self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.pad_id}
        return self._tok.decode([i for i in ids if i not in specials], skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"kind": "hf", "path": self.path}


def load_tokenizer(path: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer for None, else the ``tokenizer.json`` at ``path`` (a file or a directory)."""
    return ByteTokenizer() if path is None else HFTokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> HFTokenizer:
    """Train a byte-level BPE ``tokenizer.json`` on ``texts`` and write it to ``path`` (a file, or a
    directory that receives ``tokenizer.json``); returns it wrapped, special tokens added.

    Byte-level: the 256 byte symbols are always in the vocabulary, so any string encodes and decodes
    exactly; merges learned from ``texts`` make their frequent words single tokens. ``vocab_size``
    counts the bytes and the merges; training stops earlier when no pair is left to merge."""
    try:
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("training a tokenizer needs: pip install 'transfusion[hf]'") from e
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (the 256 bytes and one merge), got {vocab_size}")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator((_utf8(t).decode("utf-8") for t in texts), trainer)
    path = Path(path)
    file = path / "tokenizer.json" if path.suffix != ".json" else path
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(file, lambda tmp: tok.save(tmp))  # a crash leaves no half-written tokenizer
    return HFTokenizer(file)


def tokenizer_from_dict(d: dict | None, base: str | Path | None = None) -> ByteTokenizer | HFTokenizer:
    """Rebuild the tokenizer a checkpoint names (``{"kind": "bytes"}`` or ``{"kind": "hf", "path": ...}``);
    a relative path is read from ``base`` (the checkpoint directory)."""
    if not d or d.get("kind") == "bytes":
        return ByteTokenizer()
    if d.get("kind") == "hf":
        path = Path(d["path"])
        return HFTokenizer(Path(base) / path if base is not None and not path.is_absolute() else path)
    raise ValueError(f"unknown tokenizer description {d!r}")
