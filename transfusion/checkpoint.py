"""Checkpoints that describe themselves and cannot run code when loaded.

A checkpoint is a directory::

    model.safetensors     the weights (EMA weights, when training kept an EMA, in ema.safetensors)
    meta.json             {"config": Config, "tokenizer": {...}, "step": int, "vae": path or null, ...}
    tokenizer.json        a copy of the tokenizer file, when the model has one

A training run's checkpoint adds what resuming needs: ``state.pt`` (optimizer state and random
states, tensors only: loaded with ``weights_only=True``) and ``loader.json`` (each data stream's
position). A *run* directory holds ``checkpoints/step_XXXXXXX`` folders and a ``latest`` text file
naming the newest complete one; ``resolve_checkpoint`` accepts either. Each checkpoint is written
under a temporary name and renamed into place, so a crash during a save leaves the previous one intact.

A run of several processes writes a *sharded* checkpoint instead: no rank gathers anything. Weights,
EMA and optimizer state go into ``shards/`` through ``torch.distributed.checkpoint`` (DCP), each rank
writing its own part as a safetensors file whose header records where its pieces sit in the whole
tensors (DCP's ``HuggingFaceStorageWriter`` with ``save_distributed``); ``meta.json`` names every
shard file, ``loader.json`` every stream's position and ``rng.safetensors`` / ``rng.json`` each rank's
random states. DCP's default storage is avoided on purpose: its ``.metadata`` file is read with
``pickle.load`` and its non-tensor items with ``torch.load(weights_only=False)``, either of which can
run code hidden in a checkpoint; the safetensors storage has no pickle anywhere, so loading any
checkpoint, sharded or not, never runs code. A sharded checkpoint loads into any number of processes
(DCP reshards on load), including one (``load_model``, ``consolidate``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfusion.config import Config
from transfusion.io import atomic_write_bytes, atomic_write_text, load_tensors, save_tensors
from transfusion.model import Transfusion
from transfusion.model_directory import is_model_directory, read_model_directory
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


def is_checkpoint(path: Path) -> bool:
    """A checkpoint directory: meta.json and the weights (one file, or a sharded checkpoint's shards)."""
    return (path / META_FILE).is_file() and ((path / MODEL_FILE).is_file() or (path / SHARDS_DIR).is_dir())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_checkpoint(path):
        return path
    latest = path / LATEST
    if latest.is_file():
        candidate = path / latest.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    found = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    found = [p for p in found if is_checkpoint(p)]
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


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    adapters: list[str | Path] | None = None,
    merge: bool = True,
) -> Loaded:
    """Load a checkpoint (or a run's latest, or an exported model directory) for inference. Prefers EMA
    weights when present (an exported directory holds the weights it was exported with).

    A LoRA run's checkpoint holds adapters: its base (``train.init_checkpoint``, its inference weights)
    is loaded and the adapter applied. ``adapters``: adapter directories (``lora``) applied on top, each
    checked against the weights it was trained on. Applied adapters are merged into the weights
    (``merge``; one plain GEMM per layer, as without them), or kept apart as ``default``, ``adapter1``...
    (per-row adapters, ``lora.rows_using``)."""
    from transfusion import lora

    if is_model_directory(path):
        meta, config, state = read_model_directory(path, device)
        ckpt, weights = Path(path), Path(path)
    else:
        ckpt = resolve_checkpoint(path)
        meta, config = read_meta(ckpt)
        weights, state = read_weights(ckpt, meta, use_ema, device)
    if config.train.lora_rank and "lora" in meta:
        loaded = _load_lora_run(ckpt, meta, config, state, device)
    else:
        loaded = _load_whole(ckpt, weights, meta, config, state, device)
    for i, directory in enumerate(adapters or []):
        lora.load_adapter(loaded.model, directory, name=f"adapter{i}" if i else "default")
    if merge:
        lora.merge(loaded.model)
    loaded.model.to(device).eval()
    return loaded


def _load_lora_run(
    ckpt: Path, meta: dict[str, Any], config: Config, state: dict[str, torch.Tensor], device: Any
) -> Loaded:
    """A LoRA run's checkpoint: its base loaded (inference weights), checked, and its adapter added."""
    from transfusion import lora

    info = meta["lora"]
    base_path = Path(info["base"]["path"])
    if not base_path.exists():
        raise FileNotFoundError(
            f"{ckpt} adapts {base_path}, which is not there; give the base with --checkpoint BASE --adapter "
            f"{ckpt.parent.parent / 'adapter'}"
        )
    loaded = load_model(base_path, device, use_ema=True, merge=False)
    lora.check_base({"transfusion_base": info["base"]}, loaded.model, str(ckpt))
    lora.add_adapter(
        loaded.model, "default", int(info["rank"]), float(info["alpha"]), modules=info["modules"]
    )
    missing, unexpected = loaded.model.load_state_dict(state, strict=False)
    wanted = [k for k in missing if lora.is_adapter_key(k)]
    if wanted or unexpected:
        raise ValueError(f"{ckpt} does not fit its base: missing {wanted[:3]}, unexpected {unexpected[:3]}")
    return Loaded(model=loaded.model, config=config, tokenizer=loaded.tokenizer, meta=meta, path=ckpt)


def _load_whole(
    ckpt: Path,
    weights: Path,
    meta: dict[str, Any],
    config: Config,
    state: dict[str, torch.Tensor],
    device: Any,
) -> Loaded:
    tokenizer = tokenizer_from_dict(meta.get("tokenizer"), base=ckpt)
    with torch.device("meta"):
        model = Transfusion(config.model)
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


def read_weights(
    ckpt: Path, meta: dict[str, Any], use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[Path, dict[str, torch.Tensor]]:
    """(where they came from, whole weights by name): EMA weights when asked and present, from
    ``ema.safetensors`` / ``model.safetensors`` or, in one process, from a sharded checkpoint's shards."""
    if not is_sharded(ckpt):
        file = ckpt / (EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else MODEL_FILE)
        return file, load_tensors(file, device)
    prefix = "ema." if use_ema and meta.get("has_ema") else "model."
    names, shapes = meta["tensors"][prefix.rstrip(".")], meta["shapes"]
    targets = {prefix + n: torch.empty(shapes[prefix + n], device=device) for n in names}
    load_sharded(ckpt, targets)
    return ckpt / SHARDS_DIR, {k.removeprefix(prefix): v for k, v in targets.items()}


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """A one-process checkpoint (``model.safetensors``, ``ema.safetensors``, meta.json) in ``out`` from a
    sharded one: the weights an inference or export tool expects, without the optimizer state."""
    ckpt = resolve_checkpoint(checkpoint)
    meta, config = read_meta(ckpt)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is not sharded (it already holds {MODEL_FILE}); nothing to consolidate")
    tokenizer = tokenizer_from_dict(meta.get("tokenizer"), base=ckpt)
    weights = read_weights(ckpt, meta, use_ema=False)[1]
    ema = read_weights(ckpt, meta, use_ema=True)[1] if meta.get("has_ema") else None
    keep = {
        k: v for k, v in meta.items() if k not in ("config", "tokenizer", "shard_files", "tensors", "shapes")
    }
    keep["vae"] = (
        os.path.relpath((ckpt / meta["vae"]).resolve(), Path(out).resolve()) if meta.get("vae") else None
    )
    return save_model(out, weights, config, tokenizer, extra=keep, ema=ema)


def vae_directory(loaded: Loaded) -> Path | None:
    """The VAE directory a checkpoint's meta.json names (it may be missing on disk), or None."""
    name = loaded.meta.get("vae")
    return (loaded.path / name).resolve() if name else None


def load_for_inference(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    adapters: list[str | Path] | None = None,
    merge: bool = True,
) -> tuple[Loaded, Any | None]:
    """(``Loaded``, VAE or None) from a checkpoint, run or model directory (and ``adapters``, see
    ``load_model``). The VAE is the directory meta.json (config.json) names under "vae" (relative to
    it); None if there is none."""
    from transfusion.autoencoders import load_vae

    loaded = load_model(checkpoint, device, use_ema, adapters, merge)
    vae_dir = vae_directory(loaded)
    return loaded, (load_vae(vae_dir, device) if vae_dir is not None and vae_dir.is_dir() else None)


# --- training runs: what resuming needs ------------------------------------------------------------
SHARDS_DIR = "shards"
RNG_FILE = "rng.safetensors"
RNG_JSON = "rng.json"


@dataclass
class TrainingState:
    """Everything beyond the tensors that a run continues from."""

    step: int
    loader_states: list[dict[str, Any]]
    """Each data stream's position (``BatchLoader.state_dict()``), by stream."""
    counters: dict[str, int]
    """Running totals (``COUNTERS``)."""
    rng: list[dict[str, Any]] | None = None
    """Each process's global random states, by rank (``rng_state()``)."""
    optimizer: dict[str, Any] | None = None
    """One process: the optimizer's state dict (a sharded checkpoint keeps it in its shards)."""


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


def begin_checkpoint(out: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (beside where it will go)."""
    root = Path(out) / "checkpoints"
    tmp = root / f".step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(
    tmp: Path, config: Config, tokenizer: Any, state: TrainingState, keep_last: int, extra: dict[str, Any]
) -> Path:
    """Finish the checkpoint filled in ``tmp`` (meta.json, loader.json, random states; the tensors are
    there already), rename it into place, point ``latest`` at it, and remove checkpoints beyond the
    newest ``keep_last``. Until the rename, ``latest`` names the previous complete checkpoint."""
    atomic_write_text(tmp / LOADER_FILE, json.dumps(state.loader_states))
    if state.optimizer is not None or state.rng is None:
        torch.save({"optimizer": state.optimizer, "rng": state.rng}, tmp / STATE_FILE)
    else:  # sharded: the optimizer is in the shards; the random states as tensors and JSON
        save_tensors(tmp / RNG_FILE, {f"{r}.{k}": v for r, st in enumerate(state.rng) for k, v in st.items()
                                      if torch.is_tensor(v)})  # fmt: skip
        atomic_write_text(tmp / RNG_JSON, json.dumps([st["python"] for st in state.rng]))
    meta = {"config": config.to_dict(), "tokenizer": save_tokenizer(tokenizer, tmp), "step": state.step,
            "vae": "../../vae", **state.counters, **extra}  # fmt: skip
    atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    final = tmp.parent / tmp.name.removeprefix(".").removesuffix(".tmp")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(tmp.parent.parent / LATEST, f"checkpoints/{final.name}\n")
    for old in sorted(p for p in tmp.parent.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_single(tmp: Path, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None) -> None:
    """The tensors of a one-process checkpoint: ``model.safetensors`` (and ``ema.safetensors``)."""
    save_tensors(tmp / MODEL_FILE, weights)
    if ema is not None:
        save_tensors(tmp / EMA_FILE, ema)


def save_sharded(
    directory: Path, tensors: dict[str, torch.Tensor], group: Any = None, background: bool = False
) -> Any:
    """Every rank writes its part of ``tensors`` (its DTensor shards; replicated tensors are shared out
    between ranks) into ``directory``, one safetensors file per rank; all ranks call it. With
    ``background`` the tensors are copied to host memory now and written in a thread (collectives on
    ``group``, a gloo group). Returns a ``ShardedSave``: ``result()`` waits for the write and gives, on
    rank 0, the files every rank wrote."""
    import torch.distributed.checkpoint as dcp

    class Writer(dcp.HuggingFaceStorageWriter):
        written: list[str] | None = None

        def finish(self, metadata: Any, results: list[list[Any]]) -> None:
            # rank 0 (DCP's coordinator) receives every rank's write results: the files to expect
            self.written = sorted({Path(w.storage_data.relative_path).name for rs in results for w in rs})
            return super().finish(metadata, results)

    writer = Writer(str(directory), save_distributed=True, fqn_to_index_mapping=file_groups(tensors))
    if background:
        return ShardedSave(dcp.async_save(tensors, storage_writer=writer, process_group=group), writer)
    dcp.save(tensors, storage_writer=writer)
    return ShardedSave(None, writer)


@dataclass
class ShardedSave:
    """A sharded save under way (``future``) or done (None)."""

    future: Any
    writer: Any

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def result(self) -> list[str] | None:
        """Wait for the write (its error raises here); the files every rank wrote, as DCP's coordinator
        recorded them (rank 0), else None."""
        if self.future is not None:
            self.future.result()
        return self.writer.written


def file_groups(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Which file of its rank each tensor goes to (1, 2, ...): one per part of the model and kind of
    state (``model.layers.3``, ``optim.tok_emb``, ...). DCP serialises a file in memory before writing
    it, so many small files keep a rank's memory during a save to a fraction of its shard."""
    groups: dict[str, int] = {}
    index = {}
    for name in tensors:
        kind, _, rest = name.partition(".")
        parts = rest.split(".")
        key = ".".join([kind, *parts[: 2 if parts[0] == "layers" else 1]])
        groups[name] = index.setdefault(key, len(index) + 1)
    return groups


def shard_files(ckpt: Path) -> list[str]:
    """The shard files a sharded checkpoint's meta.json lists, each checked to exist (a missing one is
    a ``ValueError`` that names it)."""
    meta, _ = read_meta(ckpt)
    files = meta.get("shard_files") or []
    missing = [f for f in files if not (ckpt / SHARDS_DIR / f).is_file()]
    if not files or missing:
        raise ValueError(
            f"{ckpt} is incomplete: its shard file {missing[0] if missing else '(list)'} is missing "
            f"({len(missing)} of {len(files)}); resume from another checkpoint in {ckpt.parent}"
        )
    return files


def load_sharded(ckpt: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` (whole tensors in one process, or this rank's DTensor shards) from a sharded
    checkpoint, whatever the number of processes that wrote it (DCP reshards); all ranks call it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    shard_files(ckpt)
    reader = dcp.HuggingFaceStorageReader(str(ckpt / SHARDS_DIR))
    dcp.load(targets, storage_reader=reader, no_dist=not dist.is_initialized())


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / SHARDS_DIR).is_dir()


def read_training_state(path: Path) -> TrainingState:
    """What a run checkpoint holds beyond the weights: step, counters, stream positions, random
    states and (one-process checkpoints) the optimizer's state."""
    meta, _ = read_meta(path)
    loader_states = json.loads((path / LOADER_FILE).read_text())
    counters = {k: meta.get(k, 0) for k in COUNTERS}
    if is_sharded(path):
        tensors = load_tensors(path / RNG_FILE)
        python = json.loads((path / RNG_JSON).read_text())
        rng = [{"python": py, **{k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == str(r)}}
               for r, py in enumerate(python)]  # fmt: skip
        return TrainingState(int(meta["step"]), loader_states, counters, rng)
    saved = torch.load(path / STATE_FILE, weights_only=True)
    return TrainingState(int(meta["step"]), loader_states, counters, saved.get("rng"), saved["optimizer"])


def data_streams(path: Path) -> int:
    """How many data streams (micro-batches per optimizer step, all processes together) the run of
    this checkpoint reads: fixed for the run's life, whatever the number of processes it resumes on."""
    meta, cfg = read_meta(path)
    if "data_streams" in meta:
        return int(meta["data_streams"])
    streams = len(json.loads((path / LOADER_FILE).read_text()))  # older checkpoints: one per process
    if cfg.train.grad_accum != 1:
        raise ValueError(
            f"{path} was written by an older version with train.grad_accum={cfg.train.grad_accum}, whose data "
            "position this version cannot continue exactly; resume it with the version that wrote it"
        )
    return streams
