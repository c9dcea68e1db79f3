"""Start from a pretrained language model (a local Hugging Face Llama or Qwen2 directory), choose what
trains, and write the text side back out.

- ``hf``: ``load_pretrained`` / ``pretrained_config`` (config.json, safetensors weights, tokenizer.json);
- ``freeze``: ``freeze_text`` and ``trainable_parameters_summary``;
- ``export``: ``export_hf``.
"""

from transfusion.pretrained.export import export_hf
from transfusion.pretrained.freeze import TextFreeze, freeze_text, trainable_parameters_summary
from transfusion.pretrained.hf import (
    ARCHITECTURES,
    FIXED_BY_CHECKPOINT,
    added_token_ids,
    load_pretrained,
    model_config_from_hf,
    pretrained_config,
    read_hf_config,
)

__all__ = [
    "ARCHITECTURES",
    "FIXED_BY_CHECKPOINT",
    "TextFreeze",
    "added_token_ids",
    "export_hf",
    "freeze_text",
    "load_pretrained",
    "model_config_from_hf",
    "pretrained_config",
    "read_hf_config",
    "trainable_parameters_summary",
]
