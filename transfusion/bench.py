"""Measure speed and memory: training throughput and MFU, cached decoding, image sampling.

Prints a table and writes JSON. Every number is measured in this process, with the thread count
given, next to a matmul peak measured the same way, and the machine's load is recorded (a second
process on a 2-core machine slows PyTorch 10-20x; compare only numbers from one run).

The command is ``transfusion bench`` (``commands/bench.py``), e.g.
``transfusion bench --configs tiny small w512 --out bench-out``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from transfusion.config import ModelConfig, preset
from transfusion.flops import batch_train_flops
from transfusion.model import Transfusion
from transfusion.recipe import demo_model
from transfusion.sequence import Image, MixedBatch, Sample, Specials, Text, pack, sample_length
from transfusion.tokenizer import ByteTokenizer

CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": lambda: preset("tiny"),
    "small": lambda: preset("small"),
    "small-mot": lambda: preset("small", modality_weights="mot"),  # modality-specific weights
    "demo": demo_model,  # the demo's trunk: 3 layers of 256, U-Net patcher, 4 patches an image
    "w256": lambda: ModelConfig(dim=256, n_layers=4, n_heads=4, latent_size=8, patch_size=2),
    "w512": lambda: ModelConfig(dim=512, n_layers=4, n_heads=8, latent_size=8, patch_size=2),
    # the paper's sizes (Table 2), for GPUs: run with --seq-len 2048 (benchmarks/gpu.sh)
    "0.16B": lambda: preset("0.16B"),
    "0.37B": lambda: preset("0.37B"),
    "0.76B": lambda: preset("0.76B"),
}


# --- measurement helpers -------------------------------------------------------------------------
def timed(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` calls (the median: one call slowed by another
    process must not move a benchmark row or shrink the demo's schedule)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(device: str, n: int | None = None, repeat: int = 10) -> float:
    """Matmul GFLOP/s in the dtype training uses here: fp32 on the CPU (n = 1024, the current thread
    count), bf16 on CUDA (n = 8192, what autocast runs the model's matrices in)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, repeat) / 1e9


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def machine_info(threads: int) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg_1m": load[0] if load else None,
    }


def synthetic_batch(
    cfg: ModelConfig, batch_size: int, seq_len: int, caption_len: int = 30, seed: int = 0
) -> MixedBatch:
    """Rows of caption-first pairs (``caption_len`` text tokens + one image), packed like training."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lat = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    samples = [
        Sample(
            [Text([rng.randrange(256) for _ in range(caption_len)]), Image(torch.randn(lat, generator=gen))]
        )
        for _ in range(batch_size * max(1, seq_len // (caption_len + cfg.patches_per_image + 4)) * 2)
    ]
    b = pack(samples, seq_len, Specials.of(ByteTokenizer()), cfg.patches_per_image)
    rows = b.ids[:batch_size]
    n_img = int((b.image_index[:batch_size] > 0).sum()) // cfg.patches_per_image
    return MixedBatch(
        ids=rows,
        image_index=b.image_index[:batch_size],
        doc_ids=b.doc_ids[:batch_size],
        positions=b.positions[:batch_size],
        text_targets=b.text_targets[:batch_size],
        latents=b.latents[:n_img],
        timesteps=torch.randint(0, 1000, (n_img,), generator=gen),
        noise_limited=b.noise_limited[:n_img],
    )


# --- the benchmarks --------------------------------------------------------------------------------
def one_process_group(device: str) -> None:
    """A process group of this process alone, so that FSDP2 (and its mixed-precision policy) can be
    measured on one GPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def bench_train(
    cfg: ModelConfig, batch_size: int, seq_len: int, device: str, repeat: int, compile: bool | None = None,
    activation_checkpointing: str = "none", parallel: str = "none",
) -> dict[str, Any]:  # fmt: skip
    """The step users run (``training.train_step``: forward, both losses, backward, clipping, AdamW)
    on one synthetic batch, made ready by ``training.parallelize`` as the training loop makes it:
    bf16 autocast on CUDA, blocks compiled where ``train.compile`` would compile them (CUDA, by
    default), activation checkpointing as given; the first steps, which compile, are not timed."""
    from transfusion.config import Config, DiffusionConfig, TrainConfig
    from transfusion.diffusion import make_schedule
    from transfusion.distributed import DistInfo
    from transfusion.training import make_optimizer, train_step
    from transfusion.training.parallelize import parallelize

    torch.manual_seed(0)
    model = Transfusion(cfg).to(device)
    if parallel == "fsdp":
        one_process_group(device)
    tc = TrainConfig(lr=1e-4, compile=compile, activation_checkpointing=activation_checkpointing,
                     parallel="fsdp" if parallel == "fsdp" else "ddp")  # fmt: skip
    wrapped = parallelize(model, Config(model=cfg, train=tc), DistInfo(device=torch.device(device)))
    compiled = wrapped.compiled
    batch = synthetic_batch(cfg, batch_size, seq_len).to(device)
    dc = DiffusionConfig()
    opt = make_optimizer(model, tc)
    schedule = make_schedule(dc)

    def step() -> None:
        train_step(model, opt, [batch], schedule, dc, lr=tc.lr, grad_clip=tc.grad_clip,
                   autocast=wrapped.autocast())  # fmt: skip

    reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, repeat, warmup=3 if compiled else 2)
    tokens = batch_size * seq_len
    step_flops = batch_train_flops(cfg, batch)
    return {
        "params_M": model.num_params() / 1e6,
        "batch": f"{batch_size}x{seq_len}",
        "step_gflop": step_flops / 1e9,
        "step_ms": sec * 1e3,
        "tokens_per_s": tokens / sec,
        "model_gflops": step_flops / sec / 1e9,
        "attention": model.backend(torch.device(device)),
        "dtype": "bf16-autocast" if wrapped.dtype == torch.bfloat16 else "fp32",
        "compiled": compiled,
        "activation_checkpointing": activation_checkpointing,
        "parallel": wrapped.mode,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_max_alloc_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }


def bench_sampling(
    cfg: ModelConfig, device: str, repeat: int, image_steps: tuple[int, ...] = (250, 50)
) -> dict[str, Any]:
    """Cached text decoding, whole-image sampling, and one denoising step against prefixes of
    16, 256 and 1024 positions (it should stay nearly flat: only the attention reads grow)."""
    from transfusion.config import DiffusionConfig
    from transfusion.generate import Decoder, GenerationConfig, text_to_image

    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, 1024 + cfg.patches_per_image + 8))
    torch.manual_seed(0)
    model = Transfusion(cfg).to(device).eval()
    tok = ByteTokenizer()
    dec = Decoder(model, tok, DiffusionConfig())
    row: dict[str, Any] = {}
    n_new = 64
    text = GenerationConfig(max_new_tokens=n_new, temperature=0.0, max_images=0)
    sec = timed(lambda: dec.generate([["a red circle to the"]], text), max(1, repeat // 2), warmup=1)
    row["decode_tokens_per_s"] = n_new / sec
    for steps in image_steps:
        for scale in (1.0, 3.0):
            gen = GenerationConfig(steps=steps, sampler="ddim", cfg_scale=scale)
            sec = timed(lambda gen=gen: text_to_image(dec, ["a red circle"], gen), 1, warmup=0)
            row[f"image_s_{steps}steps{'_cfg' if scale != 1.0 else ''}"] = sec
    # one denoising step against a cached prefix: one row, one row with guidance (its unconditional
    # twin in the same batch), four rows with guidance; the prefix should cost only its reads
    for prefix in (16, 256, 1024):
        for rows_n, scale in ((1, 1.0), (1, 3.0), (4, 3.0)):
            ms = _denoise_step_ms(dec, prefix, rows_n, scale, device, repeat * 4)
            suffix = ("" if rows_n == 1 else f"_{rows_n}rows") + ("_cfg" if scale != 1.0 else "")
            row[f"denoise_step_ms_prefix{prefix}{suffix}"] = ms
    return row


def _denoise_step_ms(dec: Any, prefix: int, rows_n: int, scale: float, device: str, repeat: int) -> float:
    """Milliseconds of one denoising step of ``rows_n`` rows whose cached prompts are ``prefix``
    positions long (ending in BOI), through the model's cached API as the decoder calls it (with
    guidance: one batch with the unconditional twins, which share one cached BOS BOI)."""
    from transfusion.generate import KVCache

    model, tok = dec.model, dec.tok
    cfg, dev = model.cfg, torch.device(device)
    sp = Specials.of(tok)
    rows = torch.arange(rows_n)
    x = torch.randn(rows_n, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
    t = torch.full((rows_n,), 500)

    def cached(prompts: list[Sample]) -> KVCache:
        lengths = [sample_length(p, cfg.patches_per_image) for p in prompts]
        cache = KVCache(model, len(prompts), max(lengths) + cfg.patches_per_image + 2, dev, torch.float32)
        batch = pack(prompts, max(lengths), sp, cfg.patches_per_image, one_per_row=True).to(dev)
        cache.commit(torch.arange(len(prompts)), model.prefill(batch, torch.tensor(lengths) - 1).kv,
                     torch.tensor(lengths))  # fmt: skip
        return cache

    with torch.no_grad():
        cache = cached([Sample([Text([ord("a")] * (prefix - 2)), Text([sp.boi])], eos=False)] * rows_n)
        shared = cached([Sample([Text([sp.boi])], eos=False)]) if scale != 1.0 else None
        xs, ts = (x, t) if shared is None else (torch.cat([x, x]), torch.cat([t, t]))
        start, past = cache.starts(rows, shared), cache.prefix(rows, shared)
        return timed(lambda: model.extend_image(xs, ts, start, past), repeat) * 1e3


def run_benchmarks(
    names: list[str], batch_size: int, seq_len: int, repeat: int, device: str, sampling: bool = True,
    image_steps: tuple[int, ...] = (250, 50), compile: bool | None = None, activation_checkpointing: str = "none",
    parallel: str = "none",
) -> dict[str, Any]:  # fmt: skip
    peak = matmul_peak(device)
    rows = []
    for name in names:
        cfg = CONFIGS[name]()
        if seq_len > cfg.max_seq_len:
            cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
        row = {"config": name,
               **bench_train(cfg, batch_size, seq_len, device, repeat, compile, activation_checkpointing, parallel)}  # fmt: skip
        row["mfu"] = row["model_gflops"] / peak
        if sampling:
            row.update(bench_sampling(cfg, device, repeat, image_steps))
        rows.append(row)
    return {"machine": machine_info(torch.get_num_threads()), "matmul_peak_gflops": peak, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    cols = ["config", "params_M", "batch", "attention", "dtype", "step_ms", "tokens_per_s", "model_gflops"]
    cols += ["mfu", "peak_rss_mb"]
    # the rest in reading order: decoding, whole images, then denoising steps by prefix length
    order = {"decode": 0, "image": 1, "denoise": 2, "cuda": 3}
    extra = {k for r in result["rows"] for k in r} - set(cols)
    cols += sorted(
        extra, key=lambda k: (order.get(k.split("_")[0], 4), [int(d) for d in re.findall(r"\d+", k)], k)
    )

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(fmt(r.get(c)) for c in cols) for r in result["rows"]]
    m = result["machine"]
    head = (
        f"matmul peak {result['matmul_peak_gflops']:.0f} GFLOP/s (fp32, {m['threads']} threads); "
        f"load {m['load_avg_1m']}; torch {m['torch']}; {m['cuda'] or m['processor']}"
    )
    return head + "\n\n" + "\n".join(lines)
