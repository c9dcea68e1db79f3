"""A trained model's text side written back in the Hugging Face Llama / Qwen2 layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from transfusion.config import ModelConfig
from transfusion.pretrained.hf import ARCHITECTURES, hf_key_map
from transfusion.tokenizer import HFTokenizer


def export_hf(
    model: nn.Module,
    config: Any,
    tokenizer: HFTokenizer,
    out_dir: str | Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the text side in the Hugging Face layout: config.json, model.safetensors, tokenizer.json.

    The vocabulary keeps BOI/EOI (config ``vocab_size`` is ours, the tokenizer file holds the added
    tokens), so ``AutoModelForCausalLM.from_pretrained(out_dir)`` reproduces our text logits, and
    ``load_pretrained(out_dir)`` gives back the same text weights. The image side (patcher) is not
    written: keep our checkpoint for it. ``config`` is a ``ModelConfig`` or a ``Config``.
    ``arch='qwen2'`` writes zero q/k/v biases for a model without them; a model with q/k/v biases
    exports as ``qwen2`` only (Llama's ``attention_bias`` also biases the output projection).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not supported; choose one of {sorted(ARCHITECTURES)}")
    cfg: ModelConfig = getattr(config, "model", config)
    model = getattr(model, "module", getattr(model, "_orig_mod", model))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} rows"
        )
    if arch == "llama" and cfg.qkv_bias:
        raise ValueError("this model has q/k/v biases (qkv_bias, Qwen2-style): export it with arch='qwen2'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    keys = hf_key_map(cfg, qkv_bias=arch == "qwen2")
    state = {k.replace("_orig_mod.", "").replace("module.", ""): v for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    for hf_key, ours in keys.items():
        if ours:
            t = state[ours]
        else:  # a bias our model does not have: zero
            t = torch.zeros(state[keys[hf_key.removesuffix("bias") + "weight"]].shape[0])
        tensors[hf_key] = t.detach().to("cpu", dtype).contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = hf_config(cfg, tokenizer, arch, dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(tokenizer, cfg, out)
    return out


def hf_config(cfg: ModelConfig, tokenizer: HFTokenizer, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of the exported model (read by transformers v4 and v5)."""
    dtype_name = str(dtype).removeprefix("torch.")
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers v4 reads these two,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # v5 this one
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return hf


def _write_tokenizer(tokenizer: HFTokenizer, cfg: ModelConfig, out: Path) -> None:
    """``tokenizer.json`` (with BOI/EOI among its added tokens) and a small ``tokenizer_config.json``."""
    tokenizer._tok.save(str(out / "tokenizer.json"))
    name = tokenizer._tok.id_to_token
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tokenizer.bos_id),
        "eos_token": name(tokenizer.eos_id),
        "pad_token": name(tokenizer.pad_id),
        "additional_special_tokens": [HFTokenizer.BOI, HFTokenizer.EOI],
        "model_max_length": cfg.max_seq_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
