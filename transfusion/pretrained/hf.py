"""Start from a pretrained language model: a local Hugging Face Llama or Qwen2 directory.

``load_pretrained(dir)`` reads ``config.json``, the ``*.safetensors`` weights (one file, or shards
named by ``model.safetensors.index.json``) and ``tokenizer.json``, and returns a ``Transfusion``
whose trunk, text embedding and LM head are the LLM's, whose image side (the patcher) has the
model's own fresh initialisation, and whose vocabulary is the tokenizer's plus BOI/EOI. Nothing is
downloaded and nothing is unpickled: safetensors only. ``transformers`` is not needed to load; the
parity tests use it as the reference.

Weight names, Hugging Face -> ours (``i`` the layer)::

    model.embed_tokens.weight                       tok_emb.weight        (rows extended, see below)
    model.layers.i.input_layernorm.weight           layers.i.attn_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.*       layers.i.attn.w{q,k,v,o}.*   (q/k/v bias: Qwen2)
    model.layers.i.post_attention_layernorm.weight  layers.i.mlp_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight   layers.i.mlp.{gate,up,down}.weight
    model.norm.weight                               norm.weight
    lm_head.weight                                  lm_head.weight        (absent when tied)

Both use RoPE in the half-split ("rotate_half") layout, so q/k weights load without permutation.

**The vocabulary.** ``HFTokenizer`` appends BOI and EOI (and BOS/EOS/PAD when the file has none)
after the file's vocabulary. Their embedding rows, and their LM head rows, start at the mean of the
existing rows (Hewitt, "Initializing new word embeddings for pretrained language models", 2021):
a mean row lies where the trunk expects a token embedding (random rows at ``init_std`` do not:
pretrained rows have another scale), and through the LM head its logit is the mean of the existing
logits, so by Jensen's inequality each new token takes at most 1/V of the probability mass: the
LLM's text distribution is barely changed before any training. Some checkpoints (Qwen2) pad the
embedding matrix beyond the tokenizer; then the new ids fall on padding rows, which are
re-initialised the same way, and the model keeps the checkpoint's row count.

**Training choices.** ``freeze_text`` freezes the text weights (embedding, LM head, trunk, final
norm) and trains the image side, selected trunk layers, and optionally only the new rows of the
embedding and LM head (an LMFusion-style start, Shi et al. 2024, without its separate image
copies of the trunk). ``freeze_text`` (``pretrained.freeze``) and ``export_hf`` (``pretrained.export``) live beside this.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transfusion.config import ModelConfig
from transfusion.io import load_tensors
from transfusion.model import Transfusion
from transfusion.tokenizer import HFTokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""Supported ``model_type`` -> the ``architectures`` entry of its config.json."""

MAX_SEQ_LEN_CAP = 4096
"""Default cap on ``max_seq_len`` (the paper's context; Llama 3 / Qwen2 declare 128k / 32k). Raise it
with ``model_overrides={'max_seq_len': ...}`` up to the checkpoint's ``max_position_embeddings``."""

TEXT_PREFIXES = ("tok_emb.", "layers.", "norm.", "lm_head.")
"""Our parameter names that come from the language model; everything else is the image side."""

FIXED_BY_CHECKPOINT = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "hidden_dim",
    "norm_eps",
    "rope_theta",
    "qkv_bias",
    "tie_embeddings",
)
"""ModelConfig fields that ``load_pretrained`` takes from the checkpoint; overrides may not change them."""

_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
"""Buffers that old checkpoints saved and that we recompute."""

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
_LAYER_BIAS = {
    "self_attn.q_proj.bias": "attn.wq.bias",
    "self_attn.k_proj.bias": "attn.wk.bias",
    "self_attn.v_proj.bias": "attn.wv.bias",
}


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------
def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local Hugging Face model directory, checked to be a supported
    architecture (``model_type`` llama or qwen2, ``architectures`` its CausalLM class)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pretrained model directory {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; give a Hugging Face model directory")
    hf = json.loads(file.read_text())
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{file}: model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)} "
            f"({', '.join(ARCHITECTURES.values())})"
        )
    archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if archs != [ARCHITECTURES[model_type]]:
        raise ValueError(
            f"{file}: architectures {archs} is not supported for model_type {model_type!r}; "
            f"expected [{ARCHITECTURES[model_type]!r}] (a causal LM with its lm_head)"
        )
    return hf


def _rope_theta(hf: dict[str, Any]) -> float:
    """``rope_theta`` from either config layout (transformers v4: ``rope_theta`` + ``rope_scaling``;
    v5: ``rope_parameters``), refusing every RoPE variant but the plain one."""
    theta = hf.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if not rope:
            continue
        if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"config.json {key}={rope!r}: per-layer RoPE parameters are not supported")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"config.json {key}.rope_type={kind!r} is not supported: only plain RoPE ('default') is "
                "implemented (Llama 3.1+ 'llama3' and other scaled RoPE variants are not); use a checkpoint "
                "without RoPE scaling"
            )
        theta = rope.get("rope_theta", theta)
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"config.json {key}.partial_rotary_factor must be 1 (full RoPE)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json partial_rotary_factor must be 1 (full RoPE)")
    return float(theta if theta is not None else 10000.0)


def model_config_from_hf(
    hf: dict[str, Any], vocab_size: int, model_overrides: dict[str, Any] | None = None
) -> ModelConfig:
    """Our ``ModelConfig`` for a Llama / Qwen2 ``config.json``; ``vocab_size`` is the extended one.

    ``model_overrides`` sets the other fields (image side: ``latent_size``, ``patch_size``,
    ``patcher``...; ``max_seq_len``; ``attention``); the fields in ``FIXED_BY_CHECKPOINT`` may only
    repeat the checkpoint's value."""
    model_type = hf["model_type"]

    def need(key: str) -> Any:
        if key not in hf:
            raise ValueError(f"config.json lacks {key!r}, which a {model_type} config must have")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json hidden_act={hf['hidden_act']!r} is not supported (SwiGLU needs 'silu')"
        )
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported (our SwiGLU has no biases)")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ValueError("config.json attention_bias=true is not supported (our o projection has no bias)")
    if model_type == "qwen2":
        if hf.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window=true is not supported (full attention only)")
        layer_types = set(hf.get("layer_types") or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(
                f"config.json layer_types {sorted(layer_types)}: only 'full_attention' is supported"
            )
    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise ValueError(
            f"config.json head_dim={head_dim} with {n_heads} heads does not give hidden_size={dim}; "
            "our attention needs head_dim = hidden_size / num_attention_heads"
        )
    max_pos = int(hf.get("max_position_embeddings", MAX_SEQ_LEN_CAP))
    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "dim": dim,
        "n_layers": int(need("num_hidden_layers")),
        "n_heads": n_heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
        "hidden_dim": int(need("intermediate_size")),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(hf),
        "qkv_bias": model_type == "qwen2",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_seq_len": min(max_pos, MAX_SEQ_LEN_CAP),
    }
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in (model_overrides or {}).items():
        if key not in names:
            raise ValueError(f"model_overrides: unknown key {key!r}; known: {sorted(names)}")
        if key in FIXED_BY_CHECKPOINT and value != values[key]:
            raise ValueError(
                f"model_overrides: {key}={value!r} contradicts the checkpoint ({key}={values[key]!r}); "
                f"the pretrained weights fix {', '.join(FIXED_BY_CHECKPOINT)}"
            )
        values[key] = value
    if values["max_seq_len"] > max_pos:
        raise ValueError(
            f"model_overrides: max_seq_len {values['max_seq_len']} exceeds the checkpoint's "
            f"max_position_embeddings {max_pos}"
        )
    return ModelConfig(**values)


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def hf_key_map(cfg: ModelConfig, qkv_bias: bool | None = None) -> dict[str, str]:
    """Hugging Face weight name -> our parameter name, for every weight of the text side.

    ``qkv_bias`` (default ``cfg.qkv_bias``) adds the q/k/v bias keys; when the model has no biases
    they map to ``""`` (written as zeros on export)."""
    qkv_bias = cfg.qkv_bias if qkv_bias is None else qkv_bias
    keys = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        keys["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for hf_name, ours in _LAYER.items():
            keys[f"model.layers.{i}.{hf_name}"] = text_copy(cfg, f"layers.{i}.{ours}")
        if qkv_bias:
            for hf_name, ours in _LAYER_BIAS.items():
                keys[f"model.layers.{i}.{hf_name}"] = (
                    text_copy(cfg, f"layers.{i}.{ours}") if cfg.qkv_bias else ""
                )
    return keys


def text_copy(cfg: ModelConfig, name: str) -> str:
    """A trunk weight's name in a model with modality-specific weights: its text copy
    (``layers.0.attn.wq.weight`` -> ``layers.0.attn.wq.text.weight``); unchanged for shared weights."""
    if cfg.modality_weights != "mot":
        return name
    module, _, leaf = name.rpartition(".")
    return f"{module}.text.{leaf}"


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names, or model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} names {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise ValueError(f"{path} holds {others} but no model.safetensors.index.json naming them")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(
            f"{path} holds only pickled weights (*.bin / *.pt), which are not loaded (they can run code); "
            "convert them to safetensors first"
        )
    raise FileNotFoundError(f"{path} holds no model.safetensors")


def added_token_ids(tokenizer: HFTokenizer) -> list[int]:
    """Ids that ``HFTokenizer`` added after the file's vocabulary (BOI, EOI, and BOS/EOS/PAD when
    the file had none): the embedding / LM head rows that a pretrained model has not learned."""
    return list(range(tokenizer.base_vocab_size, tokenizer.vocab_size))


@torch.no_grad()
def _init_new_rows(weight: Tensor, new_ids: list[int], n_known: int) -> None:
    """Rows ``new_ids`` of an embedding / LM head matrix set to the mean of rows ``0..n_known-1``."""
    if new_ids:
        weight[new_ids] = weight[:n_known].double().mean(0).to(weight.dtype)


def pretrained_config(
    path: str | Path, model_overrides: dict[str, Any] | None = None
) -> tuple[ModelConfig, HFTokenizer, dict[str, Any]]:
    """The ``ModelConfig`` a local Llama / Qwen2 directory gives (with ``model_overrides``), its
    tokenizer and its raw config.json, without reading any weight."""
    path = Path(path)
    hf = read_hf_config(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json (only the fast-tokenizer file is read)")
    tokenizer = HFTokenizer(path)
    if "vocab_size" not in hf:
        raise ValueError(f"{path / 'config.json'} lacks 'vocab_size'")
    hf_vocab = int(hf["vocab_size"])
    if tokenizer.base_vocab_size > hf_vocab:
        raise ValueError(
            f"tokenizer.json has {tokenizer.base_vocab_size} tokens but config.json vocab_size is {hf_vocab}: "
            "they do not belong to the same model"
        )
    return model_config_from_hf(hf, max(hf_vocab, tokenizer.vocab_size), model_overrides), tokenizer, hf


@torch.no_grad()
def load_pretrained(
    path: str | Path, model_overrides: dict[str, Any] | None = None
) -> tuple[Transfusion, ModelConfig, HFTokenizer]:
    """A Transfusion initialised from a local Llama / Qwen2 directory, its config and tokenizer.

    The trunk, final norm, embedding and LM head come from the checkpoint (cast to fp32); the rows
    of ids the tokenizer added (BOI, EOI...) start at the mean of the existing rows (module
    docstring says why); the patcher keeps the model's own initialisation. Raises ``ValueError``
    naming the key for an unsupported config, a missing or unexpected weight, or a shape mismatch.
    """
    path = Path(path)
    cfg, tokenizer, hf = pretrained_config(path, model_overrides)
    files = weight_files(path)
    hf_vocab = int(hf["vocab_size"])
    model = Transfusion(cfg)  # the model's own initialisation; the text side is overwritten below
    keys = hf_key_map(cfg)
    vocab_keys = {"model.embed_tokens.weight", "lm_head.weight"}
    loaded: set[str] = set()
    for file in files:
        for hf_key, tensor in load_tensors(file).items():
            if hf_key.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and hf_key == "lm_head.weight"):
                continue
            if hf_key not in keys:
                raise ValueError(
                    f"{file.name}: unexpected weight {hf_key!r} {tuple(tensor.shape)}; "
                    f"a {hf['model_type']} checkpoint of this config has no such weight"
                )
            target = model.get_parameter(keys[hf_key])
            want = (hf_vocab, cfg.dim) if hf_key in vocab_keys else tuple(target.shape)
            if tuple(tensor.shape) != want:
                raise ValueError(
                    f"{file.name}: weight {hf_key!r} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {want}"
                )
            target[: want[0]].copy_(tensor)
            loaded.add(hf_key)
    missing = [k for k in keys if k not in loaded]
    if missing:
        raise ValueError(f"{path}: weight {missing[0]!r} is missing ({len(missing)} missing in all)")
    if cfg.modality_weights == "mot":  # LMFusion: the image copies start as the LLM's layers too
        for name, p in model.named_parameters():
            if ".image." in name:
                p.copy_(model.get_parameter(name.replace(".image.", ".text.")))
    new_ids = added_token_ids(tokenizer)
    n_known = tokenizer.base_vocab_size
    _init_new_rows(model.tok_emb.weight, new_ids, n_known)
    if not cfg.tie_embeddings:
        _init_new_rows(model.lm_head.weight, new_ids, n_known)
    return model, cfg, tokenizer
