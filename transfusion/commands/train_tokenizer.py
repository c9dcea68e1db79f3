"""`transfusion train-tokenizer`: train a byte-level BPE tokenizer.json on a data source's texts.

Byte-level: every string encodes and decodes exactly; the merges learned make the source's frequent
words single tokens (the paper's Llama-2 tokenizer is a BPE). Use it with ``train --tokenizer``.
"""

from __future__ import annotations

import argparse

from transfusion.commands.options import add_data_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory (or .json file) for tokenizer.json")
    add_data_options(p)
    p.add_argument("--vocab-size", type=int, default=512, help="bytes + merges (default 512)")
    p.add_argument("--texts", type=int, default=20000, help="texts to read from the source (default 20000)")


def run(args: argparse.Namespace) -> int:
    from transfusion.config import DataConfig
    from transfusion.data.sources import source_texts
    from transfusion.tokenizer import train_bpe

    if args.texts < 1:
        raise ValueError(f"--texts must be >= 1, got {args.texts}")
    texts = source_texts(DataConfig(source=args.data, path=args.data_path), args.texts)
    if not texts:
        raise ValueError(f"data source {args.data!r} gave no text to train a tokenizer on")
    tok = train_bpe(texts, args.vocab_size, args.out)
    example = texts[0]
    print(f"wrote {tok.path}: {tok.vocab_size} ids with the specials, trained on {len(texts)} texts; "
          f"{example!r} -> {len(tok.encode(example))} tokens ({len(example.encode())} bytes)")  # fmt: skip
    return 0
