"""How a model runs on its hardware, decided in one place: activation checkpointing, torch.compile,
then FSDP2 or DDP, in that order (torchtitan's ``parallelize``: checkpointing wraps what compile
traces, and the wrappers see compiled blocks). The training loop, the benchmark and the demo call
``parallelize`` and use what it returns; nothing else knows which wrapper is on.

- **Activation checkpointing** (``train.activation_checkpointing``): a chosen block keeps only its
  input and recomputes its activations in the backward pass (``torch.utils.checkpoint``,
  non-reentrant; the blocks draw no random numbers, so no RNG state is stashed).
- **Compile** (``train.compile``, on by default on CUDA): every block's ``forward`` with static
  shapes (a packed batch always has one shape, so the blocks share one graph) and the patcher's
  ``encode`` / ``decode`` with dynamic ones (the number of images varies from batch to batch). The
  model calls those two methods directly, not the patcher's ``__call__``, so they are what must be
  compiled. If compiling fails on someone's machine (no Triton, an old GPU, a compiler bug), one line
  says why and that piece runs eagerly; the run goes on.
- **FSDP2** (``train.parallel=fsdp`` under torchrun): ``fully_shard`` on each block, then on the root.
  With bf16 training a ``MixedPrecisionPolicy`` gathers parameters in bf16 (half the traffic of fp32)
  and reduces gradients in fp32; the sharded master weights and the optimizer stay fp32.
- **DDP** otherwise under torchrun; nothing wraps a single process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfusion import distributed as D
from transfusion.config import Config, TrainConfig, checkpointed_every


@dataclass
class Parallel:
    """A model made ready to train, and how."""

    model: nn.Module
    """The module itself: its parameters (for the optimizer and the EMA) and its state dict. Under
    FSDP2 it is sharded in place (its parameters are DTensors)."""
    step_model: nn.Module
    """What the training step calls: the DDP wrapper, or the model."""
    mode: str
    """'single', 'ddp' or 'fsdp'."""
    compiled: bool
    checkpointed: list[int]
    """Blocks whose activations are recomputed in the backward pass."""
    dtype: torch.dtype
    """The dtype the matrices compute in: bf16 (autocast, and FSDP2's gathered parameters) or fp32."""

    @property
    def whole(self) -> bool:
        """This process holds whole weights (one process, DDP): it can sample on its own."""
        return self.mode != "fsdp"

    def autocast(self) -> AbstractContextManager:
        """The training forward's autocast: bf16 when training in bf16, nothing for fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.dtype)


def training_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype:
    """``train.dtype``: bf16 on CUDA and fp32 on the CPU by default ('auto'; bf16 matmuls on a CPU
    without AMX run about 250x slower than fp32)."""
    if tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def parallelize(model: nn.Module, cfg: Config, info: D.DistInfo, backend: str = "inductor") -> Parallel:
    """Activation checkpointing, compile, then FSDP2 or DDP, in place on ``model`` (on its device)."""
    tc = cfg.train
    checkpointed = apply_activation_checkpointing(model, tc.activation_checkpointing)
    compiled = should_compile(cfg, info.device)
    if compiled:
        D.print0("note: compiling the model (train.compile); the first steps take about a minute")
        compile_model(model, backend)
    dtype = training_dtype(tc, info.device)
    step_model, mode = model, "single"
    if tc.parallel == "fsdp" and torch.distributed.is_initialized():  # also a group of one (benchmarks)
        shard(model, dtype)
        mode = "fsdp"
    elif info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        step_model, mode = DistributedDataParallel(model, device_ids=ids), "ddp"
    return Parallel(model, step_model, mode, compiled, checkpointed, dtype)


def shard(model: nn.Module, dtype: torch.dtype) -> None:
    """FSDP2 on each block, then the root (the embedding, the patcher, the final norm, the LM head);
    parameters gathered in ``dtype`` and gradients reduced in fp32 when ``dtype`` is not fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if dtype != torch.float32:
        # cast_forward_inputs=False: FSDP2 would otherwise cast every floating input of a block to
        # bf16, RoPE's fp32 cos/sin tables included, which DDP, one process and decoding keep in fp32
        policy = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> list[int]:
    """Recompute the activations of blocks 0, K, 2K, ... in the backward pass (K = 1 for 'full');
    returns their indices. The block's ``forward`` is wrapped in place, so parameter names (and
    checkpoints) do not change; without gradients (validation, sampling) it runs as it is."""
    every = checkpointed_every(mode)
    chosen = [i for i in range(len(model.layers)) if every and i % every == 0]
    for i in chosen:
        block = model.layers[i]
        block.forward = _recomputed(block.forward)
    return chosen


def _recomputed(forward: Callable[..., Any]) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def should_compile(cfg: Config, device: torch.device) -> bool:
    """``train.compile``, or by default: on CUDA yes, on the CPU no (it does not pay back its minute
    of start-up there)."""
    return cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"


def compile_model(model: nn.Module, backend: str = "inductor") -> None:
    """Compile in place every block's ``forward`` (static shapes) and the patcher's ``encode`` and
    ``decode`` (dynamic shapes), each falling back to eager with a one-line warning if compiling
    fails. Masks, losses and data stay outside: nothing in a compiled region waits for the host."""
    # blocks see the packed batch's fixed shape, except that with modality-specific weights the
    # number of positions each copy gathers changes from batch to batch: dynamic shapes there
    dynamic = getattr(model.cfg, "modality_weights", "shared") == "mot"
    for i, block in enumerate(model.layers):
        block.forward = with_fallback(
            torch.compile(block.forward, dynamic=dynamic, backend=backend), block.forward, f"layers.{i}"
        )
    patcher = getattr(model, "patcher", None)
    if patcher is not None:
        for name in ("encode", "decode"):
            eager = getattr(patcher, name)
            compiled = torch.compile(eager, dynamic=True, backend=backend)
            setattr(patcher, name, with_fallback(compiled, eager, f"patcher.{name}"))


def compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (Dynamo's, Inductor's and Triton's errors
    arrive as subclasses of ``TorchDynamoException``)."""
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


def with_fallback(compiled: Callable[..., Any], eager: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``compiled``, until it fails to compile: then a one-line warning and ``eager`` from then on.
    Errors that are not the compiler's (a bad input, out of memory) propagate as they are."""
    state = {"failed": False}

    @functools.wraps(eager)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not state["failed"]:
            try:
                return compiled(*args, **kwargs)
            except compile_errors() as e:
                state["failed"] = True
                D.print0(f"warning: torch.compile failed for {name} ({one_line(e)}); running it eagerly")
        return eager(*args, **kwargs)

    run.compiled_fallback = state  # type: ignore[attr-defined]  # for tests: did it fall back?
    return run


def one_line(error: BaseException) -> str:
    """'Type: message' of the error's root cause, on one line (compile errors wrap the real one)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (first compiles and recompiles): a number that
    stays flat once training runs is the sign that shapes do not recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
