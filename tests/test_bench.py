"""Smoke test of the benchmark script: it runs, prints a table and writes JSON (no timing asserted)."""

import json

from transfusion import cli


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli.main(["bench", "--configs", "tiny", "--repeat", "1", "--batch-size", "2", "--seq-len", "64",
                     "--out", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "matmul peak" in table and "tiny" in table
    result = json.loads((out / "bench.json").read_text())
    row = result["rows"][0]
    for key in (
        "tokens_per_s",
        "mfu",
        "decode_tokens_per_s",
        "image_s_50steps_cfg",
        "denoise_step_ms_prefix1024",
    ):
        assert row[key] > 0, key
    assert result["machine"]["threads"] >= 1 and row["attention"] in ("sdpa", "flex")
