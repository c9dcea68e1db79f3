"""Checkpoints that describe themselves and cannot run code when loaded.

A checkpoint is a directory::

    model.safetensors     the weights (EMA weights, when training kept an EMA, in ema.safetensors)
    meta.json             {"config": Config, "tokenizer": {...}, "step": int, "vae": path or null, ...}

Every file is written to a temporary name and renamed into place, so a crash during a save leaves
the previous checkpoint intact. A *run* directory holds ``checkpoints/step_XXXXXXX`` folders and a
``latest`` text file naming the newest complete one; ``resolve_checkpoint`` accepts either.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transfusion.config import Config
from transfusion.model import Transfusion
from transfusion.tokenizer import tokenizer_from_dict

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written atomically; shared storage (tied weights) is cloned apart first."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without wrappers' prefixes (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``)."""
    state = model.state_dict()
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.replace(prefix, "")
        out[k] = v
    return out


def save_model(
    directory: str | Path,
    model: nn.Module,
    config: Config,
    tokenizer: Any,
    extra: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights and meta.json into ``directory`` (created), each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / MODEL_FILE, model_state(model))
    if ema is not None:
        save_tensors(directory / EMA_FILE, ema)
    meta = {"config": config.to_dict(), "tokenizer": save_tokenizer(tokenizer, directory), **(extra or {})}
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return directory


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / META_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        candidate = path / latest.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    found = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    found = [p for p in found if (p / META_FILE).is_file() and (p / MODEL_FILE).is_file()]
    if found:
        return found[-1]
    raise FileNotFoundError(f"{path} holds no checkpoint ({META_FILE} + {MODEL_FILE}); train one first")


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
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
        config = Config.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{ckpt / META_FILE} is not a checkpoint description ({type(e).__name__}: {e})"
        ) from None
    tokenizer = tokenizer_from_dict(meta.get("tokenizer"), base=ckpt)
    with torch.device("meta"):
        model = Transfusion(config.model)
    weights = ckpt / (EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else MODEL_FILE)
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{weights} is not a readable safetensors file ({e})") from None
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


def copy_dir_atomic(src: Path, dst: Path) -> None:
    """Copy a directory into place via a temporary sibling and a rename."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
