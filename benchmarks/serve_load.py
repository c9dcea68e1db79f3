"""Load on `transfusion serve`: N concurrent clients against the same requests one after another.

    python benchmarks/serve_load.py [--checkpoint RUN] [--clients 16 --steps 50 --memory-requests 500]

Starts ``transfusion serve`` on the checkpoint (default: a random-weight ``small`` model written to a
temporary directory: speed does not depend on the weights) in a subprocess on a free port, then
measures:

- text to image: ``--clients`` requests of one image (``--steps`` denoising steps, guidance 3) one
  after another, then all at once: total time, images/s, median and 95th-percentile latency; and all
  at once streamed (server-sent events, previews every 10 steps): the time to the first progress event;
- text: the same for ``--clients`` interleaved-generation requests of ``--tokens`` new tokens (no
  images), in tokens/s;
- a late request: ``--clients`` - 1 text-to-image requests running, one more arrives; its time to
  first progress event against the server's tick time (``/v1/info``) and a prefill;
- memory: the server's resident memory after 50 requests and after ``--memory-requests``.

Prints a markdown table and writes ``serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def make_checkpoint(root: Path) -> Path:
    import torch

    from transfusion.checkpoint import save_model
    from transfusion.config import Config, VAEConfig, small
    from transfusion.model import Transfusion
    from transfusion.tokenizer import ByteTokenizer
    from transfusion.vae import KLVAE, save_vae

    torch.manual_seed(0)
    cfg = Config(model=small(), vae=VAEConfig(image_size=32, base_channels=16))
    save_model(root, Transfusion(cfg.model), cfg, ByteTokenizer(), {"step": 0, "vae": "vae"})
    save_vae(KLVAE(cfg.vae).eval(), root / "vae")
    return root


async def one(client: httpx.AsyncClient, path: str, body: dict, stream: bool = False) -> dict:
    """A request: its latency, the time to its first progress event (streamed requests) and the text
    it wrote (characters)."""
    t0 = time.perf_counter()
    first, outputs = None, []
    if not stream:
        r = await client.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
        outputs = r.json().get("outputs", [])
    else:
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{path}: {r.status_code} {await r.aread()}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["event"] in ("started", "step", "text") and first is None:
                    first = time.perf_counter() - t0
                if event["event"] == "done":
                    outputs = event.get("outputs", [])
    tokens = sum(len(s["text"]) for out in outputs for s in out if s["type"] == "text")
    return {"latency": time.perf_counter() - t0, "first_event": first, "tokens": tokens}


async def run_set(url: str, path: str, bodies: list[dict], together: bool, stream: bool = False) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        t0 = time.perf_counter()
        if together:
            rows = await asyncio.gather(*(one(client, path, b, stream) for b in bodies))
        else:
            rows = [await one(client, path, b, stream) for b in bodies]
        total = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in rows)
    firsts = [r["first_event"] for r in rows if r["first_event"] is not None]
    return {"total_s": total, "median_s": statistics.median(lat), "p95_s": lat[max(0, round(0.95 * len(lat)) - 1)],
            "first_event_median_s": statistics.median(firsts) if firsts else None,
            "per_s": len(rows) / total, "tokens_per_s": sum(r["tokens"] for r in rows) / total}  # fmt: skip


async def late_arrival(url: str, clients: int, body: dict) -> dict:
    """``clients`` - 1 requests running, then one more: its time to the first progress event, and the
    server's median tick time over the last 20 ticks at that moment."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        running = [
            asyncio.create_task(one(client, "/v1/images", {**body, "seed": i})) for i in range(clients - 1)
        ]
        while (await client.get("/v1/info")).json()["load"]["active_rows"] < clients - 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # well into denoising: the last 20 ticks all had the full batch
        t0 = time.perf_counter()
        async with client.stream("POST", "/v1/images", json={**body, "seed": 999, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["event"] in ("started", "step"):
                    first = time.perf_counter() - t0
                    break
        tick = (await client.get("/v1/info")).json()["load"]["tick_ms"] / 1000
        await asyncio.gather(*running)
    return {"first_event_s": first, "tick_s": tick}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def memory(url: str, pid: int, total: int, clients: int, body: dict) -> dict:
    marks = {}
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        done = 0
        while done < total:
            n = min(clients, total - done)
            await asyncio.gather(*(one(client, "/v1/images", {**body, "seed": done + i}) for i in range(n)))
            done += n
            if done >= 50 and "after_50_mb" not in marks:
                marks["after_50_mb"] = rss_mb(pid)
    marks[f"after_{total}_mb"] = rss_mb(pid)
    return marks


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", default=None, help="a checkpoint or run directory (default: a random small model)"
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per image (default 50)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per text request (default 32)")
    p.add_argument(
        "--memory-requests",
        type=int,
        default=500,
        help="requests before the last memory reading (default 500)",
    )
    p.add_argument("--device", default="cpu", help="the server's device (default cpu)")
    p.add_argument("--out", default="serve-load", help="directory for serve_load.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(make_checkpoint(Path(tmp) / "small"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "transfusion", "serve", "--checkpoint", ckpt, "--port", str(port),
               "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients), "--device", args.device]  # fmt: skip
        server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    httpx.get(f"{url}/v1/info", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            image = {
                "prompt": "a red circle to the left of a blue square",
                "steps": args.steps,
                "guidance": 3.0,
            }
            text = {
                "segments": [{"text": "once upon a time"}],
                "max_new_tokens": args.tokens,
                "max_images": 0,
            }
            images = [{**image, "seed": i} for i in range(args.clients)]
            texts = [{**text, "seed": i} for i in range(args.clients)]
            result = {
                "images_one_by_one": asyncio.run(run_set(url, "/v1/images", images, False)),
                "images_together": asyncio.run(run_set(url, "/v1/images", images, True)),
                "text_one_by_one": asyncio.run(run_set(url, "/v1/generate", texts, False)),
                "text_together": asyncio.run(run_set(url, "/v1/generate", texts, True)),
                "images_together_streamed": asyncio.run(
                    run_set(url, "/v1/images", images, True, stream=True)
                ),
                "late": asyncio.run(late_arrival(url, args.clients, image)),
                "memory": asyncio.run(
                    memory(url, server.pid, args.memory_requests, args.clients, {**image, "steps": 10})
                ),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(result, args)


def report(r: dict, args: argparse.Namespace) -> None:
    print(f"`transfusion serve` ({args.device}), {args.clients} clients, {args.steps} denoising steps with guidance 3, "
          f"{args.tokens} tokens per text request; load {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(
        "| requests | total (s) | per second | median latency (s) | p95 latency (s) | first event, median (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for key, name, unit in (("images_one_by_one", "images, one after another", "images"),
                            ("images_together", "images, all at once", "images"),
                            ("text_one_by_one", "text, one after another", "tokens"),
                            ("text_together", "text, all at once", "tokens"),
                            ("images_together_streamed", "images, all at once, streamed (previews every 10 steps)", "images")):  # fmt: skip
        x = r[key]
        rate = x["per_s"] if unit == "images" else x["tokens_per_s"]
        first = "-" if x["first_event_median_s"] is None else f"{x['first_event_median_s']:.3f}"
        print(
            f"| {name} | {x['total_s']:.1f} | {rate:,.1f} {unit} | {x['median_s']:.2f} | {x['p95_s']:.2f} | {first} |"
        )
    speedup = r["images_one_by_one"]["total_s"] / r["images_together"]["total_s"]
    text_speedup = r["text_one_by_one"]["total_s"] / r["text_together"]["total_s"]
    late = r["late"]
    print(f"\nall at once: images {speedup:.2f}x faster in total, text {text_speedup:.2f}x; a request arriving while "
          f"{args.clients - 1} run: first event after {late['first_event_s'] * 1000:.0f} ms (a tick takes "
          f"{late['tick_s'] * 1000:.0f} ms); resident memory {json.dumps(r['memory'])}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(
        json.dumps({**r, "speedup_images": speedup, "speedup_text": text_speedup}, indent=2)
    )


if __name__ == "__main__":
    main()
