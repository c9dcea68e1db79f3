"""The decoder's two hot calls with static shapes, captured once in CUDA graphs and replayed.

Decoding a small model on a GPU is bound by kernel launches, not arithmetic: a step is a few hundred
small kernels, each launched from Python. A CUDA graph records them once and replays them in one
launch. Capture needs every shape and address fixed, so the static steps differ from the decoder's
default calls in three ways: attention reads a row's whole cache (``capacity`` slots, those past its
length masked out by a mask built on the device from the lengths) instead of the slots up to the
longest row; a text step writes its keys and values into the cache inside the step, at the positions
the lengths give (a scatter, no host indices); and the rows are a consecutive run of cache rows.

``StaticSteps.text`` runs one token per row and commits it; ``StaticSteps.image`` predicts the noise of
one image per row, with the unconditional twins of guidance reading a shared cached BOS BOI. On CUDA
each distinct call (kind, cache, rows, twins) is captured on first use (after two warm-up runs on a
side stream, as PyTorch's CUDA-graph notes require), on the model's device, and replayed after, by this
call and later ones (the decoder keeps its caches); all graphs share one memory pool. On the CPU, or
when capture is off, the same static code runs eagerly, so the CPU tests check the arithmetic that
the graphs replay. Inputs are copied into the graph's own buffers before each replay; outputs are
cloned out. The caches' static views and scattered writes are ``KVCache.static_prefix`` and
``KVCache.write_at`` (``decoding.cache``).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

CAPTURE_LOCK = threading.Lock()
"""Held while a CUDA graph is being captured. A capture forbids other threads' unsafe CUDA calls
(an allocation, a synchronising copy) for its duration: work that may run beside decoding on another
thread, such as ``serve`` encoding an upload with the VAE, takes this lock (``capture_lock``)."""


def capture_lock() -> threading.Lock:
    """The lock to hold around CUDA work done beside the decoder's thread (see ``CAPTURE_LOCK``)."""
    return CAPTURE_LOCK


class StepGraph:
    """A function of device tensors, captured in a CUDA graph over static copies of its inputs, on the
    device the model is on and on a stream of that device (not the process's current device, nor
    PyTorch's default capture stream, which is made once per process on whichever device was current
    then: a model on ``cuda:1`` captured there records an empty graph and every replay returns stale
    outputs). Graphs of one decoder share a memory pool; that is safe because each replay's output is
    cloned before the next replay."""

    def __init__(self, fn: Callable[..., Tensor], inputs: list[Tensor], device: torch.device, pool: Any):
        self.device = device
        self.inputs = [x.clone() for x in inputs]
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: allocations and lazy initialisations happen outside the capture
                    fn(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with CAPTURE_LOCK, torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        with torch.cuda.device(self.device):
            for static, x in zip(self.inputs, inputs):
                static.copy_(x, non_blocking=True)
            self.graph.replay()
            return self.output.clone()


class StaticSteps:
    """Static-shape text and image steps of one model, over caches that live as long as the decoder
    (``Decoder`` reuses its caches from call to call), so a step captured once is replayed by every
    later call with the same batch shape. Capture is on when asked and the model is on a CUDA device;
    if a capture fails, one line says why and the steps run eagerly from then on."""

    def __init__(self, model: Any, capture: bool):
        self.model = model
        self.device = next(model.parameters()).device
        self.capture = capture and self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[tuple, StepGraph] = {}

    def forget(self, cache: Any) -> None:
        """Drop the graphs that read or write ``cache`` (it is being freed)."""
        self.graphs = {k: g for k, g in self.graphs.items() if k[1] != cache.serial}

    def _run(self, key: tuple, fn: Callable[..., Tensor], inputs: list[Tensor]) -> Tensor:
        if not self.capture:
            return fn(*inputs)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = StepGraph(fn, inputs, self.device, self.pool)
            except RuntimeError as e:  # a capture the driver or an op refuses: decode eagerly instead
                self.capture = False
                print(f"warning: CUDA graph capture failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                      "decoding without graphs", file=sys.stderr)  # fmt: skip
                return fn(*inputs)
        return graph(*inputs)

    def text(self, cache: Any, r0: int, tokens: Tensor, start: Tensor) -> Tensor:
        """One token per row of rows r0 .. r0 + R - 1 after ``start`` (R,) cached positions (device
        tensors); writes the token's keys/values into the cache and returns the next logits (R, V).
        The caller advances ``cache.lens``."""
        R = len(tokens)

        def step(tokens: Tensor, start: Tensor) -> Tensor:
            out = self.model.extend_text(tokens, start, cache.static_prefix(r0, R, start))
            cache.write_at(r0, start, out.kv)
            return out.logits

        return self._run(("text", cache.serial, r0, R), step, [tokens, start])

    def image(self, cache: Any, r0: int, x: Tensor, t: Tensor, start: Tensor, shared: Any = None) -> Tensor:
        """Predictions (R, C, H, W) for images x (R, C, H, W) at timesteps t (R,) after rows r0 ..
        r0 + R - 1; with ``shared`` (a full one-row cache), x and t hold R more rows, the twins, which
        read it. Nothing is written to the cache."""
        R = len(start)
        twins = len(x) - R

        def step(x: Tensor, t: Tensor, start: Tensor) -> Tensor:
            past = cache.static_prefix(r0, R, start, shared, twins)
            starts = torch.cat([start, start.new_full((twins,), shared.capacity)]) if twins else start
            return self.model.extend_image(x, t, starts, past).image_pred

        key = ("image", cache.serial, r0, R, twins, None if shared is None else shared.serial)
        return self._run(key, step, [x, t, start])
