"""Low-rank adapters (LoRA, Hu et al. 2021) on the trunk's linear layers, laid out as PEFT lays them.

``add_adapter(model, name, rank, alpha, targets, modality)`` turns every targeted ``nn.Linear`` of the
blocks into a ``LoRALinear``: the same weight and bias (same parameters, same state-dict names), plus
``lora_A.<name>`` (rank x in, random) and ``lora_B.<name>`` (out x rank, zero), so a fresh adapter
changes nothing, and ``y = W x + b + (alpha / rank) B A x``. The in-memory names are PEFT's less its
``base_layer`` level (``layers.0.attn.wq.lora_A.default.weight``); an adapter directory is PEFT's
format (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.layers.0.attn.wq.lora_A.weight``), so ``peft.PeftModel.from_pretrained`` loads it onto
a ``Transfusion`` (tested). The weights file's header also records the base it was trained on: the
checkpoint's path and step, and a hash of its weights (``weights_hash``); loading onto another base
is refused.

Several adapters can sit on one model. By default every adapter applies to every row; inside
``rows_using(model, names)`` row i of the next calls uses adapter ``names[i]`` (None: the base alone),
each adapter's rows gathered and run as one low-rank product (the serving engine's mixed batches).
``merge(model)`` folds the adapters into the weights and turns the layers back into plain
``nn.Linear`` (the fast decoding path, ``export --merge-adapter``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfusion.io import atomic_write_text, load_tensors, save_tensors
from transfusion.layers import Pair

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "gate", "up", "down")
"""The attention and MLP projections of every block."""
MODALITIES = ("both", "text", "image")
BASE_KEY = "transfusion_base"
"""Where an adapter records the base it was trained on: the safetensors header (PEFT reads the config
file, whose fields it checks, and ignores the header)."""


class LoRALinear(nn.Linear):
    """A linear layer with low-rank adapters beside its (usually frozen) weight."""

    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict

    @classmethod
    def wrap(cls, linear: nn.Linear) -> LoRALinear:
        """``linear`` as a ``LoRALinear`` holding the very same weight and bias parameters."""
        if isinstance(linear, cls):
            return linear
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.lora_A, new.lora_B = nn.ModuleDict(), nn.ModuleDict()
        new.scaling = {}
        new.groups = None
        return new

    def add(self, name: str, rank: int, alpha: float) -> None:
        w = self.weight
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # PEFT's initialisation
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = alpha / rank

    def delta(self, name: str) -> Tensor:
        """The adapter's change of the weight, (alpha / rank) B A, in fp32."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.groups is None:  # every adapter on every row (training: the one adapter)
            for name in self.lora_A:
                y = y + self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
            return y
        for name, rows in self.groups:  # each adapter on its rows only: one low-rank product per adapter
            part = self.lora_B[name](self.lora_A[name](x[rows])) * self.scaling[name]
            y = y.index_add(0, rows, part.to(y.dtype))
        return y


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for m in lora_layers(model).values():
        names += [n for n in m.lora_A if n not in names]
    return names


def target_linears(model: nn.Module, targets: tuple[str, ...] | list[str], modality: str) -> list[str]:
    """The module names of the block linears an adapter goes on: those whose own name (``wq``, ``up``...)
    is in ``targets``; under modality-specific weights (MoT) their text copies, image copies or both."""
    if modality not in MODALITIES:
        raise ValueError(f"lora modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    known = {
        n.split(".")[-1]
        for n, m in model.named_modules()
        if n.startswith("layers.") and isinstance(m, (nn.Linear, Pair))
    }
    unknown = sorted(set(targets) - known)
    if unknown:
        raise ValueError(
            f"lora targets {unknown} are not linear layers of the blocks; choose from {sorted(known - {'text', 'image'})}"
        )
    out = []
    for name, module in model.named_modules():
        if not name.startswith("layers.") or name.split(".")[-1] not in targets:
            continue
        if isinstance(module, Pair):
            out += [f"{name}.{side}" for side in ("text", "image") if modality in ("both", side)]
        elif isinstance(module, nn.Linear):
            out.append(name)
    if not out:
        raise ValueError(f"no linear layer matches lora targets {list(targets)} with modality {modality!r}")
    return out


def add_adapter(
    model: nn.Module,
    name: str = "default",
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    modality: str = "both",
    modules: list[str] | None = None,
) -> list[str]:
    """Add adapter ``name`` to the targeted linears (or exactly ``modules``); returns their names."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    modules = modules or target_linears(model, targets, modality)
    for path in modules:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear.wrap(getattr(parent, child))
        if name in layer.lora_A:
            raise ValueError(f"{path} already holds an adapter called {name!r}")
        layer.add(name, rank, float(rank if alpha is None else alpha))
        setattr(parent, child, layer)
    return modules


def freeze_all_but_adapters(model: nn.Module, also: tuple[str, ...] = ()) -> int:
    """Train only the adapters (and the modules named in ``also``, e.g. 'patcher'); returns how many
    parameters train."""
    trained = 0
    for name, p in model.named_parameters():
        keep = ".lora_A." in name or ".lora_B." in name or any(name.startswith(m + ".") for m in also)
        p.requires_grad_(keep)
        trained += p.numel() if keep else 0
    return trained


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@contextlib.contextmanager
def rows_using(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Inside, row i of every call uses adapter ``names[i]`` (None: the base weights alone). The row
    numbers of each adapter are made here, once, on the host."""
    layers = list(lora_layers(model).values())
    device = next(model.parameters()).device
    wanted = [n for n in dict.fromkeys(names) if n is not None]
    missing = [n for n in wanted if not any(n in m.lora_A for m in layers)]
    if missing:
        raise KeyError(
            f"no adapter called {missing[0]!r} is loaded (loaded: {adapter_names(model) or 'none'})"
        )
    groups = [(n, torch.tensor([i for i, m in enumerate(names) if m == n], device=device)) for n in wanted]
    saved = [m.groups for m in layers]
    for m in layers:
        m.groups = [(n, rows) for n, rows in groups if n in m.lora_A]
    try:
        yield
    finally:
        for m, g in zip(layers, saved):
            m.groups = g


@torch.no_grad()
def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Fold adapters (default: all) into the weights; layers left without adapters become ``nn.Linear``."""
    for path, layer in lora_layers(model).items():
        for name in list(names or layer.lora_A):
            if name in layer.lora_A:
                layer.weight.add_(layer.delta(name).to(layer.weight.dtype))
                del layer.lora_A[name], layer.lora_B[name]
                layer.scaling.pop(name)
        if not len(layer.lora_A):
            plain = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(plain)
            plain.in_features, plain.out_features = layer.in_features, layer.out_features
            plain.weight, plain.bias = layer.weight, layer.bias
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plain)
    return model


# --- the base's identity ------------------------------------------------------------------------------
def weights_hash(state: dict[str, Tensor]) -> str:
    """A digest of the base weights (names, shapes and fp32 values; adapters left out)."""
    h = hashlib.sha256()
    for k in sorted(state):
        if is_adapter_key(k):
            continue
        v = state[k].detach().float().cpu().contiguous()
        h.update(k.encode() + str(tuple(v.shape)).encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:32]


def base_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}


# --- adapter directories (PEFT's format) ------------------------------------------------------------
def adapter_tensors(state: dict[str, Tensor], name: str = "default") -> dict[str, Tensor]:
    """An adapter's tensors, keyed as PEFT saves them, from a model state (or an EMA of one)."""
    out = {}
    for k, v in state.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.{name}."
            if tag in k:
                out[PEFT_PREFIX + k.replace(tag, f".{part}.")] = v.detach().cpu().contiguous()
    return out


def save_adapter(
    directory: str | Path,
    state: dict[str, Tensor],
    *,
    rank: int,
    alpha: float,
    modules: list[str],
    base: dict[str, Any],
    name: str = "default",
    extra: dict[str, Tensor] | None = None,
) -> Path:
    """Write an adapter directory: ``adapter_model.safetensors`` (the adapter's tensors from ``state``,
    PEFT's keys, and ``extra`` full weights such as the patcher's, under PEFT's ``modules_to_save``
    naming) and ``adapter_config.json`` (PEFT's fields); the base's identity goes in the weights' header."""
    directory = Path(directory)
    tensors = adapter_tensors(state, name)
    if not tensors:
        raise ValueError(f"the state holds no adapter called {name!r}")
    saved_modules = sorted({k.split(".")[0] for k in (extra or {})})
    tensors |= {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(
        directory / WEIGHTS_FILE, tensors, {"format": "pt", BASE_KEY: json.dumps(base, sort_keys=True)}
    )
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": sorted(modules),
        "modules_to_save": saved_modules or None,
        "base_model_name_or_path": str(base.get("path", "")),
        "inference_mode": True,
    }
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not an adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
    from safetensors import safe_open

    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory / CONFIG_FILE}: peft_type {config.get('peft_type')!r}, not LORA")
    tensors = load_tensors(directory / WEIGHTS_FILE)
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        header = f.metadata() or {}
    config[BASE_KEY] = json.loads(header[BASE_KEY]) if BASE_KEY in header else {}
    return config, tensors


def check_base(config: dict[str, Any], model: nn.Module, where: str) -> None:
    """Refuse an adapter trained on other weights than ``model``'s (by ``weights_hash``)."""
    want = (config.get(BASE_KEY) or {}).get("weights_hash")
    if want is None:
        return
    have = weights_hash(base_state(model))
    if have != want:
        base = config[BASE_KEY]
        raise ValueError(
            f"adapter {where} was trained on {base.get('path')} (step {base.get('step')}, weights {want}); "
            f"this model's weights are {have}: load it onto that checkpoint"
        )


def load_adapter(
    model: nn.Module, directory: str | Path, name: str = "default", check: bool = True
) -> list[str]:
    """Add the adapter in ``directory`` to ``model`` as ``name`` (after checking its base); returns the
    modules it adapts. Full weights it carries (``modules_to_save``, e.g. the patcher) replace the model's."""
    config, tensors = read_adapter(directory)
    if check:
        check_base(config, model, str(directory))
    modules = list(config["target_modules"])
    add_adapter(model, name, int(config["r"]), float(config["lora_alpha"]), modules=modules)
    state = {}
    for k, v in tensors.items():
        k = k.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            k = k.replace(f".{part}.weight", f".{part}.{name}.weight")
        state[k] = v
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"adapter {directory} does not fit this model: {unknown[:3]} are not its tensors")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return modules
