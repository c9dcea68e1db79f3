"""One screen of what ``benchmarks/gpu.sh`` measured, as a markdown table to paste into
``benchmarks/RESULTS.md``: ``python benchmarks/gpu_summary.py OUT`` (OUT: gpu.sh's directory).

Reads the JSON each step wrote; a step that did not run or failed shows its status from
``summary.txt`` instead of numbers, so the table never claims what was not measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def bench_rows(out: Path) -> list[str]:
    lines = []
    for name in ("0.16B", "0.16B-eager", "0.16B-fsdp", "0.16B-ac-full", "0.76B", "mot"):
        result = read(out / name / "bench.json")
        for row in (result or {}).get("rows", []):
            mem = row.get("cuda_max_alloc_mb")
            image = row.get("image_s_250steps") or row.get("image_s_50steps")
            extra = f", one image {image:.2f} s" if image else ""
            extra += (
                f", decode {row['decode_tokens_per_s']:.0f} tok/s" if row.get("decode_tokens_per_s") else ""
            )
            lines.append(
                f"| {name}: {row['config']} {row['batch']} {row['dtype']}{' compiled' if row.get('compiled') else ''} "
                f"| {row['tokens_per_s']:,.0f} tok/s, MFU {row.get('mfu', 0):.0%}, "
                f"{(mem or 0) / 1024:.1f} GiB{extra} |"
            )
    return lines


def other_rows(out: Path) -> list[str]:
    lines = []
    for ac in ("none", "full"):
        plan = read(out / f"plan-0.16B-{ac}.json")
        if plan:
            total = plan.get("bytes", {}).get("total")
            lines.append(
                f"| plan 0.16B, checkpointing {ac} | {total / 2**30:.2f} GiB per GPU |" if total else ""
            )
    save = read(out / "save_time.json")
    for row in (save or {}).get("rows", []):
        kind = "async" if row["async"] else "sync"
        lines.append(f"| checkpoint 0.16B, {kind} | training stops {row['stall_s']:.2f} s |")
    compare = read(out / "compare_transfusion_pytorch.json")
    if compare:
        lines.append(f"| side by side with transfusion-pytorch | training {compare['train_speedup']:.2f}x, "
                     f"one image {compare['sample_speedup']:.2f}x |")  # fmt: skip
    serve = read(out / "serve" / "serve_load.json")
    if serve and serve.get("speedup_images"):
        lines.append(f"| serve, 16 clients | images {serve['speedup_images']:.1f}x the one-at-a-time rate |")
    faults = read(out / "faults" / "gpu_faults.json")
    if faults:
        for parallel in ("ddp", "fsdp"):
            f = faults[parallel]
            lines.append(f"| 2 GPUs {parallel}: text-only micro-batches, NaN on rank 1 | "
                         f"{'finished' if f['ok'] else 'FAILED'} in {f['seconds']} s |")  # fmt: skip
        s = faults["step"]
        if s.get("ok"):
            lines.append(f"| 2 GPUs: accumulation 4 vs one batch; FSDP2 reduce-scatters | gradient gap "
                         f"{s['fsdp']['max_grad_diff']:.1e}; {s['fsdp']['reduce_scatters']} per step "
                         f"({s['fsdp_groups']} groups); bf16 FSDP2 vs DDP loss gap {s['bf16']['gap']:.1e} |")  # fmt: skip
    return [x for x in lines if x]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-gpu")
    status = (out / "summary.txt").read_text().splitlines() if (out / "summary.txt").is_file() else []
    machine = next(iter(read(p) or {} for p in sorted(out.glob("*/bench.json"))), {}).get("machine", {})
    print(f"GPU run of benchmarks/gpu.sh: {machine.get('cuda') or '?'}, torch {machine.get('torch', '?')}\n")
    print("| measure | result |\n| --- | --- |")
    for line in bench_rows(out) + other_rows(out):
        print(line)
    failed = [s for s in status if not s.endswith("exit 0")]
    print(f"\nsteps: {len(status)} run, not clean: {', '.join(failed) or 'none'}")


if __name__ == "__main__":
    main()
