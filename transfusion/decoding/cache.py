"""The decoder's key/value cache, the one place that knows its layout.

One preallocated (rows, Hk, capacity, Dh) key and value tensor per layer. Row r holds its positions
0 .. lens[r] - 1 in slots 0 .. lens[r] - 1 (right-padded; RoPE position = slot). A step computes only
its q new positions, which attend to the cached slots where they lie (a ``Prefix`` of views, slots past
a row's length masked) and to each other: nothing is concatenated or copied, so what grows with the
prefix is only the attention reading the cached keys/values. A row is a slot a request holds while it
decodes; a long-lived decoder (``decoding.engine``) hands freed rows to new requests.

Shape legend: R rows in a (sub-)batch, q new positions, Hk key/value heads, Dh head width.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from transfusion.layers import KV, Prefix
from transfusion.model import Transfusion


def consecutive(rows: Tensor) -> int | None:
    """The first row when ``rows`` (CPU, ascending) is a run r0, r0 + 1, ...; else None."""
    r0 = int(rows[0])
    return r0 if bool((rows == torch.arange(r0, r0 + len(rows))).all()) else None


class KVCache:
    """Per-layer keys and values of R rows, (R, Hk, capacity, Dh), preallocated; ``lens`` (R,)."""

    _serials = itertools.count()

    def __init__(
        self, model: Transfusion, rows: int, capacity: int, device: torch.device, dtype: torch.dtype
    ):
        cfg = model.cfg
        shape = (rows, cfg.kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lens = torch.zeros(rows, dtype=torch.long)  # on the CPU: lengths steer Python control flow
        self.capacity = capacity
        self.serial = next(KVCache._serials)  # what captured graphs key on (ids are reused once freed)

    def reset(self, rows: list[int] | None = None) -> None:
        """Empty every row (or ``rows``), keeping the tensors (and so the graphs captured over them)."""
        index = slice(None) if rows is None else torch.tensor(rows, dtype=torch.long)
        self.lens[index] = 0
        device_index = index if rows is None else index.to(self.k[0].device)
        for t in (*self.k, *self.v):
            t[device_index] = 0

    def past(self, rows: Tensor) -> list[tuple[int, Tensor, Tensor, Tensor | None]]:
        """Each layer's ``Prefix`` part for ``rows``: the slots up to the longest row, and which of
        them hold positions. Views of the cache when ``rows`` is a run of consecutive rows (always,
        unless some rows are drawing an image while others write text), else copies."""
        lens = self.lens[rows]
        upto = int(lens.max())
        valid = None  # every slot up to the longest row holds a position, unless the rows differ
        if bool((lens != upto).any()):
            valid = (torch.arange(upto)[None, :] < lens[:, None]).to(self.k[0].device)  # (R, upto)
        r0 = int(rows[0])
        if bool((rows == torch.arange(r0, r0 + len(rows))).all()):
            sl = slice(r0, r0 + len(rows))
            return [(len(rows), k[sl, :, :upto], v[sl, :, :upto], valid) for k, v in zip(self.k, self.v)]
        idx = rows.to(self.k[0].device)
        return [(len(rows), k[idx, :, :upto], v[idx, :, :upto], valid) for k, v in zip(self.k, self.v)]

    def prefix(self, rows: Tensor, shared: KVCache | None = None, twins: int | None = None) -> list[Prefix]:
        """Each layer's ``Prefix`` for the model's cached calls: ``rows`` of this cache, then (with
        ``shared``, a one-row cache) ``twins`` more rows (default: one per row) that all read
        ``shared``'s single row."""
        groups = [self.past(rows)]
        if shared is not None:
            n = len(rows) if twins is None else twins
            groups.append(
                [(n, k, v, valid) for _, k, v, valid in shared.past(torch.zeros(1, dtype=torch.long))]
            )
        return [Prefix([group[layer] for group in groups]) for layer in range(len(groups[0]))]

    def starts(self, rows: Tensor, shared: KVCache | None = None, twins: int | None = None) -> Tensor:
        """Cached positions per row (R,), followed by ``shared``'s for each twin row."""
        lens = self.lens[rows]
        n = len(rows) if twins is None else twins
        return lens if shared is None else torch.cat([lens, shared.lens[:1].expand(n)])

    def static_prefix(
        self, r0: int, R: int, start: Tensor, shared: KVCache | None = None, twins: int = 0
    ) -> list[Prefix]:
        """Each layer's ``Prefix`` over the whole capacity of rows r0 .. r0 + R - 1, the slots at or
        past each row's length masked (``start``, on the device); then ``twins`` rows that read
        ``shared``'s single, full row. Static shapes, for CUDA graphs (``decoding.graphs``)."""
        valid = torch.arange(self.capacity, device=start.device)[None, :] < start[:, None]  # (R, capacity)
        sl = slice(r0, r0 + R)
        layers = []
        for layer in range(len(self.k)):
            parts = [(R, self.k[layer][sl], self.v[layer][sl], valid)]
            if twins:
                parts.append((twins, shared.k[layer][:1], shared.v[layer][:1], None))
            layers.append(Prefix(parts))
        return layers

    def write_at(self, r0: int, start: Tensor, kv: list[KV]) -> None:
        """One new position's keys/values (R, Hk, 1, Dh) per layer at slot ``start[i]`` (a device
        tensor) of row r0 + i: a scatter, no host indices (for CUDA graphs)."""
        R = len(start)
        for layer, (k, v) in enumerate(kv):
            index = start.view(R, 1, 1, 1).expand(R, k.shape[1], 1, k.shape[3])
            self.k[layer][r0 : r0 + R].scatter_(2, index, k.to(self.k[layer].dtype))
            self.v[layer][r0 : r0 + R].scatter_(2, index, v.to(self.v[layer].dtype))

    def commit(self, rows: Tensor, new_kv: list[KV], counts: Tensor) -> None:
        """Append the first ``counts[i]`` of the q new positions of sub-batch row i to cache row rows[i]."""
        q = new_kv[0][0].shape[2]
        start = self.lens[rows]
        if int((start + counts).max()) > self.capacity:
            raise ValueError(f"output exceeds the cache's {self.capacity} positions")
        if bool((counts == q).all()):  # every row appends all q positions: one indexed write per layer
            r = rows.to(self.k[0].device)[:, None]  # (R, 1)
            slots = (start[:, None] + torch.arange(q)[None, :]).to(r.device)  # (R, q)
            for layer, (k, v) in enumerate(new_kv):
                self.k[layer][r, :, slots] = k.transpose(1, 2)  # (R, q, Hk, Dh)
                self.v[layer][r, :, slots] = v.transpose(1, 2)
        else:  # ragged (prefill): row by row
            for i, row in enumerate(rows.tolist()):
                s, c = int(start[i]), int(counts[i])
                for layer, (k, v) in enumerate(new_kv):
                    self.k[layer][row, :, s : s + c] = k[i, :, :c]
                    self.v[layer][row, :, s : s + c] = v[i, :, :c]
        self.lens[rows] += counts
