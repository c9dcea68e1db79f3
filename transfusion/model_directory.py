"""A self-describing model directory, the layout model hubs expect: what ``Pipeline.save_pretrained``
and ``transfusion export`` write, and what ``Pipeline.from_pretrained`` (and every ``--checkpoint``
option) reads::

    config.json                    {"format": "transfusion-model", "config": Config, "tokenizer": {...},
                                    "vae": "vae", "step", "tokens_seen", "flops_seen", "parameters", ...}
    model.safetensors              the weights (the EMA's when the run kept one); above ``max_shard_bytes``
                                   model-00001-of-0000N.safetensors ... and model.safetensors.index.json
                                   ({"metadata": {"total_size"}, "weight_map": {name: file}}, as transformers)
    tokenizer.json                 the tokenizer file, for a model with one; tokenizer_config.json
                                   names the byte tokenizer otherwise
    vae/                           the image autoencoder (its own vae.json + vae.safetensors, or a
                                   diffusers AutoencoderKL directory), as ``autoencoders.load_vae`` reads it
    README.md                      the model card: what it is, how it was trained, its evaluation, how to load it

Nothing in it is a pickle: loading it cannot run code. It is written under a temporary name beside
``out`` and renamed into place, so an interrupted export leaves no half directory.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from transfusion.config import Config, DataConfig, DiffusionConfig, ModelConfig
from transfusion.io import atomic_write_text, load_tensors, save_tensors

FORMAT = "transfusion-model"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
VAE_DIR = "vae"
CARD_FILE = "README.md"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
"""Weights above this go into several files (transformers' default shard size is 5 GB; 2 GB keeps each
file under the 2 GiB that some upload tools and file systems still limit)."""


def is_model_directory(path: str | Path) -> bool:
    path = Path(path) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def write_model_directory(
    out: str | Path,
    weights: dict[str, torch.Tensor],
    config: Config,
    tokenizer: Any,
    vae_dir: Path | None,
    facts: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the directory (see the module's docstring) at ``out``, which must not hold anything yet.
    ``facts``: the run's counters and anything else the card states (step, tokens_seen, flops_seen);
    ``metrics``: its evaluation (metrics.json), or None."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; export into a new directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = _write_weights(tmp, weights, max_shard_bytes)
        described = _write_tokenizer(tmp, tokenizer)
        if vae_dir is not None:
            shutil.copytree(vae_dir, tmp / VAE_DIR)
        params = sum(v.numel() for v in weights.values())
        meta = {"format": FORMAT, "config": config.to_dict(), "tokenizer": described,
                "vae": VAE_DIR if vae_dir is not None else None, "parameters": params,
                "weight_files": files, **facts, **({"metrics": metrics} if metrics else {})}  # fmt: skip
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True))
        atomic_write_text(tmp / CARD_FILE, model_card(config, meta, out.name))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(directory: Path, weights: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """One file, or consecutive shards of at most ``max_shard_bytes`` (a tensor larger than that gets a
    shard of its own) with the index transformers reads; returns the file names."""
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    total = sum(v.numel() * v.element_size() for v in weights.values())
    if total <= max_shard_bytes:
        save_tensors(directory / WEIGHTS_FILE, weights)
        return [WEIGHTS_FILE]
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in weights.items():
        nbytes = v.numel() * v.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        save_tensors(directory / name, group)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: n for n, g in zip(names, groups) for k in g},
    }
    atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
    return names


def _write_tokenizer(directory: Path, tokenizer: Any) -> dict[str, Any]:
    described = tokenizer.to_dict()
    if described.get("kind") == "hf":
        shutil.copyfile(described["path"], directory / TOKENIZER_FILE)
        return {**described, "path": TOKENIZER_FILE}
    atomic_write_text(directory / TOKENIZER_CONFIG, json.dumps(described, indent=2))
    return described


def read_model_directory(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Config, dict[str, torch.Tensor]]:
    """(config.json as a dict, the Config, the weights by name) of a model directory; a missing weight
    file is an error that names it."""
    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    config = Config.from_dict(meta["config"])
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        files = [WEIGHTS_FILE]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"{path} is incomplete: {missing[0]} is missing ({len(missing)} of {len(files)} weight files)"
        )
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights |= load_tensors(path / f, device)
    return meta, config, weights


# --- the model card ---------------------------------------------------------------------------------
PAPER_CHOICES = ("model", ModelConfig, ("patcher", "patch_size", "image_attention", "image_tokens",
                                        "modality_weights", "image_pos_embed")), \
                ("diffusion", DiffusionConfig, ("schedule", "objective", "noise_limit", "timestep_shift",
                                                "loss_weight", "sampler", "sample_steps", "cfg_scale",
                                                "guidance_max_t")), \
                ("data", DataConfig, ("canonical_relations", "pairs_in_reading_order", "describe_in_reading_order",
                                      "descriptive_captions", "position_share"))  # fmt: skip
"""The settings whose defaults are the paper's recipe (``shared/PAPER.md``): a model that differs in one
says so in its card."""


def departures(config: Config) -> list[str]:
    """'section.key = value (the paper: default)' for each recipe setting this model changed."""
    out = []
    for section, cls, keys in PAPER_CHOICES:
        defaults, mine = asdict(cls()), asdict(getattr(config, section))
        names = {f.name for f in fields(cls)}
        for key in keys:
            if key in names and mine[key] != defaults[key]:
                out.append(
                    f"`{section}.{key} = {json.dumps(mine[key])}` (the paper's recipe: {json.dumps(defaults[key])})"
                )
    return out


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def model_card(config: Config, meta: dict[str, Any], name: str) -> str:
    """The README.md of a model directory, from its configuration and the facts of its run."""
    m, d, t, data = config.model, config.diffusion, config.train, config.data
    params = meta.get("parameters", 0)
    lines = [
        "---",
        "library_name: transfusion",
        "tags: [transfusion, text-to-image, image-to-text, multimodal, diffusion]",
        "---",
        "",
        f"# {name}",
        "",
        "A Transfusion model (Zhou et al., 2024): one transformer that predicts the next text token and "
        "denoises images in a continuous latent space, reading and writing any mixture of text and images. "
        f"{_human(params)} parameters: {m.n_layers} layers of width {m.dim}, {m.n_heads} heads, a "
        f"{m.patcher} patcher of {m.patch_size}x{m.patch_size} latent patches ({m.latent_channels}x{m.latent_size}x"
        f"{m.latent_size} latents, {m.patches_per_image} patches an image), {m.image_attention} attention inside "
        f"an image, {'a BPE tokenizer' if (meta.get('tokenizer') or {}).get('kind') == 'hf' else 'the byte tokenizer'} "
        f"({m.vocab_size} tokens).",
        "",
        "## How it was trained",
        "",
        f"- data: `{data.source}`"
        + (f" ({data.path})" if data.path and not Path(str(data.path)).is_absolute() else "")
        + f", {data.image_size}x{data.image_size} images",
        f"- {meta.get('step', '?')} steps of {t.batch_size} rows x {t.seq_len} positions"
        + (f" x {t.grad_accum} micro-batches" if t.grad_accum > 1 else "")
        + (f"; {_human(meta['tokens_seen'])} positions seen" if meta.get("tokens_seen") else "")
        + (f", {_human(meta['flops_seen'])}FLOPs" if meta.get("flops_seen") else ""),
        f"- objective: next-token cross-entropy + {d.loss_weight} x diffusion loss ({d.objective}, {d.schedule} "
        f"schedule, {d.num_train_timesteps} steps); AdamW lr {t.lr}, betas ({t.beta1}, {t.beta2}), weight decay "
        f"{t.weight_decay}",
        f"- sampling by default: {d.sampler}, {d.sample_steps} steps, guidance {d.cfg_scale}"
        + (f" at t <= {d.guidance_max_t}" if d.guidance_max_t is not None else " at every step"),
    ]
    changed = departures(config)
    lines += [
        "",
        "Departures from the paper's recipe:"
        if changed
        else "It follows the paper's recipe in every setting its card tracks.",
        "",
    ]
    lines += [f"- {c}" for c in changed]
    metrics = meta.get("metrics") or {}
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines += ["Measured by `transfusion eval` on held-out prompts and images (the run's metrics.json):", "",
                  "| metric | value |", "| --- | --- |"]  # fmt: skip
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    else:
        lines.append(
            "Not evaluated (no metrics.json beside the checkpoint it came from): `transfusion eval --checkpoint DIR`."
        )
    lines += ["", "## Use", "", "```python", "from transfusion import Pipeline", "",
              f'pipe = Pipeline.from_pretrained("{name}")', 'pipe.text_to_image("a red circle")[0].save("red_circle.png")', "```", "",
              f"or `transfusion generate --checkpoint {name} --prompt \"a red circle\"`; `transfusion serve --checkpoint {name}` "
              "serves it over HTTP.", ""]  # fmt: skip
    return "\n".join(lines)
