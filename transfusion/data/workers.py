"""Items made in worker processes and handed back in order: the decoding, resizing, pairing and
tokenizing of training data, off the training process.

``ordered(fn, indices, workers)`` yields ``fn(i)`` for each index in order. With workers it is a
``torch.utils.data.DataLoader`` over the indices (one item at a time, each worker taking every
``workers``-th index, results reordered, ``prefetch`` items ahead per worker; tensors come back
through shared memory). ``fn(i)`` must depend on i alone, so the stream is the same with 0, 1 or 8
workers, and resuming at an index continues it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


class _Items(torch.utils.data.Dataset):
    def __init__(self, fn: Callable[[int], Any]):
        self.fn = fn

    def __getitem__(self, i: int) -> Any:
        return self.fn(i)


def _as_is(item: Any) -> Any:
    return item


def ordered(
    fn: Callable[[int], Any], indices: Iterable[int], workers: int = 0, prefetch: int = 8
) -> Iterator[Any]:
    """``fn(i)`` for every i of ``indices`` (which may be endless), in order, computed in ``workers``
    processes (none: here)."""
    if workers <= 0:
        return map(fn, indices)
    loader = torch.utils.data.DataLoader(
        _Items(fn), sampler=indices, batch_size=None, num_workers=workers, prefetch_factor=prefetch,
        collate_fn=_as_is, persistent_workers=False,
    )  # fmt: skip
    return iter(loader)
