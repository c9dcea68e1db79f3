"""torchrun support: process-group set-up, rank-0 printing, DDP / FSDP2 wrapping.

Launch with ``torchrun --nproc_per_node=N -m transfusion train ...``; torchrun sets RANK, WORLD_SIZE
and LOCAL_RANK, and ``init()`` joins the group (NCCL on CUDA, gloo on CPU). Without torchrun every
function here is a no-op for a single process.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; pick this process's device.

    Each local rank takes the GPU of its number; more local ranks than visible GPUs is an error that
    says what to do (before this check, rank 1 of two on a one-GPU machine died with "invalid device
    ordinal")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        gpus = torch.cuda.device_count()
        if local >= gpus:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local + 1)))
            raise ValueError(
                f"local rank {local} has no GPU: this machine shows {gpus} and torchrun started "
                f"{local_world} processes on it; use torchrun --nproc_per_node={gpus}, or "
                "--set train.device=cpu to train on the CPU (gloo)"
            )
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        use_tf32()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def use_tf32() -> None:
    """Let fp32 matmuls and convolutions on CUDA run on TF32 tensor cores (decoding, validation
    outside autocast, the VAE): about 8x the fp32 rate on an A100/H100 for a 10-bit mantissa in the
    products, which these paths tolerate. Only the CUDA backends are set (the new ``fp32_precision``
    API; the CPU's matmuls stay full fp32)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args: Any, **kw: Any) -> None:
    """A note from rank 0 only, on stderr unless ``file=`` says otherwise (results go to stdout)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **{"file": sys.stderr, **kw})


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model is its own)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 holds this model's parameters as shards (every rank a part)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def no_sync(model: nn.Module, skip: bool) -> Any:
    """DDP's ``no_sync()`` for the micro-batches of gradient accumulation that are not the last
    (``skip``), so gradients are all-reduced once per optimizer step; a null context otherwise."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as this rank holds it (FSDP2: its shards, as DTensors; DDP and one
    process: whole tensors), by parameter name, without wrapper prefixes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unwrap(model))


def optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state as flat tensors named ``<parameter>.<state>`` (``layers.0.attn.wq.weight.exp_avg``),
    sharded like the parameters under FSDP2; created (zero) if the optimizer has not stepped yet.
    Hyper-parameters (the param groups) are not included: they come from the configuration."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(unwrap(model), opt)["state"]
    return {f"{name}.{key}": v for name, st in state.items() for key, v in st.items() if torch.is_tensor(v)}


def set_optimizer_tensors(
    model: nn.Module, opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]
) -> None:
    """Load ``optimizer_tensors``' layout back into the optimizer (its param groups are kept)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    current = get_optimizer_state_dict(unwrap(model), opt)
    state = {
        name: {key: flat.get(f"{name}.{key}", v) for key, v in st.items()}
        for name, st in current["state"].items()
    }
    set_optimizer_state_dict(unwrap(model), opt, {"state": state, "param_groups": current["param_groups"]})


def load_state(
    model: nn.Module, opt: torch.optim.Optimizer, weights: dict[str, torch.Tensor], opt_state: dict[str, Any]
) -> None:
    """Whole weights and optimizer state (a one-process checkpoint) into a model that may be wrapped
    (DDP) or sharded (FSDP2)."""
    if dist.is_initialized() and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, opt, opt_state, options=opts)
        return
    unwrap(model).load_state_dict(weights)
    opt.load_state_dict(opt_state)


def load_full_tensors(target: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into ``target``, sharding each like its target where that is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for k, v in full.items():
        t = target[k]
        if isinstance(t, DTensor):
            v = distribute_tensor(v.to(t.device), t.device_mesh, t.placements)
        t.copy_(v)


def cpu_group() -> Any:
    """A gloo process group beside the training one, for the collectives of a checkpoint written in a
    background thread (NCCL must not be driven from two threads at once); None in one process."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_reduce(values: list[float], op: Any) -> list[float]:
    """All-reduce a few numbers in one collective, on the device the backend needs (NCCL: this
    rank's GPU; gloo: the CPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def any_across(*flags: bool) -> list[bool]:
    """For each flag, True on every rank when it is true on any rank (so all ranks take one decision)."""
    if not dist.is_initialized():
        return [bool(f) for f in flags]
    return [v > 0 for v in _all_reduce([float(f) for f in flags], dist.ReduceOp.MAX)]


def all_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    if not dist.is_initialized():
        return bool(flag)
    return _all_reduce([float(flag)], dist.ReduceOp.MIN)[0] > 0


def mean_across(value: float) -> float:
    if not dist.is_initialized():
        return value
    return _all_reduce([value], dist.ReduceOp.SUM)[0] / dist.get_world_size()
