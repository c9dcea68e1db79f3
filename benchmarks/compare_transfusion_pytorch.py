"""Side by side with lucidrains' ``transfusion-pytorch``: training and sampling speed, one run, alternating.

The other library is installed by this script into its own environment (``bench-venv/``, with the
same torch) and is never a dependency of ours. Both models are measured in the same session,
alternating A/B/A/B, with the same threads, the same batch of samples and the same latent shape, and
the ratio is printed. How the configurations are matched (and where they cannot be) is written into
the JSON and ``benchmarks/RESULTS.md``:

- same width (256), heads (4 x 64), vocabulary (256 bytes), latent (16 tokens of 32 values: 8x8x8
  latents cut into 2x2 patches), batch (8 samples of 30 text tokens + one image);
- theirs uses flow matching, adaptive-LayerNorm time conditioning and its own layout tokens; ours uses
  DDPM epsilon and a linear patcher. We match parameter count (within 5%) by depth, and the number of
  denoising steps and the guidance setting when sampling.

Usage: ``python benchmarks/compare_transfusion_pytorch.py [--rounds 3] [--out bench-out]``; on a GPU,
``benchmarks/gpu.sh`` passes ``--device cuda --width 1024 --heads 16 --text 64 --latent-size 16`` (a
0.26B-parameter match, 8 samples of 64 text tokens and a 16x16x8 latent). Each library trains at its
own defaults: ours with ``training.train_step`` under bf16 autocast and compiled blocks on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench-venv"
BATCH, PATCH = 8, 2

THEIRS = r"""
import json, sys, time, torch
from torch import randint, randn
from transfusion_pytorch import Transfusion
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
depth, steps, sample_steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
width, heads, text, patches, patch_dim, device = (int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]),
                                                   int(sys.argv[8]), int(sys.argv[9]), sys.argv[10])
model = Transfusion(num_text_tokens=256, dim_latent=patch_dim, modality_default_shape=(patches,),
                    transformer=dict(dim=width, depth=depth, dim_head=width // heads, heads=heads)).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = [[randint(0, 256, (text,), device=device), randn(patches, patch_dim, device=device)] for _ in range(8)]
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
def step():
    loss = model(batch)
    loss.backward(); opt.step(); opt.zero_grad()
for _ in range(2): step()
times = []
for _ in range(steps):
    sync(); t = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t)
dt = sorted(times)[len(times) // 2]  # the median step: a slow spell of the machine counts once
# one transformer forward per denoising step: time the model's own flow sampler on one image
model.eval()
t = time.perf_counter()
with torch.no_grad():
    model.sample(max_length=patches + 16, modality_steps=sample_steps, cache_kv=True)
sample_s = time.perf_counter() - t
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"params": n, "step_s": dt, "positions": 8 * (text + patches + 3), "sample_s": sample_s}))
"""


def model_config(args: argparse.Namespace, depth: int):  # noqa: ANN201
    from transfusion.config import ModelConfig

    return ModelConfig(dim=args.width, n_layers=depth, n_heads=args.heads, latent_size=args.latent_size,
                       patch_size=PATCH, max_seq_len=max(1024, args.text + 4 + (args.latent_size // PATCH) ** 2))  # fmt: skip


def ours(args: argparse.Namespace, depth: int, steps: int) -> dict:
    """Our training step as users run it (``train_step``, the loop's dtype and compile policies)."""
    import torch

    from transfusion.config import Config, DiffusionConfig, TrainConfig
    from transfusion.diffusion import make_schedule
    from transfusion.distributed import DistInfo
    from transfusion.generate import Decoder, GenerationConfig, text_to_image
    from transfusion.model import Transfusion
    from transfusion.sequence import Image, Sample, Specials, Text, pack
    from transfusion.tokenizer import ByteTokenizer
    from transfusion.training import make_optimizer, train_step
    from transfusion.training.parallelize import parallelize

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg, dev = model_config(args, depth), torch.device(args.device)
    model = Transfusion(cfg).to(dev)
    tc, dc = TrainConfig(lr=1e-4), DiffusionConfig()
    parallel = parallelize(model, Config(model=cfg, train=tc), DistInfo(device=dev))  # compiled on CUDA only
    opt, schedule = make_optimizer(model, tc), make_schedule(dc)
    latent = (8, args.latent_size, args.latent_size)
    samples = [Sample([Text(torch.randint(0, 256, (args.text,)).tolist()), Image(torch.randn(latent))])
               for _ in range(BATCH)]  # fmt: skip
    n = cfg.patches_per_image
    batch = pack(samples, args.text + n + 4, Specials.of(ByteTokenizer()), n, one_per_row=True).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        train_step(
            model, opt, [batch], schedule, dc, lr=tc.lr, grad_clip=tc.grad_clip, autocast=parallel.autocast()
        )

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]  # the median step, as for theirs
    sample_steps = args.sample_steps
    dec = Decoder(model.eval(), ByteTokenizer(), DiffusionConfig())
    t = time.perf_counter()
    text_to_image(dec, ["a red circle"], GenerationConfig(steps=sample_steps, sampler="ddim", cfg_scale=1.0))
    sample_s = time.perf_counter() - t
    return {
        "params": model.num_params(),
        "step_s": dt,
        "positions": int(batch.ids.numel()),
        "sample_s": sample_s,
    }


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        import torch

        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True
        )
        subprocess.run([str(py), "-m", "pip", "install", "-q", "transfusion-pytorch==0.20.0"], check=True)
    return py


def theirs(py: Path, args: argparse.Namespace, steps: int, sample_steps: int) -> dict:
    n, patch_dim = (args.latent_size // PATCH) ** 2, 8 * PATCH * PATCH
    argv = [args.threads, args.their_depth, steps, sample_steps, args.width, args.heads, args.text, n, patch_dim,
            args.device]  # fmt: skip
    r = subprocess.run([str(py), "-c", THEIRS, *map(str, argv)],
                       capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds, theirs then ours (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--steps", type=int, default=9, help="timed training steps per round (their median counts)"
    )
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--their-depth", type=int, default=4)
    p.add_argument("--width", type=int, default=256, help="model width, both (default 256)")
    p.add_argument("--heads", type=int, default=4, help="attention heads, both (default 4)")
    p.add_argument("--text", type=int, default=30, help="text tokens per sample (default 30)")
    p.add_argument(
        "--latent-size", type=int, default=8, help="latent side, 8 channels, 2x2 patches (default 8)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args()
    py = ensure_venv()
    ref = theirs(py, args, 1, 2)
    # our depth that matches their parameter count best
    from transfusion.model import Transfusion

    def count(depth: int) -> int:
        import torch

        with torch.device("meta"):
            return Transfusion(model_config(args, depth)).num_params()

    depth = min(range(1, 40), key=lambda d: abs(count(d) - ref["params"]))
    rows = []
    for _ in range(args.rounds):
        a = theirs(py, args, args.steps, args.sample_steps)
        b = ours(args, depth, args.steps)
        rows.append({"theirs": a, "ours": b})

    def med(side: str, key: str) -> float:
        vals = sorted(r[side][key] for r in rows)
        return vals[len(vals) // 2]

    result = {
        "load_avg_1m": os.getloadavg()[0],
        "threads": args.threads,
        "device": args.device,
        "their_params": ref["params"],
        "our_params": count(depth),
        "our_depth": depth,
        "their_depth": args.their_depth,
        "their_tokens_per_s": med("theirs", "positions") / med("theirs", "step_s"),
        "our_tokens_per_s": med("ours", "positions") / med("ours", "step_s"),
        "their_sample_s": med("theirs", "sample_s"),
        "our_sample_s": med("ours", "sample_s"),
        "sample_steps": args.sample_steps,
        "rounds": rows,
    }
    # each round measures both within seconds of each other: the ratio of a round is what a slow spell
    # of the machine (this VM's matmul rate moves 150-280 GFLOP/s from one minute to the next) leaves
    # alone; the headline is their median, the range beside it
    per_round = [
        (r["ours"]["positions"] / r["ours"]["step_s"]) / (r["theirs"]["positions"] / r["theirs"]["step_s"])
        for r in rows
    ]
    per_round_sample = [r["theirs"]["sample_s"] / r["ours"]["sample_s"] for r in rows]
    result["train_speedup"] = sorted(per_round)[len(per_round) // 2]
    result["sample_speedup"] = sorted(per_round_sample)[len(per_round_sample) // 2]
    result["train_speedup_range"] = [min(per_round), max(per_round)]
    result["sample_speedup_range"] = [min(per_round_sample), max(per_round_sample)]
    print(
        f"parameters: theirs {result['their_params'] / 1e6:.2f}M (depth {args.their_depth}), ours {result['our_params'] / 1e6:.2f}M (depth {depth})"
    )
    print("| | transfusion-pytorch | ours | ratio |\n| --- | --- | --- | --- |")
    lo, hi = result["train_speedup_range"]
    print(
        f"| training tokens/s | {result['their_tokens_per_s']:.0f} | {result['our_tokens_per_s']:.0f} | "
        f"{result['train_speedup']:.2f}x ({lo:.2f}-{hi:.2f} over {args.rounds} rounds) |"
    )
    lo, hi = result["sample_speedup_range"]
    print(
        f"| one image, {args.sample_steps} steps (s) | {result['their_sample_s']:.2f} | {result['our_sample_s']:.2f} | "
        f"{result['sample_speedup']:.2f}x ({lo:.2f}-{hi:.2f}) |"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_transfusion_pytorch.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
