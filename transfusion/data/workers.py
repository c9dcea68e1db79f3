"""Items made in worker processes and handed back in order: the decoding, resizing, pairing and
tokenizing of training data, off the training process.

``ordered(fn, indices, workers)`` yields ``fn(i)`` for each index in order. With workers it is a
``torch.utils.data.DataLoader`` over chunks of the indices (each worker taking every ``workers``-th
chunk, results put back in order, ``prefetch`` items ahead per worker). ``fn(i)`` must depend on i
alone, so the stream is the same with 0, 1 or 8 workers, and resuming at an index continues it
exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch


class _Chunks(torch.utils.data.Dataset):
    """Item c of the DataLoader is a chunk: ``fn`` over a list of indices, each result passed through
    ``send`` (by default: its tensors as numpy arrays, pickled through the worker's pipe: one copy and
    no shared-memory file per tensor, which cost more than the reading itself for small latents)."""

    def __init__(self, fn: Callable[[int], Any], send: Callable[[Any], Any]):
        self.fn, self.send = fn, send

    def __getitem__(self, indices: list[int]) -> list[Any]:
        return [self.send(self.fn(i)) for i in indices]


def to_numpy(obj: Any) -> Any:
    """Every tensor in ``obj`` (nested tuples, lists, dicts, dataclasses) as a numpy array."""
    return _tree(obj, lambda t: t.numpy())


def from_numpy(obj: Any) -> Any:
    """The inverse of ``to_numpy`` (no copy)."""
    return _tree(obj, torch.from_numpy, np.ndarray)


def _tree(obj: Any, leaf: Callable[[Any], Any], kind: type = torch.Tensor) -> Any:
    """``obj`` with every ``kind`` inside tuples, lists, dicts and dataclasses mapped by ``leaf``."""
    if isinstance(obj, kind):
        return leaf(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree(x, leaf, kind) for x in obj)
    if isinstance(obj, dict):
        return {k: _tree(v, leaf, kind) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _tree(getattr(obj, f.name), leaf, kind) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def _chunks(indices: Iterable[int], size: int) -> Iterator[list[int]]:
    it = iter(indices)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _as_is(item: Any) -> Any:
    return item


def ordered(
    fn: Callable[[int], Any],
    indices: Iterable[int],
    workers: int = 0,
    prefetch: int = 8,
    chunk: int = 16,
    send: Callable[[Any], Any] = to_numpy,
    receive: Callable[[Any], Any] = from_numpy,
) -> Iterator[Any]:
    """``fn(i)`` for every i of ``indices`` (which may be endless), in order, computed in ``workers``
    processes (none: here), ``chunk`` indices to a task, ``prefetch`` items ahead per worker; a
    result crosses from a worker as ``send(result)`` and comes out as ``receive(...)`` of that."""
    if workers <= 0:
        return map(fn, indices)
    loader = torch.utils.data.DataLoader(
        _Chunks(fn, send), sampler=_chunks(indices, chunk), batch_size=None, num_workers=workers,
        prefetch_factor=max(2, -(-prefetch // chunk)), collate_fn=_as_is, persistent_workers=False,
    )  # fmt: skip
    return map(receive, itertools.chain.from_iterable(loader))
