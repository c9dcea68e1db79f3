"""The benchmark script: it runs the training step users run, reports numbers that agree with each other
and with the FLOP counter, prints the table it writes as JSON (no timing is asserted)."""

import json

import pytest

from transfusion import cli
from transfusion.bench import synthetic_batch
from transfusion.config import preset
from transfusion.flops import batch_train_flops


def test_bench_numbers_agree_with_each_other(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli.main(["bench", "--configs", "tiny", "--repeat", "1", "--batch-size", "2", "--seq-len", "64",
                     "--image-steps", "3", "--out", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    result = json.loads((out / "bench.json").read_text())
    row = result["rows"][0]
    # throughput, FLOPs and MFU are one measurement seen three ways
    sec = row["step_ms"] / 1e3
    assert row["tokens_per_s"] == pytest.approx(2 * 64 / sec, rel=1e-9)
    flops = batch_train_flops(preset("tiny"), synthetic_batch(preset("tiny"), 2, 64))
    assert row["step_gflop"] == pytest.approx(flops / 1e9, rel=1e-9) and flops > 0
    assert row["model_gflops"] == pytest.approx(flops / sec / 1e9, rel=1e-9)
    assert row["mfu"] == pytest.approx(row["model_gflops"] / result["matmul_peak_gflops"], rel=1e-9)
    # the image timings follow --image-steps; every prefix length of the denoising step is measured
    assert {"image_s_3steps", "image_s_3steps_cfg"} <= set(row) and "image_s_250steps" not in row
    assert all(
        f"denoise_step_ms_prefix{n}{s}" in row for n in (16, 256, 1024) for s in ("", "_cfg", "_4rows_cfg")
    )
    assert all(v > 0 for k, v in row.items() if k.startswith(("image_s", "denoise", "decode")))
    # the printed table is the JSON's rows
    header = next(line for line in table.splitlines() if line.startswith("config |")).split(" | ")
    values = next(line for line in table.splitlines() if line.startswith("tiny |")).split(" | ")
    assert values[header.index("batch")] == "2x64" and values[header.index("attention")] == row["attention"]
    assert "matmul peak" in table and result["machine"]["threads"] >= 1
