"""Configuration: one small dataclass per concern, validated on construction, JSON round-trip.

Presets are plain functions (``tiny()``, ``small()``, ``paper_0_16b()``...) registered in ``PRESETS``
so that the command line can name them. Every checkpoint stores its ``Config`` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PATCH_SIZES = (1, 2, 4, 8)


def _choice(name: str, value: Any, options: Iterable[Any]) -> None:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of {options}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass
class ModelConfig:
    """The transformer and its modality-specific edges."""

    vocab_size: int = 261
    """Text vocabulary, special tokens included (the byte tokenizer has 261)."""
    dim: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (head width = dim / n_heads)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (pretrained Llama/Qwen2); None means n_heads."""
    hidden_dim: int | None = None
    """SwiGLU hidden width; None applies Llama's rule (8/3 * dim rounded up to multiple_of)."""
    multiple_of: int = 64
    """The SwiGLU hidden width is rounded up to a multiple of this (Llama's rule)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 1024
    """Longest sequence (RoPE table size): training rows, prompts and generated output."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2 has it; Llama and the paper do not)."""
    tie_embeddings: bool = False
    """Share the text embedding and the LM head."""
    latent_channels: int = 8
    """Channels of the VAE latent (8 in the paper)."""
    latent_size: int = 8
    """Height and width of the VAE latent grid."""
    patch_size: int = 2
    """k: each k x k block of latent pixels becomes one transformer position."""
    patcher: str = "linear"
    """'linear' (a linear layer over each k x k patch) or 'unet' (U-Net down/up blocks)."""
    unet_channels: int = 64
    """Base channel count of the U-Net patcher."""
    timestep_freq_dim: int = 256
    """Size of the sinusoidal timestep features fed to the timestep MLP."""
    attention: str = "auto"
    """'sdpa' (dense boolean mask), 'flex' (FlexAttention BlockMask) or 'auto' (flex on CUDA)."""
    rope_2d: bool = False
    """Image patches rotate half of each head's RoPE frequencies by their row and half by their column
    (both counted from the image's first position), so attention sees rows and columns apart; text
    is unchanged (both halves at its position). False: the paper's 1D positions in raster order."""
    image_pos_embed: bool = False
    """Add a learned vector per patch place (zero at init) to every image's patch vectors, so each patch
    carries where it sits in the image as content, which attention can carry to other positions. The
    paper's positions are RoPE only: they tilt attention scores but leave the values without place, and
    a text position at p sees a patch's place only relative to p. Not in the paper."""
    image_attention: str = "bidirectional"
    """Inside an image: 'bidirectional' (the paper's: every patch sees every patch of its image) or
    'causal' (patches see only earlier patches, as text does: the paper's Table 5 ablation)."""
    image_tokens: str = "continuous"
    """'continuous': images are VAE latents in patches, trained by diffusion (Transfusion). 'discrete':
    images are VQ codes, extra vocabulary rows trained by the one next-token loss (the Chameleon
    baseline; needs patch_size 1, latent_channels 1 and a 'vq' autoencoder)."""
    codebook_size: int = 0
    """With discrete image tokens: the VQ codebook's size; its codes take vocabulary ids
    vocab_size .. vocab_size + codebook_size - 1."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (Model.init_weights says where it applies)."""
    modality_weights: str = "shared"
    """'shared' (the paper's: one trunk for every position) or 'mot' (Mixture-of-Transformers, Liang
    et al. 2024): every block has a text copy and an image copy of its norms, attention projections and
    feed-forward layer; each position goes through its modality's copy (BOI/EOI count as text) and
    attention still runs once over the whole sequence. Twice the trunk's parameters, the same FLOPs."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "latent_channels"):
            _positive(name, getattr(self, name))
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        _choice("patch_size", self.patch_size, PATCH_SIZES)
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"latent_size {self.latent_size} is not divisible by patch_size {self.patch_size}; "
                "change one of them"
            )
        _choice("patcher", self.patcher, ("linear", "unet"))
        if self.patcher == "unet" and self.patch_size == 1:
            raise ValueError("the U-Net patcher needs patch_size 2, 4 or 8 (it downsamples)")
        _choice("attention", self.attention, ("auto", "sdpa", "flex"))
        _choice("image_attention", self.image_attention, ("bidirectional", "causal"))
        _choice("image_tokens", self.image_tokens, ("continuous", "discrete"))
        _choice("modality_weights", self.modality_weights, ("shared", "mot"))
        if self.modality_weights == "mot" and self.image_tokens == "discrete":
            raise ValueError(
                "model.modality_weights=mot needs continuous images (its image copies serve patches)"
            )
        if self.image_pos_embed and self.image_tokens == "discrete":
            raise ValueError("model.image_pos_embed needs continuous images (it is added to patch vectors)")
        if self.discrete:
            if self.codebook_size < 2:
                raise ValueError("discrete image tokens need model.codebook_size (the VQ tokenizer's codes)")
            if self.patch_size != 1 or self.latent_channels != 1:
                raise ValueError(
                    "discrete image tokens are one code per latent pixel: set model.patch_size=1 and "
                    "model.latent_channels=1"
                )

    @property
    def discrete(self) -> bool:
        """Images are VQ codes (the Chameleon baseline), not diffused latents."""
        return self.image_tokens == "discrete"

    @property
    def total_vocab(self) -> int:
        """Rows of the embedding and the LM head: the text vocabulary, then any image codes."""
        return self.vocab_size + (self.codebook_size if self.discrete else 0)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def patches_per_side(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def patches_per_image(self) -> int:
        return self.patches_per_side**2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2


@dataclass
class DiffusionConfig:
    """Noise schedule, training objective and sampler defaults (PAPER.md: 1000 steps, cosine, eps)."""

    num_train_timesteps: int = 1000
    """Diffusion timesteps T (PAPER.md: 1000)."""
    schedule: str = "cosine"
    """'cosine' (Nichol & Dhariwal 2021, the paper's) or 'linear' (DDPM's betas 1e-4..0.02)."""
    objective: str = "ddpm"
    """'ddpm' (epsilon prediction, the paper's) or 'flow' (rectified flow, velocity prediction)."""
    noise_limit: int = 500
    """Largest timestep for images placed before their caption (PAPER.md: t <= 500)."""
    timestep_shift: float = 1.0
    """Training timesteps are drawn as ``shift u / (1 + (shift - 1) u)`` of the range for u uniform
    (the timestep shift of Esser et al. 2024, SD3): 1 is the paper's uniform draw, above 1 puts more of
    training at the noisiest steps (3: t >= 700 for 56% of the images instead of 30%). Sampling is
    unchanged."""
    loss_weight: float = 5.0
    """lambda in LM + lambda * diffusion (PAPER.md: 5)."""
    sampler: str = "ddpm"
    """Default sampler at generation time: 'ddpm' (ancestral), 'ddim' or 'flow' (Euler)."""
    sample_steps: int = 250
    """Denoising steps at generation time (PAPER.md: 250 of the 1000 trained)."""
    cfg_scale: float = 3.0
    """Classifier-free guidance weight (PAPER.md: 3 in the ablations, 5 against Chameleon)."""
    guidance_max_t: int | None = None
    """Guidance applies only at timesteps t <= guidance_max_t (the conditional prediction alone above);
    None: at every step (the paper's). Kynkäänniemi et al. 2024: guidance at high noise pulls samples
    towards the mean and away from the data."""
    sample_clip: float | None = 4.0
    """DDPM/DDIM sampling clips the predicted clean latent to +-sample_clip (latents have unit
    variance). Without it the first step from t = 999, where the cosine schedule's alpha-bar is 2e-9,
    divides the noise prediction's error by sqrt(alpha-bar) and samples diverge. None disables it."""

    def __post_init__(self) -> None:
        _positive("num_train_timesteps", self.num_train_timesteps)
        _choice("schedule", self.schedule, ("cosine", "linear"))
        _choice("objective", self.objective, ("ddpm", "flow"))
        _choice("sampler", self.sampler, ("ddpm", "ddim", "flow"))
        if not 0 < self.noise_limit <= self.num_train_timesteps:
            raise ValueError(f"noise_limit must be in 1..{self.num_train_timesteps}, got {self.noise_limit}")
        if not 0 < self.sample_steps <= self.num_train_timesteps:
            raise ValueError(
                f"sample_steps must be in 1..{self.num_train_timesteps}, got {self.sample_steps}"
            )
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be > 0 (1: uniform timesteps), got {self.timestep_shift}")
        if self.guidance_max_t is not None and not 0 <= self.guidance_max_t < self.num_train_timesteps:
            raise ValueError(
                f"guidance_max_t must be in 0..{self.num_train_timesteps - 1} (or null: guide every step), "
                f"got {self.guidance_max_t}"
            )


@dataclass
class VAEConfig:
    """The image autoencoder: pixels (3, S, S) <-> latents (C, S/f, S/f), or codes (S/f, S/f) for 'vq'."""

    kind: str = "kl"
    """'kl': the KL-regularised VAE of continuous latents (Transfusion's); 'vq': a vector-quantised
    tokenizer whose codes become text-like tokens (the Chameleon baseline's)."""
    image_size: int = 32
    """Image side in pixels."""
    in_channels: int = 3
    """Image channels (3, RGB)."""
    latent_channels: int = 8
    """Latent channels (PAPER.md: 8)."""
    downsample: int = 4
    """Spatial reduction factor f: 4 or 8."""
    base_channels: int = 64
    """Width of the first convolution stage (doubling, up to 4x, at each downsampling)."""
    kl_weight: float = 1e-6
    """beta in reconstruction + beta * KL."""
    scale: float = 1.0
    """Latents are (z - shift) * scale before diffusion; both computed from data after training."""
    shift: float = 0.0
    """See ``scale``."""
    path: str | None = None
    """A trained VAE directory (ours, or a diffusers AutoencoderKL); None means untrained/none."""
    codebook_size: int = 1024
    """Codes of a 'vq' tokenizer (PAPER.md: Chameleon's has 16,384 at 256 px)."""
    commitment: float = 0.25
    """beta of the VQ commitment loss ||z - sg(e)||^2 (van den Oord et al. 2017)."""

    def __post_init__(self) -> None:
        _choice("kind", self.kind, ("kl", "vq"))
        _choice("downsample", self.downsample, (4, 8))
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")
        _positive("latent_channels", self.latent_channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def model_channels(self) -> int:
        """Channels of what the transformer reads per image: the latent's, or 1 (the code grid) for 'vq'."""
        return 1 if self.kind == "vq" else self.latent_channels


@dataclass
class DataConfig:
    """Where samples come from and how image-caption pairs are laid out (PAPER.md: 80/20)."""

    source: str = "shapes"
    """'shapes' (built-in scenes), 'shape-edits' (edits of them: image, instruction, image), 'fashion_mnist',
    'folder', 'jsonl', 'text', 'webdataset' or 'latents' (a dataset pre-encoded by ``transfusion encode``)."""
    path: str | None = None
    """The files of a file-based source: a folder, a JSONL manifest, a .txt file or folder, tar shards,
    a latent store."""
    image_size: int = 32
    """Image side in pixels (images are resized on their shorter side and centre-cropped)."""
    caption_first_prob: float = 0.8
    """Probability a captioned pair is ordered caption-then-image (else image-then-caption)."""
    text_only_ratio: float = 0.0
    """Share of samples that are text alone: documents of ``text_path`` when it is set, else the
    captions of captioned records (their images unused)."""
    image_only_ratio: float = 0.0
    """Share of captioned records used as an image alone (no text)."""
    text_path: str | None = None
    """A .txt file or a folder of them (documents split at blank lines) whose documents are mixed in
    as text-only samples at ``text_only_ratio``: language data beside an image-caption set."""
    cond_dropout: float = 0.1
    """Probability that the text before an image is dropped, so CFG has an unconditional branch."""
    max_objects: int = 3
    """Objects per scene at most, for the built-in shapes source (1 to 3)."""
    descriptive_captions: float = 0.0
    """Shapes source: the share of two-object scenes whose caption states everything the scene holds,
    every object's colour and their relation ("a red circle to the left of a blue square"), whatever
    the caption kind the scene drew (two-object and colour-attribution captions leave the relation or
    the colours out). Recaptioning with descriptive captions, as DALL-E 3 (Betker et al. 2023). 0: the
    GenEval kinds in equal shares."""
    position_share: float | None = None
    """Shapes source: the share of scenes drawn as position scenes (two objects, captioned with both
    colours and their relation), the other five kinds sharing the rest equally. None: all six kinds in
    equal shares (1/6 each)."""
    canonical_relations: float = 0.0
    """Shapes source: the share of captions stating a relation that name the upper or left object
    first ("a blue square above a red circle" rather than the equivalent "a red circle below a blue
    square"; the image is the same). 0: either wording, equally often."""
    pairs_in_reading_order: bool = False
    """Shapes source: captions of two objects without a relation (two objects, colour attribution: "a
    blue square and a red circle") name the upper or left object first too, so that with
    ``canonical_relations`` 1 every two-object caption is in reading order; False: in the order the
    scene drew them, whatever their places."""
    describe_in_reading_order: bool = False
    """Captions after their image (image-first pairs: what the model learns to write) state a relation
    in reading order, the upper or left object first ("a red circle below a blue square" is written
    "a blue square above a red circle"); captions before an image (prompts) keep the wording
    ``canonical_relations`` gives them. A rewrite of the caption's text (``shapes.reading_order``), so
    it holds for a latent cache's texts as well; texts that are not a shapes relation caption pass."""
    length: int | None = None
    """Distinct scenes the shapes source cycles through (None: a million); a finite pool is what
    ``latent_cache`` encodes once. Pairing, conditioning dropout and noise still differ every pass."""
    scene_share: float = 0.0
    """shape-edits: the share of items that are captioned shape scenes (with this section's caption
    knobs) instead of edits: the base's data replayed while fine-tuning."""
    seed: int = 0
    """Seeds the shapes scenes and every sample's pairing, dropout and noise."""
    val_fraction: float = 0.02
    """Share of a file-based source (folder, jsonl, text, webdataset) held out as its 'val' split,
    chosen by a hash of each item's name, so adding files does not move the others between splits."""
    strict: bool = False
    """Stop at the first unreadable sample instead of skipping and counting it."""
    truncate: bool = False
    """Cut a sample longer than ``train.seq_len`` at a text boundary (never inside an image) and count
    it; False stops with an error that names the sample."""
    latent_cache: str | None = None
    """A directory where the images of a finite source are encoded once (a latent store: safetensors
    shards, built by every rank, resumable); training then reads latents instead of images."""
    num_workers: int = 0
    """Worker processes per rank that read, decode, resize, pair and tokenize samples ahead of the
    training step (0: the training process does it between steps)."""
    prefetch: int = 64
    """Samples each worker prepares ahead of the step (at least two chunks of 16)."""

    def __post_init__(self) -> None:
        _choice(
            "source",
            self.source,
            ("shapes", "shape-edits", "fashion_mnist", "folder", "jsonl", "text", "webdataset", "latents"),
        )
        if self.num_workers < 0 or self.prefetch < 1:
            raise ValueError(
                f"data.num_workers must be >= 0 and data.prefetch >= 1, got {self.num_workers}, {self.prefetch}"
            )
        for name in (
            "caption_first_prob",
            "text_only_ratio",
            "image_only_ratio",
            "cond_dropout",
            "descriptive_captions",
            "canonical_relations",
            "scene_share",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.text_only_ratio + self.image_only_ratio > 1.0:
            raise ValueError("text_only_ratio + image_only_ratio must not exceed 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be within [0, 1), got {self.val_fraction}")
        if self.length is not None and self.length < 1:
            raise ValueError(f"length must be >= 1 (or null for the default), got {self.length}")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {self.max_objects}")
        if self.position_share is not None and not 0.0 <= self.position_share <= 1.0:
            raise ValueError(
                f"position_share must be within [0, 1] (or null: equal shares), got {self.position_share}"
            )


@dataclass
class TrainConfig:
    """Optimisation (PAPER.md: AdamW 0.9/0.95, eps 1e-8, lr 3e-4, cosine to 1.5e-5, wd 0.1, clip 1)."""

    steps: int = 1000
    """Optimizer steps in all (the cosine schedule ends here)."""
    batch_size: int = 8
    """Rows per optimizer micro-step (per process)."""
    seq_len: int = 128
    """Length of each packed row."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (their gradients averaged)."""
    lr: float = 3e-4
    """Peak learning rate (PAPER.md: 3e-4)."""
    min_lr: float = 1.5e-5
    """The cosine decay's floor (PAPER.md: 1.5e-5)."""
    warmup_steps: int = 100
    """Linear warm-up steps (the paper uses 4000 at 2M-token batches; small runs need fewer)."""
    beta1: float = 0.9
    """AdamW beta1 (PAPER.md: 0.9)."""
    beta2: float = 0.95
    """AdamW beta2 (PAPER.md: 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon (PAPER.md: 1e-8)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; norms and biases get none (PAPER.md: 0.1)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (PAPER.md: 1.0)."""
    ema_decay: float = 0.0
    """0 disables the EMA copy of the weights."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl (and progress-bar updates)."""
    eval_every: int = 200
    """Steps between validation losses on held-out data; 0 disables validation."""
    eval_batches: int = 2
    """Held-out batches per validation (the same batches, with the same noise, every time)."""
    sample_every: int = 0
    """Steps between sample grids (samples/step_N.png); 0 disables them."""
    ckpt_every: int = 200
    """Steps between checkpoints (one is also written at the end and on SIGINT / SIGTERM)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are removed."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses tolerated before the run stops."""
    seed: int = 0
    """Seeds the model's initialisation."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """'auto' = bf16 autocast on CUDA, fp32 on CPU; or 'fp32', 'bf16'."""
    parallel: str = "ddp"
    """Under torchrun: 'ddp' or 'fsdp' (FSDP2 fully_shard on every block and the root; with bf16 it
    gathers parameters in bf16 and reduces gradients in fp32)."""
    compile: bool | None = None
    """torch.compile every transformer block (and the patcher); None: on for CUDA, off on the CPU,
    where it does not pay for its start-up (about a minute)."""
    activation_checkpointing: str = "none"
    """'none', 'full' (every block keeps only its input and recomputes the rest in the backward pass)
    or 'every:K' (blocks 0, K, 2K, ... do): less activation memory for about a third more compute."""
    dist_timeout: float = 900.0
    """Seconds a collective waits for the slowest process under torchrun before the run stops with an
    error (a lost or stuck rank); it must cover the longest time one rank works while others wait."""
    async_checkpoint: bool = False
    """Write checkpoints in a background thread: training waits only for the copy to host memory."""
    tokenizer: str | None = None
    """A local ``tokenizer.json`` (or its directory) for a model trained from scratch, e.g. one made by
    ``transfusion train-tokenizer``; None means the byte tokenizer. It fixes ``model.vocab_size`` and
    is copied into every checkpoint."""
    init_from: str | None = None
    """A local Hugging Face Llama / Qwen2 directory whose text weights and tokenizer start the model."""
    freeze_text: bool = False
    """Train only the image side (plus ``train_layers`` and the new BOI/EOI rows); needs init_from."""
    train_layers: list[int] | None = None
    """With freeze_text: trunk layers that still train (negative indices count from the end)."""
    init_checkpoint: str | None = None
    """A Transfusion checkpoint (a run directory, a one-process or sharded checkpoint, or a model
    directory) whose weights and EMA start this run, with a fresh optimizer and schedule; its model
    config, tokenizer and VAE come with it (fine-tuning)."""
    lora_rank: int = 0
    """With init_checkpoint: train low-rank adapters of this rank on the frozen base (0: full fine-tuning)."""
    lora_alpha: float | None = None
    """LoRA's alpha: the adapters' output is scaled by alpha / rank (None: alpha = rank)."""
    lora_targets: list[str] | None = None
    """The block linears that get adapters (None: wq, wk, wv, wo, gate, up, down)."""
    lora_modality: str = "both"
    """Under modality-specific weights (MoT, LMFusion): adapters on the 'text' copies, the 'image'
    copies or 'both'."""
    lora_patcher: bool = False
    """With lora_rank: the patcher (image in and out, timestep MLP) trains too, saved with the adapter."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "lr", "keep_last", "log_every",
                     "ckpt_every", "eval_batches"):  # fmt: skip
            _positive(name, getattr(self, name))
        _positive("dist_timeout", self.dist_timeout)
        for name in ("eval_every", "sample_every", "max_bad_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _choice("dtype", self.dtype, ("auto", "fp32", "bf16"))
        _choice("parallel", self.parallel, ("ddp", "fsdp"))
        checkpointed_every(self.activation_checkpointing)  # validates
        if self.freeze_text and not self.init_from:
            raise ValueError("train.freeze_text needs train.init_from (a pretrained LLM directory)")
        if self.tokenizer and self.init_from:
            raise ValueError(
                "train.tokenizer and train.init_from both name a tokenizer; a pretrained LLM brings its own"
            )
        if self.init_checkpoint and (self.init_from or self.tokenizer):
            raise ValueError(
                "train.init_checkpoint brings the model, its tokenizer and its VAE; drop train.init_from / train.tokenizer"
            )
        if self.lora_rank < 0:
            raise ValueError(f"train.lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if self.lora_rank and not self.init_checkpoint:
            raise ValueError(
                "train.lora_rank adapts a trained model: give train.init_checkpoint (--init-checkpoint)"
            )
        if self.lora_patcher and not self.lora_rank:
            raise ValueError(
                "train.lora_patcher applies with train.lora_rank (full fine-tuning trains the patcher)"
            )
        _choice("lora_modality", self.lora_modality, ("both", "text", "image"))
        if self.train_layers and not self.freeze_text:
            raise ValueError(
                "train.train_layers only applies with train.freeze_text (every layer trains otherwise)"
            )


def checkpointed_every(mode: str) -> int:
    """``train.activation_checkpointing`` as a stride: 0 for 'none', 1 for 'full', K for 'every:K'."""
    if mode in ("none", "full"):
        return int(mode == "full")
    head, _, k = str(mode).partition(":")
    if head == "every" and k.isdigit() and int(k) >= 1:
        return int(k)
    raise ValueError(
        f"train.activation_checkpointing={mode!r} is not one of 'none', 'full', 'every:K' (K >= 1, e.g. every:2)"
    )


@dataclass
class Config:
    """Everything a run needs; stored as JSON beside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = {"model": ModelConfig, "diffusion": DiffusionConfig, "vae": VAEConfig}.get(f.name)
            sub_cls = sub_cls or {"data": DataConfig, "train": TrainConfig}[f.name]
            parts[f.name] = _build(sub_cls, d.get(f.name, {}), f.name)
        return cls(**parts)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    def override(self, assignments: Iterable[str]) -> Config:
        """Return a copy with ``section.key=value`` assignments applied (values parsed as JSON)."""
        d = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
            key, raw = item.split("=", 1)
            section, _, name = key.strip().partition(".")
            if section not in d or name not in d[section]:
                known = (
                    ", ".join(f"{s}.{k}" for s in d for k in d[s])
                    if section not in d
                    else ", ".join(d[section])
                )
                raise ValueError(f"unknown config key {key!r}; known keys: {known}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw  # bare strings: train.device=cpu
            d[section][name] = value
        return Config.from_dict(d)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (the first sentence), read from
    the source, so that ``--help`` can list every key with what it means."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): names and defaults only
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = " ".join(after.value.value.split())
            docs[node.target.id] = re.split(r"\.\s+(?=[A-Z(])", text)[0].rstrip(".")
    return docs


def config_keys_help() -> str:
    """Every ``section.key`` with its default and meaning, for ``--help``."""
    lines = ["config keys (--set section.key=value; values are JSON, bare words are strings):"]
    for section, cls in (("model", ModelConfig), ("diffusion", DiffusionConfig), ("vae", VAEConfig),
                         ("data", DataConfig), ("train", TrainConfig)):  # fmt: skip
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            doc = docs.get(f.name, "")
            lines.append(f"  {section}.{f.name} = {json.dumps(default)}" + (f"  -- {doc}" if doc else ""))
    return "\n".join(lines)


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown key(s) in [{section}]: {sorted(unknown)}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _conforms(value, hints[name]):
            want = re.sub(r"<class '(\w+)'>|typing\.", r"\1", str(hints[name])).replace("NoneType", "null")
            want = want.replace("None", "null")
            raise ValueError(f"{section}.{name}={value!r}: expected {want}")
    return cls(**values)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type (an int fits a float; a bool is not an int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return (
            isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
            if args
            else isinstance(value, list)
        )
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def load_config(path: str | Path) -> Config:
    """Read a Config from a JSON or TOML file (sections: model, diffusion, vae, data, train)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError as e:  # Python 3.10
            raise ValueError("TOML configs need Python >= 3.11; use JSON instead") from e
        return Config.from_dict(tomllib.loads(text))
    return Config.from_json(text)


# ---------------------------------------------------------------------------------------------
# Presets. The paper's five sizes use the Llama 2 vocabulary (32,000) plus BOI and EOI.
# ---------------------------------------------------------------------------------------------
LLAMA2_VOCAB = 32000 + 2


def tiny(**kw: Any) -> ModelConfig:
    """For tests: a few thousand parameters per layer, 4x4x8 latents, patch 2 (4 patches)."""
    return ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "latent_size": 4, "max_seq_len": 256, **kw})


def small(**kw: Any) -> ModelConfig:
    """For the CPU demo: width 256, 6 layers, 8x8x8 latents (32x32 images through a 4x VAE)."""
    return ModelConfig(
        **{"dim": 256, "n_layers": 6, "n_heads": 4, "latent_size": 8, "max_seq_len": 512, **kw}
    )


def _paper(layers: int, dim: int, heads: int) -> Callable[..., ModelConfig]:
    def preset(**kw: Any) -> ModelConfig:
        base = {
            "dim": dim,
            "n_layers": layers,
            "n_heads": heads,
            "multiple_of": 256,
            "vocab_size": LLAMA2_VOCAB,
            "latent_size": 32,
            "max_seq_len": 4096,
        }
        return ModelConfig(**{**base, **kw})

    preset.__doc__ = f"Table 2 of the paper: {layers} layers, width {dim}, {heads} heads, 32x32x8 latents."
    return preset


paper_0_16b = _paper(16, 768, 12)
paper_0_37b = _paper(24, 1024, 16)
paper_0_76b = _paper(24, 1536, 24)
paper_1_4b = _paper(24, 2048, 16)
paper_7b = _paper(32, 4096, 32)

PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "0.16B": paper_0_16b,
    "0.37B": paper_0_37b,
    "0.76B": paper_0_76b,
    "1.4B": paper_1_4b,
    "7B": paper_7b,
}


def preset(name: str, **kw: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name](**kw)
