"""What a training run holds on each GPU, worked out before it starts (``transfusion plan``).

Parameter counts come from the model built on the ``meta`` device (shapes, no storage), so a 7B plan
takes seconds on a laptop. Every byte is counted as the training step of this package holds it
(``training.parallelize``, ``training.step``, ``training.loop``):

- **weights** fp32 (the master copy; nothing converts the model), **gradients** fp32, **AdamW** two
  fp32 moments and a step per tensor, **EMA** an fp32 copy of the state dict when
  ``train.ema_decay > 0``. FSDP2 shards all four on dim 0 (``ceil(rows / GPUs)`` rows of each tensor);
  DDP keeps them whole and adds its gradient buckets (a second fp32 copy of every gradient).
- **activations**: the tensors autograd saves for the backward pass, per transformer block and
  position (counted with ``saved_tensors_hooks`` on the real block; ``tests/test_plan.py`` holds the
  count to this formula byte for byte). With r the residual stream's bytes and c the matmuls':

      block = 2 (4 + r) D + 8          two RMSNorms: an fp32 copy of the input, the normalised input, 1/rms
            + c (a + 2) D + 2 c KV     q/k/v inputs (a = 3 casts under autocast, else 1 shared), q, and o,
                                       which is also o's input (RoPE keeps q in the (B, L, H, Dh) order of
                                       its projection, SDPA writes o in q's order, so wo reads o without a
                                       copy); k and v after RoPE (SDPA repeats grouped heads to D)
            + 4 H [+ c L with SDPA]    attention's logsumexp [SDPA: the boolean mask made additive, per layer]
            + c m D + 4 c F            gate/up inputs (m = 2 casts under autocast, else 1), gate, silu, up, down input

  fp32: r = c = 4. bf16 autocast over fp32 weights (one process, DDP): r = 4, c = 2 (fp32 embeddings
  plus bf16 block outputs keep the residual stream fp32). FSDP2 with bf16 gathering: r = c = 2. A
  checkpointed block keeps only its input (r D); the backward of a checkpointed block holds it
  recomputed in full. Outside the blocks: the batch's index tensors, RoPE tables, the dense mask
  (SDPA), the final norm, the LM head's input, the fp32 log-softmax (4 V), the patcher's saved
  tensors (run on ``meta`` under the same hooks), and per image its fp32 prediction and error.
- **transient**: at the start of the backward, cross-entropy's gradients (two fp32 V-vectors per
  position); in a block's backward, its gradient working set (r D + 3 c F, the SwiGLU's); whichever
  moment is larger sets the peak, with the blocks' saved tensors as they stand at that moment.
  Under autocast without FSDP2, the bf16 copies of every matmul weight (autocast's cache lives until
  the backward ends); under FSDP2, the root (embedding, head, patcher, norm: not resharded after the
  forward) and two blocks gathered, the root's unsharded gradient and one block's reduction buffers.

The total is the sum of the parts: it counts every gradient as held at the activation peak, which is
exact from the second micro-batch of an accumulation and an upper bound by at most the gradients
otherwise (after ``zero_grad(set_to_none=True)`` the first backward starts without them). The plan
counts eager execution; ``torch.compile`` (on by default on CUDA) saves fewer elementwise results.
``benchmarks/plan_check.py`` compares the total with the measured peak of a real training step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfusion.config import Config, ModelConfig, checkpointed_every
from transfusion.model import Transfusion

GIB = 2**30
DEFAULT_RESERVE_GIB = 2.0
"""Kept free of the plan: the CUDA context, NCCL's buffers and the caching allocator's fragmentation."""
INPUT_BYTES = 5 * 8 + 1
"""Per position, the batch's int64 ids, positions, sample ids, image numbers and targets, and the
boolean patch mask the embedding's scatter saves."""
PARTS = ("parameters", "gradients", "optimizer", "ema", "activations", "transient")


@dataclass(frozen=True)
class Precision:
    """How the training step holds tensors, in bytes per element."""

    name: str
    residual: int
    """The residual stream between blocks (r)."""
    compute: int
    """What matmuls read and write (c)."""
    gathered: int
    """A weight as FSDP2 gathers it (its ``param_dtype``)."""


def precision(dtype: str, mode: str) -> Precision:
    """``train.dtype`` ('auto' is bf16: the plan is for GPUs) under 'single', 'ddp' or 'fsdp'."""
    if dtype == "fp32":
        return Precision("fp32", 4, 4, 4)
    if mode == "fsdp":
        return Precision("bf16 (FSDP2 gathers bf16 weights: bf16 residual stream)", 2, 2, 2)
    return Precision("bf16 autocast over fp32 weights (fp32 residual stream)", 4, 2, 4)


# --- what the model holds: counted on the meta device ------------------------------------------------
@functools.lru_cache(maxsize=32)
def _model_stats(key: str) -> dict[str, Any]:
    cfg = ModelConfig(**json.loads(key))
    with torch.device("meta"):
        model = Transfusion(cfg)
    params = dict(model.named_parameters())  # tied weights once
    casts = {id(p): p.numel() for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) for p in m.parameters()}  # fmt: skip
    block = sum(p.numel() for p in model.layers[0].parameters())
    return {
        "params": sum(p.numel() for p in params.values()),
        "shapes": [tuple(p.shape) for p in params.values()],
        "ema_shapes": [tuple(t.shape) for t in model.state_dict().values()],  # the loop clones each entry
        "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
        "autocast_cast": sum(casts.values()),
        "block": block,
        "root": sum(p.numel() for p in params.values()) - cfg.n_layers * block,
        "patcher_saved": _patcher_saved_bytes(model),
    }


def model_stats(cfg: ModelConfig) -> dict[str, Any]:
    """Counts of ``cfg`` built on the meta device: parameters, their shapes (and the EMA's state
    dict's), buffer bytes, the numbers in autocast's matmul weights, one block and the root
    (everything outside the blocks), and the patcher's saved bytes per image."""
    return _model_stats(json.dumps(dataclasses.asdict(cfg), sort_keys=True))


def shard_numel(shapes: list[tuple[int, ...]], gpus: int) -> int:
    """Numbers one GPU holds of these tensors under FSDP2: each is split on dim 0, padded to
    ``ceil(rows / gpus)`` rows (one GPU: all of them)."""
    return sum(math.ceil(s[0] / gpus) * math.prod(s[1:]) if s else 1 for s in shapes)


def _patcher_saved_bytes(model: Transfusion) -> int:
    """Bytes the patcher saves for the backward pass per image (encode, then decode of its outputs),
    counted in fp32 on the meta device under ``saved_tensors_hooks``, parameters excluded."""
    if model.patcher is None:
        return 0
    cfg = model.cfg
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = torch.empty(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        _, ctx = model.patcher.encode(x, torch.zeros(1, dtype=torch.long))
        h = torch.empty(1, cfg.patches_per_image, cfg.dim, requires_grad=True)  # the trunk's outputs
        model.patcher.decode(h, ctx)
    return sum(n for k, n in saved.items() if k not in params)


# --- activations, per position -----------------------------------------------------------------------
def block_coefficients(cfg: ModelConfig, prec: Precision, attention: str) -> dict[str, int]:
    """Bytes a block saves per position, as coefficients of D, KV (k/v width), F (SwiGLU width),
    H (heads) and L (row length; SDPA's per-layer mask), plus a constant (the two 1/rms)."""
    r, c = prec.residual, prec.compute
    a, m = (3, 2) if r != c else (1, 1)  # autocast casts the fp32 norm output once per projection
    kv_repeated = attention == "sdpa" and cfg.kv_heads != cfg.n_heads  # SDPA sees repeated k, v
    return {
        "D": 2 * (4 + r) + c * (a + 2) + c * m + (2 * c if kv_repeated else 0),
        "KV": 0 if kv_repeated else 2 * c,
        "F": 4 * c,
        "H": 4,
        "L": c if attention == "sdpa" else 0,
        "1": 8,
    }


def block_bytes(cfg: ModelConfig, prec: Precision, attention: str, seq_len: int) -> int:
    """Bytes one block saves for the backward pass, per position of a row of ``seq_len``."""
    k = block_coefficients(cfg, prec, attention)
    sizes = {"D": cfg.dim, "KV": cfg.kv_heads * cfg.head_dim, "F": cfg.ffn_dim, "H": cfg.n_heads,
             "L": seq_len, "1": 1}  # fmt: skip
    return sum(k[n] * sizes[n] for n in k)


def outside_bytes(
    cfg: ModelConfig, prec: Precision, attention: str, seq_len: int, checkpointing: bool
) -> tuple[float, int]:
    """Per position, what is saved outside the blocks: (held through the whole backward, freed once
    the LM head's backward has run). The dense mask outlives the forward only in the arguments a
    checkpointed block keeps for its recomputation. The patcher's share assumes rows full of images
    (each takes its patches plus BOI and EOI): the most a row can hold."""
    r, c = prec.residual, prec.compute
    images_per_position = 1 / (cfg.patches_per_image + 2)
    per_image = (
        model_stats(cfg)["patcher_saved"] * c / 4  # counted in fp32: scaled to c
        + 16 * cfg.patches_per_image  # the int64 indices of the patch positions (h[patch_mask])
        + 2 * 4 * cfg.latent_channels * cfg.latent_size**2  # the fp32 prediction and its error
    ) if not cfg.discrete else 0  # fmt: skip
    held = (
        INPUT_BYTES
        + 4 * cfg.head_dim  # RoPE cos and sin, fp32 (B, 1, L, Dh/2) each, shared by the blocks
        + (seq_len if attention == "sdpa" and checkpointing else 0)  # the boolean (B, 1, L, L) mask
        + per_image * images_per_position
    )
    head = (4 + r) * cfg.dim + 4 + c * cfg.dim + 4 * cfg.total_vocab  # final norm, head input, log-softmax
    return held, head


def working_bytes(cfg: ModelConfig, prec: Precision) -> int:
    """Per position, a block's backward working set: the residual gradient (plus its bf16 cast
    under autocast) and the SwiGLU's three F-wide gradients, alive together in ``mul``'s backward."""
    r, c = prec.residual, prec.compute
    return r * cfg.dim + (c * cfg.dim if r != c else 0) + 3 * c * cfg.ffn_dim


def cross_entropy_bytes(cfg: ModelConfig) -> int:
    """Per position, cross-entropy's backward: the gradients of the log-softmax output and of the
    logits, fp32 (the logits are upcast), besides the saved log-softmax itself."""
    return 2 * 4 * cfg.total_vocab


def activation_peak(cfg: Config, prec: Precision, attention: str) -> dict[str, Any]:
    """Per row: the saved activations and the transient buffers at the larger of the moments that can
    set the peak (the backward's start, where cross-entropy runs; each block's backward, with the
    blocks below it still saved and a checkpointed block recomputed)."""
    m, L = cfg.model, cfg.train.seq_len
    every = checkpointed_every(cfg.train.activation_checkpointing)
    chosen = [every > 0 and i % every == 0 for i in range(m.n_layers)]
    A = block_bytes(m, prec, attention, L)
    kept = prec.residual * m.dim  # a checkpointed block's input
    recompute = A - (kept if prec.residual == 4 else 0)  # in fp32 the norm saves that same input
    held, head = outside_bytes(m, prec, attention, L, any(chosen))
    saved = [kept if c else A for c in chosen]
    moments = [("backward start (cross-entropy)", sum(saved) + held + head, cross_entropy_bytes(m))]
    used = prec.compute * m.ffn_dim  # the down projection's input, released before the working peak
    for j in reversed(range(m.n_layers)):
        acts = sum(saved[:j]) + (kept + recompute if chosen[j] else A) - used + held
        moments.append((f"backward of block {j}", acts, working_bytes(m, prec)))
    where, acts, transient = max(moments, key=lambda t: t[1] + t[2])
    return {"moment": where, "activations": acts * L, "transient": transient * L,
            "checkpointed": sum(chosen), "block_bytes": A}  # fmt: skip


# --- the plan ----------------------------------------------------------------------------------------
def resolve(cfg: Config, gpus: int) -> tuple[str, str, str]:
    """(mode, dtype, attention) the run would use on ``gpus`` GPUs: one process runs unwrapped;
    'auto' dtype is bf16 and 'auto' attention FlexAttention, as on CUDA."""
    mode = "single" if gpus == 1 else cfg.train.parallel
    dtype = "bf16" if cfg.train.dtype == "auto" else cfg.train.dtype
    attention = "flex" if cfg.model.attention == "auto" else cfg.model.attention
    return mode, dtype, attention


def check_request(cfg: Config, gpus: int, gpu_memory: float | None, reserve: float) -> None:
    """User errors, each saying what to change."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus must be a whole number >= 1, got {gpus}")
    if gpu_memory is not None and not gpu_memory > 0:
        raise ValueError(f"--gpu-memory must be > 0 GiB (e.g. 80 for an H100), got {gpu_memory}")
    if not reserve >= 0 or (gpu_memory is not None and reserve >= gpu_memory):
        raise ValueError(f"--reserve must be >= 0 GiB and below --gpu-memory, got {reserve}")
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"--seq-len {cfg.train.seq_len} is above model.max_seq_len {cfg.model.max_seq_len} (the RoPE "
            f"table); lower --seq-len or --set model.max_seq_len={cfg.train.seq_len}"
        )


def static_bytes(cfg: Config, gpus: int, mode: str, prec: Precision, ema: bool) -> dict[str, float]:
    """Per GPU, what does not grow with the micro-batch: weights (and buffers), gradients (with DDP's
    buckets), AdamW's moments and steps, the EMA, and the buffers of mixed precision or FSDP2."""
    s = model_stats(cfg.model)
    shards = gpus if mode == "fsdp" else 1
    local, whole = shard_numel(s["shapes"], shards), s["params"]
    extra = 0.0
    if mode == "fsdp":
        # the root stays gathered and keeps its unsharded gradient (the head's, computed first,
        # reduced last); two blocks gathered (this one and the prefetched next); one block's
        # unsharded gradient and its fp32 reduce-scatter input
        extra = prec.gathered * (2 * s["root"] + 2 * s["block"]) + (prec.gathered + 4) * s["block"]
    elif prec.compute != 4:
        extra = prec.compute * s["autocast_cast"]  # autocast's bf16 weight copies
    return {
        "parameters": 4 * local + s["buffers"],
        "gradients": 4 * local + (4 * whole if mode == "ddp" else 0),
        "optimizer": 8 * local + 4 * len(s["shapes"]),
        "ema": 4 * shard_numel(s["ema_shapes"], shards) if ema else 0,
        "transient": extra,
    }


def memory_plan(
    cfg: Config, gpus: int = 1, gpu_memory: float | None = None, ema: bool | None = None,
    reserve: float = DEFAULT_RESERVE_GIB,
) -> dict[str, Any]:  # fmt: skip
    """Per-GPU bytes of a training step of ``cfg`` (its ``train.seq_len``, ``train.batch_size`` rows,
    ``train.activation_checkpointing``, ``train.dtype``, ``train.parallel``, ``model.attention``) on
    ``gpus`` GPUs of ``gpu_memory`` GiB, and the largest micro-batch that fits there after ``reserve``
    GiB. ``ema`` None follows ``train.ema_decay > 0``."""
    check_request(cfg, gpus, gpu_memory, reserve)
    mode, dtype, attention = resolve(cfg, gpus)
    prec = precision(dtype, mode)
    ema = cfg.train.ema_decay > 0 if ema is None else ema
    static = static_bytes(cfg, gpus, mode, prec, ema)
    peak = activation_peak(cfg, prec, attention)
    rows = cfg.train.batch_size
    per_row = peak["activations"] + peak["transient"]
    parts = {**static, "activations": rows * peak["activations"]}
    parts["transient"] = static["transient"] + rows * peak["transient"]
    total = sum(parts.values())
    fixed = total - rows * per_row
    usable = None if gpu_memory is None else (gpu_memory - reserve) * GIB
    stats = model_stats(cfg.model)
    return {
        "preset_params": stats["params"],
        "gpus": gpus, "mode": mode, "dtype": dtype, "precision": prec.name, "attention": attention,
        "seq_len": cfg.train.seq_len, "micro_batch": rows, "ema": ema,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "checkpointed_blocks": peak["checkpointed"], "n_layers": cfg.model.n_layers,
        "peak_moment": peak["moment"],
        "bytes": {**parts, "total": total, "per_row": per_row},
        "gib": {**{k: v / GIB for k, v in parts.items()}, "total": total / GIB, "per_row": per_row / GIB},
        "gpu_memory_gib": gpu_memory, "reserve_gib": reserve,
        "fits": None if usable is None else total <= usable,
        "max_micro_batch": None if usable is None else max(0, int((usable - fixed) // per_row)),
        "activation_model": activation_model(cfg.model, prec, attention, cfg.train.seq_len),
    }  # fmt: skip


def activation_model(cfg: ModelConfig, prec: Precision, attention: str, seq_len: int) -> str:
    """The per-block formula with this model's coefficients and sizes, in one line."""
    k = block_coefficients(cfg, prec, attention)
    terms = " + ".join(f"{v}·{n}" if n != "1" else str(v) for n, v in k.items() if v)
    sizes = f"D={cfg.dim}, KV={cfg.kv_heads * cfg.head_dim}, F={cfg.ffn_dim}, H={cfg.n_heads}"
    sizes += f", L={seq_len}" if k["L"] else ""
    total = block_bytes(cfg, prec, attention, seq_len)
    return f"{terms} bytes per block and position ({sizes}): {total / 1024:.1f} KiB"


LABELS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer": "optimizer (AdamW)",
    "ema": "EMA",
    "activations": "activations",
    "transient": "transient buffers",
}


def part_notes(plan: dict[str, Any]) -> dict[str, str]:
    """What each line of the table holds, for this plan."""
    mode, g = plan["mode"], plan["gpus"]
    share = {"fsdp": f"fp32, sharded over {g} GPUs", "ddp": "fp32, whole on each GPU"}.get(
        mode, "fp32, whole"
    )
    transient = "cross-entropy's fp32 gradients" if plan["peak_moment"].startswith("backward start") else (
        "one block's backward working set")  # fmt: skip
    if mode == "fsdp":
        transient += "; FSDP2's gathered root and 2 blocks, root gradient, 1 block's reduction"
    elif plan["dtype"] == "bf16":
        transient += "; autocast's bf16 weight copies"
    ckpt = plan["activation_checkpointing"]
    return {
        "parameters": f"{share} (+ RoPE tables)",
        "gradients": share + (" + DDP's fp32 buckets" if mode == "ddp" else ""),
        "optimizer": "two fp32 moments" + share.removeprefix("fp32"),
        "ema": share if plan["ema"] else "off (--ema counts an fp32 copy of the weights)",
        "activations": f"{plan['micro_batch']} x {plan['seq_len']} positions, checkpointing {ckpt} "
        f"({plan['checkpointed_blocks']} of {plan['n_layers']} blocks recomputed), at the {plan['peak_moment']}",
        "transient": transient,
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a table for the terminal: one line per part, the total, what fits."""
    mode = {"single": "one process (no wrapper)", "ddp": "DDP", "fsdp": "FSDP2"}[plan["mode"]]
    lines = [
        f"{plan['preset_params'] / 1e9:.3g}B parameters ({plan['preset_params']:,}) on {plan['gpus']} GPU(s), "
        f"{mode}, {plan['precision']}, {plan['attention']} attention",
        "",
        f"{'per GPU':<20} {'GiB':>9}",
    ]
    notes = part_notes(plan)
    for part in PARTS:
        lines.append(f"  {LABELS[part]:<18} {plan['gib'][part]:>9.2f}   {notes[part]}")
    lines.append(f"  {'total':<18} {plan['gib']['total']:>9.2f}   the sum (every gradient counted as held)")
    lines.append(
        f"  {'per row':<18} {plan['gib']['per_row']:>9.3f}   activations + transient of one more row"
    )
    if plan["gpu_memory_gib"] is not None:
        usable = plan["gpu_memory_gib"] - plan["reserve_gib"]
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines += [
            "",
            f"{verdict} in {plan['gpu_memory_gib']:g} GiB ({usable:g} usable: {plan['reserve_gib']:g} GiB kept for the "
            "CUDA context, NCCL and fragmentation)",
            f"largest micro-batch that fits: {plan['max_micro_batch']} row(s) of {plan['seq_len']}"
            + (" (not even one: shard with --parallel fsdp, checkpoint activations, or add GPUs)"
               if plan["max_micro_batch"] == 0 else ""),
        ]  # fmt: skip
    lines += ["", f"activation model: {plan['activation_model']}", ACTIVATION_NOTE]
    return "\n".join(lines)


ACTIVATION_NOTE = (
    "  (what autograd saves in eager mode: norms, attention's q/k/v/output/logsumexp, SwiGLU; a\n"
    "  checkpointed block keeps its input and one block is recomputed at a time; torch.compile saves less)"
)
