"""Images per second the training loader delivers, against the rate one GPU consumes them.

    python benchmarks/data_rate.py [--images 1536 --workers 0 1 2 --out data-rate]

Writes a WebDataset of 256x256 JPEGs with captions (the built-in scenes rendered at 256 px, in 4 tar
shards) and pre-encodes it into a latent store, then times ``data.loader.BatchLoader`` producing
packed batches of the paper's 0.16B layout (32x32x8 latents in 2x2 patches: 256 positions an image, rows
of 4096) from the JPEGs with 0, 1 and 2 worker processes, and from the latent shards with one worker.
The VAE's encoder is not in the timing: it runs on the GPU beside training (the JPEG rows hand their
pixels to a stand-in that returns zeros); what is timed is what the CPU must keep up with: reading,
decoding, resizing, pairing, tokenizing and packing. The GPU's rate is the 0.16B model's training
FLOPs per image (``transfusion.flops`` on these very batches) at 50% MFU of a stated bf16 peak.
Prints a markdown table and writes ``data_rate.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch

H200_BF16_TFLOPS = 989.0
"""Dense bf16 peak of an H200 SXM (NVIDIA's datasheet; 1,979 with sparsity)."""


def write_webdataset(root: Path, n: int, shards: int = 4, size: int = 256) -> str:
    from transfusion.data.shapes import ShapesDataset

    scenes = ShapesDataset(size, seed=0, max_objects=3, length=n)
    for k in range(shards):
        with tarfile.open(root / f"data-{k:03d}.tar", "w") as tar:
            for i in range(k * n // shards, (k + 1) * n // shards):
                rec = scenes[i]
                buf = io.BytesIO()
                rec.image.save(buf, format="JPEG", quality=90)
                for name, blob in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", rec.text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return str(root / f"data-{{000..{shards - 1:03d}}}.tar")


def config(source: str, path: str, workers: int):
    from transfusion.config import Config, TrainConfig, preset

    cfg = Config(model=preset("0.16B"), train=TrainConfig(batch_size=8, seq_len=4096))
    cfg.data.source, cfg.data.path, cfg.data.image_size = source, path, 256
    cfg.data.num_workers, cfg.data.val_fraction = workers, 0.0
    return cfg


def zeros(pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's place (it runs on the GPU): latents of the right shape, no work."""
    return torch.zeros(len(pixels), 8, 32, 32)


def rate(cfg, batches: int) -> tuple[float, float, float]:
    """(images/s, positions/s, training FLOPs per image) over ``batches`` batches after two of warm-up."""
    from transfusion.data.loader import BatchLoader
    from transfusion.flops import batch_train_flops
    from transfusion.tokenizer import ByteTokenizer

    loader = BatchLoader(cfg, ByteTokenizer(), zeros)
    for _ in range(2):  # workers started, first reads done
        next(loader)
    t0, images, flops = time.perf_counter(), 0, 0.0
    for _ in range(batches):
        b = next(loader)
        images += b.num_images
        flops += batch_train_flops(cfg.model, b)
    seconds = time.perf_counter() - t0
    positions = batches * cfg.train.batch_size * cfg.train.seq_len
    return images / seconds, positions / seconds, flops / images


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=2048, help="JPEGs in the dataset (default 2048)")
    p.add_argument(
        "--batches",
        type=int,
        default=6,
        help="timed batches per measurement (8 x 4096 positions each; default 6)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="measurements per row, rows interleaved; the median is kept"
    )
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts for the JPEG rows"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the GPU's bf16 peak (default H200: 989)"
    )
    p.add_argument("--out", default="data-rate", help="directory for data_rate.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    from transfusion.data.latents import build_latents
    from transfusion.data.sources import make_source

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_webdataset(Path(tmp), args.images)
        source = make_source(config("webdataset", pattern, 0).data)
        build_latents(
            source, zeros, "stand-in", Path(tmp) / "latents", dtype="float16", workers=2, progress=False
        )
        runs = [("webdataset JPEG 256x256", "webdataset", pattern, w) for w in args.workers]
        runs.append(("latent shards (float16)", "latents", str(Path(tmp) / "latents"), 1))
        measured: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(runs))}
        for _ in range(args.rounds):  # interleaved: a slow spell of the machine hits every row alike
            for i, (_, src, path, workers) in enumerate(runs):
                measured[i].append(rate(config(src, path, workers), args.batches))
        for i, (name, _, _, workers) in enumerate(runs):
            images_s, positions_s, per_image = (
                statistics.median(m[j] for m in measured[i]) for j in range(3)
            )
            rows.append({"data": name, "workers": workers, "images_per_s": images_s, "positions_per_s": positions_s,
                         "train_flops_per_image": per_image, "all_images_per_s": [m[0] for m in measured[i]]})  # fmt: skip
    gpu = 0.5 * args.peak_tflops * 1e12 / statistics.median(r["train_flops_per_image"] for r in rows)
    print(f"0.16B layout (rows of 4096, 256 positions an image + caption); {os.cpu_count()} CPU cores, "
          f"load {os.getloadavg()[0]:.1f}; one GPU at 50% MFU of {args.peak_tflops:g} TFLOP/s bf16 consumes "
          f"**{gpu:,.0f} images/s**\n")  # fmt: skip
    print(f"medians of {args.rounds} interleaved measurements (range in brackets)\n")
    print("| data | worker processes | images/s delivered | positions/s | x one GPU's need |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        lo, hi = min(r["all_images_per_s"]), max(r["all_images_per_s"])
        print(f"| {r['data']} | {r['workers']} | {r['images_per_s']:,.0f} [{lo:,.0f}-{hi:,.0f}] | "
              f"{r['positions_per_s']:,.0f} | {r['images_per_s'] / gpu:.2f} |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_rate.json").write_text(json.dumps({"rows": rows, "gpu_images_per_s": gpu,
                                                    "peak_tflops": args.peak_tflops}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
