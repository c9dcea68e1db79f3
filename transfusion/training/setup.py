"""What a training run is built from: the model (fresh or from a pretrained LLM), its VAE, the
image encoder and the data loaders, and the checks that these pieces agree."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfusion import distributed as D
from transfusion.config import Config, DataConfig, ModelConfig
from transfusion.data.loader import BatchLoader
from transfusion.io import copy_dir_atomic
from transfusion.model import Transfusion
from transfusion.tokenizer import load_tokenizer

PRETRAINED_IMAGE_SIDE = (
    "latent_channels",
    "latent_size",
    "patch_size",
    "patcher",
    "unet_channels",
    "attention",
)


def model_config_for_init(model: ModelConfig, init_from: str) -> ModelConfig:
    """The model config of a run that starts from a pretrained LLM: the checkpoint's text side, with
    the image side of ``model`` and every other field that ``model`` sets away from its default
    (``max_seq_len``, or a text-side field, which must then repeat the checkpoint's value)."""
    from transfusion.pretrained import pretrained_config

    default = ModelConfig()
    overrides = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(ModelConfig)
        if f.name in PRETRAINED_IMAGE_SIDE or getattr(model, f.name) != getattr(default, f.name)
    }
    return pretrained_config(init_from, overrides)[0]


@dataclass
class Start:
    """What a fine-tuning run starts from (``train.init_checkpoint``): the checkpoint's weights, its EMA
    (None without one), tokenizer, VAE directory and configuration, and the identity of the weights a
    LoRA base is (``base``: path, step, ``lora.weights_hash``)."""

    config: Config
    tokenizer: Any
    vae_dir: Path | None
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    base: dict[str, Any]

    @property
    def inference_weights(self) -> dict[str, torch.Tensor]:
        """The weights inference loads (the EMA when there is one): a LoRA run's frozen base."""
        return self.ema if self.ema is not None else self.weights


def checkpoint_config(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """The configuration and description of a checkpoint, run or model directory, without its weights."""
    from transfusion import checkpoint as ckpt
    from transfusion.model_directory import CONFIG_FILE, is_model_directory

    if is_model_directory(path):
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
        return Config.from_dict(meta["config"]), meta
    meta, config = ckpt.read_meta(ckpt.resolve_checkpoint(path))
    return config, meta


def read_start(path: str | Path, with_weights: bool = True) -> Start:
    """``Start`` from a run directory, a one-process or sharded checkpoint, or a model directory."""
    from transfusion import checkpoint as ckpt
    from transfusion.lora import weights_hash
    from transfusion.model_directory import is_model_directory, read_model_directory
    from transfusion.tokenizer import tokenizer_from_dict

    if is_model_directory(path):
        meta, config, weights = read_model_directory(path, "cpu")
        where, ema = Path(path).resolve(), None
    else:
        where = ckpt.resolve_checkpoint(path).resolve()
        meta, config = ckpt.read_meta(where)
        weights = ckpt.read_weights(where, meta, use_ema=False)[1]
        has_ema = meta.get("has_ema") if ckpt.is_sharded(where) else (where / ckpt.EMA_FILE).is_file()
        ema = ckpt.read_weights(where, meta, use_ema=True)[1] if has_ema else None
    if "lora" in meta:
        raise ValueError(
            f"{where} is a LoRA run (its weights are adapters); fine-tune its merged model instead: "
            f"transfusion export --checkpoint {path} --out DIR, then --init-checkpoint DIR"
        )
    vae = (where / meta["vae"]).resolve() if meta.get("vae") else None
    start = Start(config, tokenizer_from_dict(meta.get("tokenizer"), base=where), vae, weights, ema, {})
    start.base = {"path": str(where), "step": meta.get("step"), "weights_hash": weights_hash(start.inference_weights),
                  "ema": ema is not None}  # fmt: skip
    return start


def model_config_for_checkpoint(cfg: Config) -> ModelConfig:
    """The model config of a fine-tuning run: the checkpoint's. A field the run's config sets away from
    the default to another value than the checkpoint's (``--set model.X``, a preset) would change the
    architecture: a one-line error (the attention backend, which holds no weights, may change)."""
    saved, _ = checkpoint_config(cfg.train.init_checkpoint)
    default, ours = dataclasses.asdict(ModelConfig()), dataclasses.asdict(cfg.model)
    changed = [k for k, v in ours.items()
               if k != "attention" and v != default[k] and v != getattr(saved.model, k)]  # fmt: skip
    if changed:
        k = changed[0]
        raise ValueError(
            f"model.{k}={ours[k]!r} would change the architecture of {cfg.train.init_checkpoint} "
            f"(model.{k}={getattr(saved.model, k)!r}); the model comes from the checkpoint: drop that setting"
        )
    return dataclasses.replace(saved.model, attention=cfg.model.attention)


def resolve_text_side(cfg: Config) -> Config:
    """Fix what the text side's source dictates: a pretrained LLM its whole text config, a tokenizer
    file the vocabulary size, a Transfusion checkpoint (fine-tuning) the whole model config."""
    if cfg.train.init_checkpoint:
        cfg.model = model_config_for_checkpoint(cfg)
        if cfg.data.image_size == DataConfig().image_size:  # the images its VAE reads
            cfg.data.image_size = checkpoint_config(cfg.train.init_checkpoint)[0].vae.image_size
    elif cfg.train.init_from:
        cfg.model = model_config_for_init(cfg.model, cfg.train.init_from)
    elif cfg.train.tokenizer:
        cfg.model.vocab_size = load_tokenizer(cfg.train.tokenizer).vocab_size
    return cfg


def build_model(cfg: Config, start: Start | None = None) -> tuple[Transfusion, Any, Any]:
    """(model, tokenizer, freeze or None). With ``train.init_from`` the text side and the tokenizer
    come from a local Llama / Qwen2 directory; ``train.freeze_text`` then trains the image side only.
    With ``start`` (``train.init_checkpoint``) the model holds the checkpoint's weights; with
    ``train.lora_rank`` its inference weights (the EMA) are the frozen base of new adapters."""
    tc = cfg.train
    if start is not None:
        from transfusion import lora

        model = Transfusion(cfg.model)
        weights = start.inference_weights if tc.lora_rank else start.weights
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                f"{start.base['path']} does not match its config: {missing[:3]} {unexpected[:3]}"
            )
        if tc.lora_rank:
            targets = tuple(tc.lora_targets or lora.DEFAULT_TARGETS)
            modules = lora.add_adapter(
                model, "default", tc.lora_rank, tc.lora_alpha, targets, tc.lora_modality
            )
            trained = lora.freeze_all_but_adapters(model, ("patcher",) if tc.lora_patcher else ())
            total = sum(p.numel() for p in model.parameters())
            D.print0(f"LoRA rank {tc.lora_rank} on {len(modules)} linear layers: {trained:,} of {total:,} "
                     f"parameters train ({100 * trained / total:.2f}%)")  # fmt: skip
        return model, start.tokenizer, None
    if not tc.init_from:
        return Transfusion(cfg.model), load_tokenizer(tc.tokenizer), None
    from transfusion.pretrained import freeze_text, load_pretrained, trainable_parameters_summary

    model, _, tokenizer = load_pretrained(tc.init_from, dataclasses.asdict(cfg.model))
    freeze = None
    if tc.freeze_text:
        new_rows = tc.parallel != "fsdp"  # FSDP2 replaces parameters: the row mask cannot follow them
        freeze = freeze_text(model, tc.train_layers, train_embeddings_new_rows=new_rows, tokenizer=tokenizer)
        D.print0(trainable_parameters_summary(model))
    return model, tokenizer, freeze


def check_consistency(cfg: Config) -> None:
    """The pieces of a config that must agree, with what to change."""
    m, v = cfg.model, cfg.vae
    if v.model_channels != m.latent_channels:
        what = "a VQ tokenizer gives one code per latent pixel" if v.kind == "vq" else "the VAE's latents"
        raise ValueError(
            f"model.latent_channels is {m.latent_channels} but {what} have {v.model_channels} channel(s); "
            f"set model.latent_channels={v.model_channels}"
        )
    if m.discrete != (v.kind == "vq"):
        raise ValueError(
            "discrete image tokens (model.image_tokens=discrete) need a VQ tokenizer (train-vq), and a VQ "
            "tokenizer needs them; continuous images need a KL-VAE (train-vae)"
        )
    if m.discrete and m.codebook_size != v.codebook_size:
        raise ValueError(f"model.codebook_size {m.codebook_size} != the VQ tokenizer's {v.codebook_size}")
    if v.latent_size != m.latent_size:
        raise ValueError(
            f"the VAE makes {v.latent_size}x{v.latent_size} latents (image {v.image_size} / {v.downsample}) but "
            f"model.latent_size is {m.latent_size}; set model.latent_size={v.latent_size}"
        )
    if cfg.data.image_size != v.image_size and cfg.data.source != "latents":  # latents hold no pixels
        raise ValueError(f"data.image_size {cfg.data.image_size} != vae.image_size {v.image_size}")
    if cfg.train.seq_len > m.max_seq_len:
        raise ValueError(f"train.seq_len {cfg.train.seq_len} exceeds model.max_seq_len {m.max_seq_len}")


def load_or_make_vae(vae_arg: str | None, cfg: Config, out: Path, is_main: bool, resume: bool,
                     start_vae: Path | None = None) -> Any:  # fmt: skip
    """The run's VAE: ``out/vae`` when resuming, a trained directory, 'random' (tests only), or the
    fine-tuned checkpoint's (``start_vae``) when none is given."""
    from transfusion.autoencoders import load_vae
    from transfusion.vae import KLVAE, save_vae

    if (out / "vae").is_dir() and (resume or vae_arg is None):
        return load_vae(out / "vae")
    if vae_arg is None and start_vae is not None:
        if not start_vae.is_dir():
            raise ValueError(f"the checkpoint's VAE {start_vae} is missing; give --vae DIR")
        vae_arg = str(start_vae)
    if vae_arg == "random":
        torch.manual_seed(cfg.train.seed)
        vae = KLVAE(cfg.vae).eval()
        if is_main:
            D.print0("warning: --vae random: an untrained autoencoder; for tests and smoke runs only")
    elif vae_arg:
        vae = load_vae(vae_arg)
    else:
        raise ValueError("give --vae DIR (a trained VAE: transfusion train-vae --out DIR) or --vae random")
    if is_main:
        if isinstance(vae, KLVAE):
            save_vae(vae, out / "vae")
        else:
            copy_dir_atomic(Path(vae_arg), out / "vae")
    return vae


def image_encoder(vae: Any, device: torch.device | str) -> Callable[[Any], torch.Tensor]:
    """A function from images (uint8 pixels (N, S, S, 3) as the loader sends them, or PIL images) to
    their latents scaled for diffusion, (N, C, h, w) on the CPU, encoded on ``device``."""
    from transfusion.vae import encode_images

    vae = vae.to(device).eval()
    return lambda images: encode_images(vae, images)


def open_latent_cache(cfg: Config, vae: Any, encode: Any, info: D.DistInfo) -> Any:
    """The training split of ``data.source`` as a latent store in ``data.latent_cache``: built once (every
    rank encoding its own shards, resumable), rebuilt when the VAE or the data changed, then read."""
    from transfusion.data.latents import LatentShards, build_latents
    from transfusion.data.sources import make_source
    from transfusion.vae import vae_hash

    if cfg.data.source == "latents":
        raise ValueError("data.latent_cache encodes a source of images; --data latents is encoded already")
    if cfg.data.source == "shape-edits":
        raise ValueError(
            "data.latent_cache holds one image per item; shape-edits items hold two: drop data.latent_cache"
        )
    source = make_source(cfg.data, "train")
    if cfg.data.source == "shapes" and cfg.data.length is None or not hasattr(source, "__len__"):
        raise ValueError(
            "data.latent_cache needs a finite indexable source: folder, jsonl, fashion_mnist, local webdataset "
            "shards, or shapes with data.length set (a pool of scenes)"
        )
    digest = vae_hash(vae)
    build_latents(source, encode, digest, cfg.data.latent_cache, workers=cfg.data.num_workers,
                  rank=info.rank, world=info.world_size, progress=info.is_main)  # fmt: skip
    return LatentShards(cfg.data.latent_cache, digest)


def check_latents(source: Any, vae: Any) -> None:
    """Pre-encoded latents must come from the run's VAE (its decoder draws the samples)."""
    from transfusion.vae import vae_hash

    made_by = getattr(source, "meta", {}).get("vae_hash") if hasattr(source, "meta") else None
    if made_by is not None and made_by != vae_hash(vae):
        raise ValueError(
            f"{source.describe()} was encoded with VAE {made_by}, the run's --vae is {vae_hash(vae)}; "
            "give the VAE the latents were made with"
        )


def make_loaders(
    cfg: Config, tokenizer: Any, vae: Any, info: D.DistInfo, streams: int | None = None
) -> tuple[list[BatchLoader], BatchLoader | None]:
    """This rank's training loaders and, when validation is on, its held-out loader.

    The run reads ``streams`` data streams (default: processes x ``train.grad_accum``): stream s reads
    source items s, s + streams, s + 2 streams, ... and yields one micro-batch per optimizer step.
    Rank r owns streams r x A ... r x A + A - 1 (A = streams / processes), so the global batch of a
    step is the same whatever the number of processes, and a run resumes exactly on another number.
    ``data.num_workers`` worker processes per rank are shared out between its streams."""
    streams = streams or info.world_size * cfg.train.grad_accum
    per_rank = streams // info.world_size
    encode = image_encoder(vae, info.device)
    source = open_latent_cache(cfg, vae, encode, info) if cfg.data.latent_cache else None
    owned = range(info.rank * per_rank, (info.rank + 1) * per_rank)
    workers = -(-cfg.data.num_workers // per_rank)
    loaders = [BatchLoader(cfg, tokenizer, encode, s, streams, "train", source, workers) for s in owned]
    check_latents(loaders[0].source, vae)
    val = (
        BatchLoader(cfg, tokenizer, encode, info.rank, info.world_size, "val", workers=0)
        if cfg.train.eval_every
        else None
    )
    return loaders, val
