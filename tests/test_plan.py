"""`transfusion plan`: parameter counts against Llama-2-7B and the model itself, the activation formula
against the bytes autograd really saves, the whole plan against a measured peak, and bad input."""

import json
import math

import pytest
import torch

from transfusion import cli, masks
from transfusion.config import PRESETS, Config, paper_7b, preset, tiny
from transfusion.layers import Block, RotaryEmbedding
from transfusion.model import Transfusion
from transfusion.training.plan import (
    GIB,
    block_bytes,
    format_plan,
    memory_plan,
    model_stats,
    precision,
    shard_numel,
)

from helpers import load_benchmark

LLAMA2_7B = 6_738_415_616  # 32,000 tokens, 32 layers of width 4096, SwiGLU 11,008, untied head


def plan_config(name: str = "7B", **train) -> Config:
    cfg = Config(model=preset(name))
    return cfg.override([f"train.{k}={v}" for k, v in train.items()])


# --- parameter counts ----------------------------------------------------------------------------
def test_7b_is_llama2_7b_plus_boi_eoi_and_the_patcher():
    cfg = paper_7b()
    assert (cfg.n_layers, cfg.dim, cfg.n_heads) == (32, 4096, 32)  # Table 2
    # Llama 2's SwiGLU width; 32,000 tokens plus BOI and EOI; 8 latent channels x 2 x 2 per patch
    assert (cfg.ffn_dim, cfg.vocab_size, cfg.patch_dim) == (11008, 32002, 32)
    # the linear patcher: timestep MLP 256 -> 4096 -> 32, patches 32 -> 4096 in and 4096 -> 32 out, with biases
    patcher = (256 * 4096 + 4096) + (4096 * 32 + 32) + (32 * 4096 + 4096) + (4096 * 32 + 32)
    assert patcher == 1_450_048
    expected = LLAMA2_7B + 2 * 2 * 4096 + patcher  # BOI and EOI: a row in the embedding and in the head
    assert model_stats(cfg)["params"] == expected == 6_739_882_048
    assert memory_plan(plan_config("7B", seq_len=4096, batch_size=1), gpus=8)["preset_params"] == expected


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_counts_like_the_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Transfusion(cfg)
    assert model_stats(cfg)["params"] == model.num_params()
    D, F, V, n = cfg.dim, cfg.ffn_dim, cfg.total_vocab, cfg.n_layers
    trunk = 2 * V * D + n * (4 * D * D + 3 * D * F + 2 * D) + D  # embedding, head, blocks, final norm
    assert model.num_params() == trunk + sum(p.numel() for p in model.patcher.parameters())
    if name in ("tiny", "small"):  # small enough to build for real: meta counts what is allocated
        assert model.num_params() == Transfusion(cfg).num_params()


def test_fsdp_shards_every_tensor_on_its_first_dimension():
    cfg = plan_config("7B", seq_len=4096, batch_size=1, parallel="fsdp", activation_checkpointing="full")
    plan = memory_plan(cfg, gpus=8, ema=True)
    # every tensor's first dimension divides by 8 except the 32,002 rows of the embedding and head (4,001 each)
    local = (6_739_882_048 - 2 * 32002 * 4096) // 8 + 2 * 4001 * 4096
    assert shard_numel(model_stats(cfg.model)["shapes"], 8) == local
    rope = 2 * 4096 * 64 * 4  # cos and sin tables, fp32, whole on every GPU
    b = plan["bytes"]
    assert (b["parameters"], b["gradients"], b["ema"]) == (4 * local + rope, 4 * local, 4 * local)
    assert b["optimizer"] == 8 * local + 4 * (2 + 32 * 9 + 1 + 8)  # a step per tensor: 8 in the patcher
    ddp = memory_plan(cfg.override(["train.parallel=ddp"]), gpus=8, ema=True)["bytes"]
    assert ddp["gradients"] == 2 * 4 * 6_739_882_048  # param.grad and DDP's bucket copy


# --- activations ---------------------------------------------------------------------------------
def saved_by_block(cfg, rows: int, L: int, mode: str) -> int:
    """Bytes one block saves for its backward (storages deduplicated, RoPE tables excluded)."""
    torch.manual_seed(0)
    block = Block(cfg).to(torch.bfloat16 if mode == "fsdp" else torch.float32)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len)(torch.arange(L).expand(rows, L))
    image = torch.zeros(rows, L, dtype=torch.long)
    image[:, 3:7] = 1
    mask = masks.dense_mask(torch.zeros(rows, L, dtype=torch.long), image)
    x = torch.randn(rows, L, cfg.dim, dtype=next(block.parameters()).dtype, requires_grad=True)
    tables = {cos.untyped_storage()._cdata, sin.untyped_storage()._cdata}
    seen = {}

    def pack(t):
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autocast("cpu", torch.bfloat16, enabled=mode != "fp32"),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        block(x, cos, sin, mask)
    return sum(n for k, n in seen.items() if k not in tables)


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize(("mode", "dtype"), [("single", "fp32"), ("single", "bf16"), ("fsdp", "bf16")])
def test_block_formula_is_what_autograd_saves(mode, dtype, kv_heads):
    """Two rows minus one row: what grows with the batch (weights and their bf16 casts do not).
    bf16 under FSDP2 is bf16 weights under autocast, as its MixedPrecisionPolicy gathers them."""
    cfg, L = tiny(n_kv_heads=kv_heads), 40
    kind = "fp32" if dtype == "fp32" else mode
    measured = saved_by_block(cfg, 2, L, kind) - saved_by_block(cfg, 1, L, kind)
    assert measured == L * block_bytes(cfg, precision(dtype, mode), "sdpa", L)
    D, F, H = cfg.dim, cfg.ffn_dim, cfg.n_heads
    hand = {  # bytes per position, spelled out (SDPA repeats grouped k/v heads to D)
        "fp32": 2 * (8 * D + 4) + 4 * (D + 2 * D + 2 * D) + 4 * H + 4 * L + 4 * (D + 4 * F),
        "single": 2 * (8 * D + 4) + 2 * (3 * D + 2 * D + 2 * D) + 4 * H + 2 * L + 2 * (2 * D + 4 * F),
        "fsdp": 2 * (6 * D + 4) + 2 * (D + 2 * D + 2 * D) + 4 * H + 2 * L + 2 * (D + 4 * F),
    }[kind]
    assert measured == L * hand


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_plan_is_within_20_percent_of_a_measured_training_step(checkpointing):
    check = load_benchmark("plan_check")
    cfg = check.build_config("tiny", seq_len=256, rows=4, checkpointing=checkpointing, dtype="fp32")
    measured = check.measure_peak(cfg)["Total"]
    predicted = memory_plan(cfg, gpus=1)["bytes"]["total"]
    assert 0.8 <= predicted / measured <= 1.2, (predicted, measured)


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block():
    cfg = plan_config("0.37B", seq_len=2048, batch_size=1, dtype="fp32", activation_checkpointing="none")
    none = memory_plan(cfg, gpus=1)
    full = memory_plan(cfg.override(["train.activation_checkpointing=full"]), gpus=1)
    half = memory_plan(cfg.override(["train.activation_checkpointing=every:2"]), gpus=1)
    assert (full["checkpointed_blocks"], half["checkpointed_blocks"]) == (24, 12)
    A = block_bytes(cfg.model, precision("fp32", "single"), "flex", 2048) * 2048
    kept = 4 * 1024 * 2048  # a block's fp32 input
    # the backward start holds every block: 24 A without checkpoints, 24 inputs with them
    assert none["bytes"]["activations"] - full["bytes"]["activations"] == pytest.approx(
        24 * (A - kept), rel=0.02
    )
    assert half["bytes"]["activations"] == pytest.approx(
        (none["bytes"]["activations"] + full["bytes"]["activations"]) / 2, rel=0.02
    )


def test_the_largest_micro_batch_is_the_largest_that_fits():
    cfg = plan_config("1.4B", seq_len=4096, batch_size=1, activation_checkpointing="every:2")
    plan = memory_plan(cfg, gpus=1, gpu_memory=80)
    k = plan["max_micro_batch"]
    assert k >= 1
    at = lambda rows: memory_plan(cfg.override([f"train.batch_size={rows}"]), 1, 80)["gib"]["total"]  # noqa: E731
    assert at(k) <= 78 < at(k + 1)  # 80 GiB less the 2 GiB reserve
    assert plan["gib"]["total"] + (k - 1) * plan["gib"]["per_row"] == pytest.approx(at(k))


# --- the command ---------------------------------------------------------------------------------
def test_command_prints_the_plan_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--preset", "7B", "--gpus", "8", "--gpu-memory", "80", "--seq-len", "4096",
            "--micro-batch", "1", "--activation-checkpointing", "full", "--parallel", "fsdp", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    written = json.loads(out.read_text())
    cfg = plan_config("7B", seq_len=4096, batch_size=1, activation_checkpointing="full", parallel="fsdp")
    assert written == json.loads(json.dumps(memory_plan(cfg, 8, 80)))
    assert written["mode"] == "fsdp" and written["dtype"] == "bf16" and written["fits"]
    assert sum(written["bytes"][k] for k in ("parameters", "gradients", "optimizer", "ema", "activations",
                                             "transient")) == written["bytes"]["total"]  # fmt: skip
    assert f"{written['gib']['total']:.2f}" in text and "activation model:" in text
    assert f"largest micro-batch that fits: {written['max_micro_batch']} row(s)" in text
    assert format_plan(written) in text


def test_a_plan_that_does_not_fit_says_what_would(capsys):
    assert cli.main(["plan", "--preset", "7B", "--gpus", "8", "--seq-len", "4096", "--micro-batch", "1"]) == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "hint: with --parallel fsdp:" in text


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--config", "--set", "--gpus", "--gpu-memory", "--reserve", "--seq-len",
                 "--micro-batch", "--activation-checkpointing", "--parallel", "--dtype", "--attention",
                 "--ema", "--json", "--out"):  # fmt: skip
        assert flag in text
    assert "Activation model: per block and position, the tensors autograd saves" in " ".join(text.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "7B", "--gpus", "0"], "--gpus must be"),
        (["--preset", "7B", "--gpu-memory", "-80"], "--gpu-memory must be > 0"),
        (["--preset", "7B", "--seq-len", "8192"], "above model.max_seq_len 4096"),
        (["--preset", "9B"], "unknown preset '9B'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", *args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not out.exists() and captured.out == ""


def test_a_7b_plan_is_instant():
    """The 7B model is never allocated: building it on the meta device is the whole cost."""
    cfg = plan_config("7B", seq_len=4096, batch_size=1, parallel="fsdp")
    plan = memory_plan(cfg, gpus=8, gpu_memory=80)
    assert math.isclose(plan["gib"]["parameters"] * GIB, plan["bytes"]["parameters"])
