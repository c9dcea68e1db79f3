"""torchrun support: process-group set-up, rank-0 printing, DDP / FSDP2 wrapping.

Launch with ``torchrun --nproc_per_node=N -m transfusion train ...``; torchrun sets RANK, WORLD_SIZE
and LOCAL_RANK, and ``init()`` joins the group (NCCL on CUDA, gloo on CPU). Without torchrun every
function here is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
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


DEFAULT_TIMEOUT_S = 900.0
"""How long a collective may wait for the slowest process before the run stops (``train.dist_timeout``)."""


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group when launched by torchrun; pick this process's device.

    The device (``pick_device``): local rank k takes ``cuda:k`` when the machine shows every local
    rank a GPU, ``cuda:0`` when each rank is shown one GPU of its own (SLURM ``--gpus-per-task=1``,
    one-GPU pods), or exactly ``cuda:K`` when asked for. A collective that waits longer than
    ``timeout_s`` for another process ends the run with an error instead of hanging (NCCL's default is
    10 minutes, gloo's 30). Under torchrun on GPUs, ranks that would share one GPU stop at once with a
    one-line error (``check_distinct_gpus``)."""
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local + 1)))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = pick_device(device, local, local_world, torch.cuda.device_count() if use_cuda else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        use_tf32()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
        if dev.type == "cuda":
            check_distinct_gpus(all_gather_object((socket.gethostname(), gpu_id(dev)), host=True))
    return DistInfo(rank, world, local, dev)


def pick_device(requested: str, local_rank: int, local_world: int, gpus: int) -> torch.device:
    """This process's device for ``train.device`` = ``requested`` ('auto', 'cpu', 'cuda' or 'cuda:K'),
    given its local rank among ``local_world`` processes on this machine and the GPUs it is shown."""
    if requested == "cpu" or (requested == "auto" and gpus == 0):
        return torch.device("cpu")
    if gpus == 0:
        raise ValueError(f"train.device={requested} but this process sees no GPU; use train.device=cpu")
    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if index >= gpus:
            raise ValueError(
                f"train.device={requested} but this process sees {gpus} GPU(s) (cuda:0..cuda:{gpus - 1})"
            )
        return torch.device("cuda", index)
    if gpus >= local_world:
        return torch.device("cuda", local_rank)  # one machine's GPUs shared out by local rank
    if gpus == 1:
        return torch.device("cuda", 0)  # each rank is shown its own GPU (checked: check_distinct_gpus)
    raise ValueError(
        f"local rank {local_rank} has no GPU: this machine shows {gpus} and torchrun started "
        f"{local_world} processes on it; use torchrun --nproc_per_node={gpus}, or "
        "--set train.device=cpu to train on the CPU (gloo)"
    )


def gpu_id(device: torch.device) -> str:
    """A GPU's identity across processes that number their GPUs differently (its UUID)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def check_distinct_gpus(seen: list[tuple[str, str]]) -> None:
    """``seen[r]`` = (host, GPU identity) of rank r: two ranks on one GPU is a one-line error (NCCL
    would fail later with "Duplicate GPU detected", or the ranks would share its memory)."""
    first: dict[tuple[str, str], int] = {}
    for r, key in enumerate(seen):
        if key in first:
            raise ValueError(
                f"ranks {first[key]} and {r} on host {key[0]} were given the same GPU; start one process per "
                "GPU (torchrun --nproc_per_node=<GPUs>) or show each rank its own GPU (CUDA_VISIBLE_DEVICES)"
            )
        first[key] = r


def check_shared_directory(path: str | Path, what: str, seconds: float = 10.0) -> None:
    """Every process writes a token file into ``path`` and looks for every other process's within
    ``seconds``: a directory that is not one shared file system for the whole run (node-local disks)
    is a one-line error on every rank, in seconds, instead of a wait for files that never come. All
    ranks must call it; nothing is left behind. A no-op in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    nonce = all_gather_object(uuid.uuid4().hex[:12], host=True)[0]  # rank 0's, for this check only
    made = [p for p in (Path(path), *Path(path).parents) if not p.exists()]  # what this check creates
    folder = Path(path) / f".shared-check-{nonce}"
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    (folder / f"rank{rank}").write_text(host)
    all_gather_object(None, host=True)  # every token is written
    deadline = time.time() + seconds
    while True:
        missing = [r for r in range(world) if not (folder / f"rank{r}").is_file()]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.2)
    report = all_gather_object((host, missing), host=True)
    (folder / f"rank{rank}").unlink(missing_ok=True)
    all_gather_object(None, host=True)  # every rank has looked before any folder goes
    shutil.rmtree(folder, ignore_errors=True)
    blind = [(r, h, m) for r, (h, m) in enumerate(report) if m]
    if blind:
        for p in made:  # nothing left behind: the directories this check made, where still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        r, h, m = blind[0]
        raise ValueError(
            f"{what} {path} is not one shared directory for the whole run: rank {r} (host {h}) does not see "
            f"the files of rank(s) {', '.join(map(str, m))}; put it on a file system every node mounts "
            "(NFS, Lustre, ...)"
        )


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
    _HOST_GROUP.clear()  # destroyed with the others


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


def gradient_sync(model: nn.Module, sync: bool) -> Any:
    """A context for one micro-batch's forward and backward: gradients leave this process only when
    ``sync`` (the last micro-batch of an optimizer step), so accumulation costs one reduction a step.
    DDP: ``no_sync()`` on the others. FSDP2: ``set_requires_gradient_sync(sync)`` before it (the
    others keep their unsharded gradients locally and the last one reduce-scatters their sum, once per
    FSDP group). A null context in one process."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)  # recurses into every sharded block
    return nullcontext()


def clip_grad_norm(parameters: Any, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global norm of ``max_norm``; returns the norm before clipping, the same
    on every rank (0-d, on the parameters' device, no host sync).

    Under FSDP2 each rank holds shards of the gradients, and the norm of its shards is not the norm:
    the total is a DTensor, made whole (``full_tensor()``, one all-reduce, on every rank whatever its
    gradients hold) before clipping and before anyone reads it, as torchtitan does."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if norm.device.type == "cpu" and float(norm) <= max_norm:
        return norm  # nothing to clip (the factor would be 1): reading the norm is free on the CPU
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


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
    model: nn.Module,
    opt: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    opt_state: dict[str, Any],
    strict: bool = True,
) -> None:
    """Whole weights and optimizer state (a one-process checkpoint) into a model that may be wrapped
    (DDP) or sharded (FSDP2). Sharded, every rank keeps its part of each whole tensor: the optimizer
    state, which ``torch.optim`` keys by the parameters' order, is renamed to the parameters' names
    (``optimizer_tensors``' layout) and sharded like them. ``strict=False``: ``weights`` may be a part
    of the model's (a LoRA run's adapters)."""
    if dist.is_initialized() and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=strict)
        set_model_state_dict(model, weights, options=opts)
        targets = optimizer_tensors(model, opt)
        load_full_tensors(targets, named_optimizer_state(model, opt, opt_state))
        set_optimizer_tensors(model, opt, targets)
        return
    missing, unexpected = unwrap(model).load_state_dict(weights, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    opt.load_state_dict(opt_state)


def named_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, opt_state: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """A ``torch.optim`` state dict (states keyed 0, 1, ... in the order of its param groups) as
    ``optimizer_tensors``' names (``<parameter>.<state>``), given the optimizer ``opt`` of the same
    model and configuration, whose groups list the parameters in that order."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    saved = sum(len(g["params"]) for g in opt_state["param_groups"])
    if saved != len(order):
        raise ValueError(
            f"the checkpoint's optimizer holds {saved} parameters, this model's {len(order)}: "
            "resume with the run's own model and training configuration"
        )
    return {
        f"{order[int(i)]}.{key}": v
        for i, st in opt_state["state"].items()
        for key, v in st.items()
        if torch.is_tensor(v)
    }


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


_HOST_GROUP: list[Any] = []


def host_group() -> Any:
    """A gloo group over every rank, made once (the default group when it is gloo already): small
    Python objects pass through the host without touching a GPU or NCCL."""
    if dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def all_gather_object(obj: Any, host: bool = False) -> list[Any]:
    """Every rank's ``obj``, by rank (``[obj]`` in one process); ``host``: through ``host_group``."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=host_group() if host else None)
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


def ranks_where(flag: bool) -> list[int]:
    """The ranks on which ``flag`` is true, known to every rank (one all-reduce of a world-long vector;
    every rank must call it, whatever its flag)."""
    if not dist.is_initialized():
        return [0] if flag else []
    votes = [0.0] * dist.get_world_size()
    votes[dist.get_rank()] = float(bool(flag))
    return [r for r, v in enumerate(_all_reduce(votes, dist.ReduceOp.SUM)) if v > 0]


def mean_across(value: float) -> float:
    if not dist.is_initialized():
        return value
    return _all_reduce([value], dist.ReduceOp.SUM)[0] / dist.get_world_size()
