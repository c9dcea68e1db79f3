"""Saving and restoring a training run, in one process or many, synchronously or in the background.

One process writes the layout of ``transfusion.checkpoint`` (``model.safetensors``, ``ema.safetensors``,
``state.pt``). Several write a sharded checkpoint: every rank writes its own part of the weights, the
EMA and the optimizer state through ``torch.distributed.checkpoint`` (nothing is gathered on any rank:
rank 0's host memory holds its own shard, as every rank's does), and rank 0 adds the small things
(meta.json, every data stream's position, every rank's random states) once all parts are written.
A sharded checkpoint resumes on any number of processes that divides the run's data streams (DCP
reshards the tensors; the streams are shared out again, see ``training.loop``).

``train.async_checkpoint``: the tensors are copied to host memory, then written by a background
thread while training goes on; the checkpoint becomes ``latest`` only once every part is on disk,
so a run killed during a save resumes from the previous complete checkpoint. One save is in flight
at a time: the next waits for it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfusion import checkpoint as ckpt
from transfusion import distributed as D
from transfusion.config import Config


@dataclass
class _InFlight:
    """A save whose tensors are still being written; ``finish`` completes it on rank 0."""

    future: Any  # a Future, or a thread
    tmp: Path
    state: ckpt.TrainingState
    extra: dict[str, Any]


class Checkpointer:
    def __init__(self, out: Path, cfg: Config, tokenizer: Any, info: D.DistInfo, streams: int,
                 saved: set[str] | None = None, extra: dict[str, Any] | None = None):  # fmt: skip
        """``saved``: the weights a checkpoint holds (None: all; a LoRA run: its adapters, whose frozen
        base is never written again); ``extra``: more for meta.json (a LoRA run's base)."""
        self.out, self.cfg, self.tokenizer, self.info, self.streams = out, cfg, tokenizer, info, streams
        self.saved, self.meta = saved, extra or {}
        self.background = cfg.train.async_checkpoint
        self.group = D.cpu_group() if self.background and info.enabled else None
        self.in_flight: _InFlight | None = None

    # --- saving ---------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: dict[str, torch.Tensor] | None,
        loader_states: list[dict[str, Any]],
        counters: dict[str, int],
    ) -> None:
        """Checkpoint ``step`` (every rank calls it, each with the states of its own data streams)."""
        self.wait()
        streams = [s for states in D.all_gather_object(loader_states) for s in states]
        rng = D.all_gather_object(ckpt.rng_state())
        extra = {"data_streams": self.streams, "world_size": self.info.world_size, "has_ema": ema is not None,
                 **self.meta}  # fmt: skip
        if not self.info.enabled:
            self._save_single(
                step, model, optimizer, ema, ckpt.TrainingState(step, streams, dict(counters), rng), extra
            )
            return
        tmp = ckpt.begin_checkpoint(self.out, step) if self.info.is_main else None
        tmp = Path(D.all_gather_object(str(tmp))[0])  # rank 0 made it: every rank writes into it
        tensors = {f"model.{k}": v for k, v in self._kept(D.model_tensors(model)).items()}
        tensors |= {f"ema.{k}": v for k, v in (ema or {}).items()}
        tensors |= {f"optim.{k}": v for k, v in D.optimizer_tensors(model, optimizer).items()}
        extra |= {"format": "sharded", "shapes": {k: list(v.shape) for k, v in tensors.items()},
                  "tensors": {p: [k.split(".", 1)[1] for k in tensors if k.startswith(p + ".")] for p in ("model", "ema")}}  # fmt: skip
        future = ckpt.save_sharded(tmp / ckpt.SHARDS_DIR, tensors, self.group, self.background)
        self.in_flight = _InFlight(future, tmp, ckpt.TrainingState(step, streams, dict(counters), rng), extra)
        if not self.background:
            self.wait()

    def _save_single(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: dict[str, torch.Tensor] | None, state: ckpt.TrainingState, extra: dict[str, Any]) -> None:  # fmt: skip
        """One process: copies on the CPU now (the staging), files written here or in a thread."""
        weights = _to_cpu(self._kept(D.unwrap(model).state_dict()))
        state.optimizer = _to_cpu(optimizer.state_dict())
        ema = _to_cpu(ema) if ema is not None else None
        tmp = ckpt.begin_checkpoint(self.out, step)
        if not self.background:
            ckpt.write_single(tmp, weights, ema)
            self.in_flight = _InFlight(None, tmp, state, extra)
            self.wait()
            return
        future: Future = Future()

        def write() -> None:
            try:
                ckpt.write_single(tmp, weights, ema)
                future.set_result(None)
            except BaseException as e:  # reported by poll()/wait() on the training thread
                future.set_exception(e)

        threading.Thread(target=write, name="checkpoint-writer", daemon=True).start()
        self.in_flight = _InFlight(future, tmp, state, extra)

    def _kept(self, state: dict[str, Any]) -> dict[str, Any]:
        return state if self.saved is None else {k: v for k, v in state.items() if k in self.saved}

    def poll(self) -> None:
        """Finish a background save whose writes are done (call between steps; cheap otherwise)."""
        if self.in_flight is not None and (self.in_flight.future is None or self.in_flight.future.done()):
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is on disk and complete (meta.json, ``latest``)."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return
        result = flight.future.result() if flight.future is not None else None  # a failed write raises here
        if self.info.is_main:
            if self.info.enabled:  # the files every rank wrote, by DCP's record, each seen here before commit
                files = result or []
                unseen = [f for f in files if not (flight.tmp / ckpt.SHARDS_DIR / f).is_file()]
                if unseen:
                    raise ValueError(
                        f"{flight.tmp / ckpt.SHARDS_DIR / unseen[0]} (and {len(unseen) - 1} more) was written by "
                        "another rank but is not visible here; the run directory must be on a file system "
                        "every node mounts"
                    )
                flight.extra["shard_files"] = files
            ckpt.commit_checkpoint(flight.tmp, self.cfg, self.tokenizer, flight.state,
                                   self.cfg.train.keep_last, flight.extra)  # fmt: skip

    # --- restoring --------------------------------------------------------------------------------------
    def restore(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: dict[str, torch.Tensor] | None,
    ) -> ckpt.TrainingState:
        """Weights, optimizer and EMA into this run's (possibly sharded) model, from a checkpoint written
        by any number of processes; returns the rest of its state."""
        state = ckpt.read_training_state(path)
        if ckpt.is_sharded(path):
            targets = {f"model.{k}": v for k, v in self._kept(D.model_tensors(model)).items()}
            targets |= {f"optim.{k}": v for k, v in D.optimizer_tensors(model, optimizer).items()}
            meta, _ = ckpt.read_meta(path)
            if ema is not None and meta.get("has_ema"):
                targets |= {f"ema.{k}": v for k, v in ema.items()}
            ckpt.load_sharded(path, targets)
            _set_model(model, {k[6:]: v for k, v in targets.items() if k.startswith("model.")})
            D.set_optimizer_tensors(
                model, optimizer, {k[6:]: v for k, v in targets.items() if k.startswith("optim.")}
            )
        else:
            weights = ckpt.load_tensors(path / ckpt.MODEL_FILE)
            D.load_state(model, optimizer, weights, state.optimizer, strict=self.saved is None)
            if ema is not None and (path / ckpt.EMA_FILE).is_file():
                D.load_full_tensors(ema, ckpt.load_tensors(path / ckpt.EMA_FILE))
        if state.rng:  # a rank the saving run did not have takes a saved rank's states
            ckpt.set_rng_state(state.rng[self.info.rank % len(state.rng)])
        return state


def _to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts and lists of tensors) with every tensor copied to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _set_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: a LoRA run's checkpoint holds its adapters only (the base comes from its own checkpoint)
    set_model_state_dict(D.unwrap(model), tensors, options=StateDictOptions(strict=False))
