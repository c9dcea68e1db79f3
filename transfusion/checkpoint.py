"""Checkpoints that describe themselves and cannot run code when loaded.

A checkpoint is a directory::

    model.safetensors     the weights (EMA weights, when training kept an EMA, in ema.safetensors)
    meta.json             {"config": Config, "tokenizer": {...}, "step": int, "vae": path or null, ...}
    tokenizer.json        a copy of the tokenizer file, when the model has one

A training run's checkpoint adds what resuming needs: ``state.pt`` (optimizer state and the random
states of every process, tensors only: loaded with ``weights_only=True``) and ``loader.json`` (each
process's data position). A *run* directory holds ``checkpoints/step_XXXXXXX`` folders and a
``latest`` text file naming the newest complete one; ``resolve_checkpoint`` accepts either. Each
checkpoint is written under a temporary name and renamed into place, so a crash during a save leaves
the previous one intact.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfusion.config import Config
from transfusion.io import atomic_directory, atomic_write_bytes, atomic_write_text, load_tensors, save_tensors
from transfusion.model import Transfusion
from transfusion.tokenizer import tokenizer_from_dict

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "state.pt"
LOADER_FILE = "loader.json"
LATEST = "latest"
COUNTERS = ("bad_steps_total", "tokens_seen", "flops_seen")
"""Running totals a training checkpoint carries in meta.json."""


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without wrappers' prefixes (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``)."""
    out = {}
    for k, v in model.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            k = k.replace(prefix, "")
        out[k] = v
    return out


def save_tokenizer(tokenizer: Any, directory: Path) -> dict[str, Any]:
    """The tokenizer's description for meta.json. A tokenizer read from a file has the file copied
    into the checkpoint (``tokenizer.json``, named relative to it), so the checkpoint stands alone
    wherever it is moved."""
    d = tokenizer.to_dict()
    if d.get("kind") == "hf":
        src = Path(d["path"])
        if not src.is_absolute():
            raise ValueError(f"tokenizer path {src} is relative; cannot copy it into {directory}")
        atomic_write_bytes(directory / TOKENIZER_FILE, src.read_bytes())
        d = {**d, "path": TOKENIZER_FILE}
    return d


def save_model(
    directory: str | Path,
    model: nn.Module | dict[str, torch.Tensor],
    config: Config,
    tokenizer: Any,
    extra: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights (a module, or its full state dict) and meta.json into ``directory`` (created),
    each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = model_state(model) if isinstance(model, nn.Module) else model
    save_tensors(directory / MODEL_FILE, weights)
    if ema is not None:
        save_tensors(directory / EMA_FILE, ema)
    meta = {"config": config.to_dict(), "tokenizer": save_tokenizer(tokenizer, directory), **(extra or {})}
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / META_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        candidate = path / latest.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    found = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    found = [p for p in found if (p / META_FILE).is_file() and (p / MODEL_FILE).is_file()]
    if found:
        return found[-1]
    raise FileNotFoundError(f"{path} holds no checkpoint ({META_FILE} + {MODEL_FILE}); train one first")


def read_meta(ckpt: Path) -> tuple[dict[str, Any], Config]:
    """meta.json and the Config it holds; a broken file is a ``ValueError`` that names it."""
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
        return meta, Config.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{ckpt / META_FILE} is not a checkpoint description ({type(e).__name__}: {e})"
        ) from None


@dataclass
class Loaded:
    model: Transfusion
    config: Config
    tokenizer: Any
    meta: dict[str, Any]
    path: Path


def load_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> Loaded:
    """Load a checkpoint (or a run's latest) for inference. Prefers EMA weights when present."""
    ckpt = resolve_checkpoint(path)
    meta, config = read_meta(ckpt)
    tokenizer = tokenizer_from_dict(meta.get("tokenizer"), base=ckpt)
    with torch.device("meta"):
        model = Transfusion(config.model)
    weights = ckpt / (EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else MODEL_FILE)
    state = load_tensors(weights, device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.model.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.rope = type(model.rope)(config.model.head_dim, config.model.max_seq_len, config.model.rope_theta)
    model.to(device).eval()
    return Loaded(model=model, config=config, tokenizer=tokenizer, meta=meta, path=ckpt)


def vae_directory(loaded: Loaded) -> Path | None:
    """The VAE directory a checkpoint's meta.json names (it may be missing on disk), or None."""
    name = loaded.meta.get("vae")
    return (loaded.path / name).resolve() if name else None


def load_for_inference(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[Loaded, Any | None]:
    """(``Loaded``, VAE or None) from a checkpoint or run directory. The VAE is the directory
    meta.json names under "vae" (relative to the checkpoint); None if there is none."""
    from transfusion.vae import load_vae

    loaded = load_model(checkpoint, device)
    vae_dir = vae_directory(loaded)
    return loaded, (load_vae(vae_dir, device) if vae_dir is not None and vae_dir.is_dir() else None)


# --- training runs: what resuming needs ------------------------------------------------------------
@dataclass
class TrainingState:
    """Everything beyond the weights that a run continues from."""

    step: int
    optimizer: dict[str, Any]
    """The optimizer's full state dict (gathered whole under FSDP2)."""
    loader_states: list[dict[str, Any]]
    """Each process's data position (``BatchLoader.state_dict()``), by rank."""
    counters: dict[str, int]
    """Running totals (``COUNTERS``)."""
    rng: list[dict[str, Any]] | None = None
    """Each process's global random states, by rank (``rng_state()``)."""


def rng_state() -> dict[str, Any]:
    """This process's global random states (training draws its noise from per-sample generators;
    these cover anything else that uses the global ones)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only (one GPU a process)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``; the CUDA state goes to this process's device when there is one (a
    machine with fewer or no GPUs resumes too: every state was saved per process, not per GPU)."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written by an older version: every visible GPU's state
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def save_run_checkpoint(
    out: str | Path,
    weights: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    config: Config,
    tokenizer: Any,
    state: TrainingState,
    keep_last: int,
) -> Path:
    """``out/checkpoints/step_N`` written whole or not at all, then ``latest`` pointed at it and
    checkpoints beyond the newest ``keep_last`` removed. Returns the checkpoint directory."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:07d}"
    with atomic_directory(root / name) as tmp:
        extra = {"step": state.step, "vae": "../../vae", **state.counters}
        save_model(tmp, weights, config, tokenizer, extra=extra, ema=ema)
        atomic_write_text(tmp / LOADER_FILE, json.dumps(state.loader_states))
        torch.save({"optimizer": state.optimizer, "rng": state.rng}, tmp / STATE_FILE)
    atomic_write_text(Path(out) / LATEST, f"checkpoints/{name}\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_run_checkpoint(
    path: Path, world_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, TrainingState]:
    """(weights, EMA weights or None, training state) of a run checkpoint written by
    ``save_run_checkpoint``; refuses a checkpoint written by another number of processes."""
    meta, _ = read_meta(path)
    loader_states = json.loads((path / LOADER_FILE).read_text())
    if len(loader_states) != world_size:
        raise ValueError(
            f"{path} was written by {len(loader_states)} process(es); resume with the same number "
            f"(torchrun --nproc_per_node={len(loader_states)}), not {world_size}"
        )
    saved = torch.load(path / STATE_FILE, weights_only=True)
    ema = load_tensors(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
    state = TrainingState(
        step=int(meta["step"]),
        optimizer=saved["optimizer"],
        loader_states=loader_states,
        counters={k: meta.get(k, 0) for k in COUNTERS},
        rng=saved.get("rng"),
    )
    return load_tensors(path / MODEL_FILE), ema, state
