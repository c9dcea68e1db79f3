"""Adapting a trained model: fine-tuning from a checkpoint (full or LoRA), the editing data, and edits
through every door (Python, `generate`, `/v1/images/edits`, OpenAI's client, per-row adapters)."""

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transfusion import cli, lora
from transfusion.checkpoint import load_model, read_weights, resolve_checkpoint
from transfusion.config import Config, load_config
from transfusion.data.edits import EDIT_KINDS, HELD_OUT, ShapeEditsDataset, edit_eval_items, judge_edit
from transfusion.data.pairing import pair
from transfusion.diffusion import make_schedule
from transfusion.evaluation.scenes import detect_scene
from transfusion.generate import Decoder, GenerationConfig
from transfusion.losses import noised, training_loss
from transfusion.pipeline import Pipeline
from transfusion.sequence import IGNORE, Image, Sample, Specials, Text, pack
from transfusion.tokenizer import ByteTokenizer
from transfusion.training.loop import resolve_text_side, start_run

TRAIN = ["--set", "train.device=cpu", "--set", "train.eval_every=0", "--set", "train.warmup_steps=1",
         "--set", "train.batch_size=4", "--set", "train.seq_len=96", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny model trained a few steps with an EMA: the checkpoint everything here adapts."""
    out = tmp_path_factory.mktemp("adapt") / "base"
    args = ["train", "--out", str(out), "--preset", "tiny", "--vae", "random", "--steps", "6",
            "--set", "train.ema_decay=0.5", "--set", "train.lr=3e-3", *TRAIN]  # fmt: skip
    assert cli.main(args) == 0
    return out


def lora_run(base: Path, out: Path, steps: int = 4, *more: str) -> Path:
    args = ["train", "--out", str(out), "--init-checkpoint", str(base), "--data", "shape-edits", "--lora-rank", "4",
            "--steps", str(steps), "--set", "train.ema_decay=0.5", "--set", "train.lr=1e-2", *TRAIN, *more]  # fmt: skip
    assert cli.main(args) == 0
    return out


def with_random_b(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def edit_batch(model_cfg, n: int = 3) -> object:
    """Packed edit samples with random latents: image (condition), instruction, image."""
    tok, g = ByteTokenizer(), torch.Generator().manual_seed(1)
    shape = (model_cfg.latent_channels, model_cfg.latent_size, model_cfg.latent_size)
    samples = [Sample([Image(torch.randn(shape, generator=g), condition=True), Text(tok.encode(f"make it {i}")),
                       Image(torch.randn(shape, generator=g), seed=i)], text_loss=False) for i in range(n)]  # fmt: skip
    return pack(samples, 64, Specials.of(tok), model_cfg.patches_per_image)


# --- fine-tuning from a checkpoint ------------------------------------------------------------------------
def test_init_checkpoint_starts_from_the_weights_and_ema_with_a_fresh_run(base, tmp_path, capsys):
    latest = resolve_checkpoint(base)
    meta = json.loads((latest / "meta.json").read_text())
    raw, ema = read_weights(latest, meta, use_ema=False)[1], read_weights(latest, meta, use_ema=True)[1]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the two differ: the test can tell them apart
    cfg = Config()
    cfg.train.init_checkpoint, cfg.train.ema_decay, cfg.train.device = str(base), 0.9, "cpu"
    cfg.data.source = "shape-edits"
    run = start_run(resolve_text_side(cfg), tmp_path / "ft", None, False)
    assert run.cfg.model == load_config(base / "config.json").model and run.cfg.data.image_size == 16
    state = run.parallel.model.state_dict()
    assert all(torch.equal(state[k], raw[k]) for k in raw)
    assert all(torch.equal(run.ema[k], ema[k]) for k in ema)
    assert run.step == 0 and not run.optimizer.state  # a fresh optimizer and schedule
    assert (tmp_path / "ft" / "vae" / "vae.safetensors").is_file()  # the checkpoint's VAE came with it
    # a setting that would change the architecture is one line, before anything is written
    bad = ["train", "--out", str(tmp_path / "bad"), "--init-checkpoint", str(base), *TRAIN]
    assert cli.main([*bad, "--set", "model.n_layers=5"]) == 2
    assert "model.n_layers=5 would change the architecture" in capsys.readouterr().err
    assert cli.main([*bad, "--preset", "tiny"]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # full fine-tuning on the editing data trains and lowers the loss
    out = tmp_path / "full"
    assert cli.main(["train", "--out", str(out), "--init-checkpoint", str(base), "--data", "shape-edits", "--steps",
                     "12", "--set", "train.lr=3e-3", "--set", "train.log_every=1", *TRAIN]) == 0  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["image_loss"] < lines[0]["image_loss"]


# --- LoRA -----------------------------------------------------------------------------------------------
def test_a_fresh_adapter_changes_nothing(base):
    loaded = load_model(base)
    model = loaded.model
    adapted = copy.deepcopy(model)
    lora.add_adapter(adapted, "default", 4)
    batch = edit_batch(model.cfg)
    schedule = make_schedule(loaded.config.diffusion)
    noisy, _ = noised(batch, schedule, loaded.config.diffusion, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(noisy), adapted(noisy)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.image_pred, b.image_pred)
    gen = GenerationConfig(steps=4, force_image=True, stop_after_image=True)
    tok = loaded.tokenizer
    x = Decoder(model, tok, loaded.config.diffusion).generate([["a red circle"]], gen, [3])
    y = Decoder(adapted, tok, loaded.config.diffusion).generate([["a red circle"]], gen, [3])
    assert torch.equal(x[0][0], y[0][0])


def test_lora_trains_only_the_adapter_and_saves_it_apart(base, tmp_path):
    out = lora_run(base, tmp_path / "lora")
    latest = resolve_checkpoint(out)
    saved = load_file(latest / "model.safetensors")
    assert saved and all(lora.is_adapter_key(k) for k in saved)  # the base is never written again
    unmerged = load_model(out, merge=False).model
    base_weights = load_model(base).model.state_dict()  # the base is the checkpoint's inference weights
    state = unmerged.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_weights.items())  # bit-identical after training
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if ".lora_B." in k)  # the adapter moved
    # the adapter directory: PEFT's names, the base's identity, a small file
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    identity = lora.read_adapter(out / "adapter")[0]["transfusion_base"]  # in the weights file's header
    assert identity["weights_hash"] == lora.weights_hash(base_weights) and "transfusion_base" not in config
    keys = load_file(out / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.layers.0.attn.wq.lora_A.weight" in keys
    # resumed half-way, the adapter ends where a straight run ends
    half = tmp_path / "half"
    lora_run(base, half, 2)
    assert cli.main(["train", "--out", str(half), "--resume", "--steps", "4", "--no-progress"]) == 0
    a, b = load_file(resolve_checkpoint(half) / "ema.safetensors"), load_file(latest / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_export_equals_base_plus_adapter_and_a_wrong_base_is_refused(base, tmp_path):
    out = lora_run(base, tmp_path / "lora")
    adapter = out / "adapter"
    assert (
        cli.main(
            [
                "export",
                "--checkpoint",
                str(base),
                "--merge-adapter",
                str(adapter),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    merged = load_model(tmp_path / "m").model.state_dict()
    base_weights = load_model(base).model.state_dict()
    config, tensors = lora.read_adapter(adapter)
    scale = config["lora_alpha"] / config["r"]
    for module in config["target_modules"]:
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        want = base_weights[f"{module}.weight"] + scale * b @ a
        torch.testing.assert_close(merged[f"{module}.weight"], want, atol=1e-5, rtol=0)
    untouched = [k for k in base_weights if not any(k.startswith(m + ".") for m in config["target_modules"])]
    assert untouched and all(torch.equal(merged[k], base_weights[k]) for k in untouched)
    # the LoRA run's own checkpoint loads as the same merged model
    assert all(torch.equal(v, merged[k]) for k, v in load_model(out).model.state_dict().items())
    # onto other weights (the raw weights, not the EMA the adapter was trained on): one line
    with pytest.raises(ValueError, match="was trained on .* load it onto that checkpoint"):
        load_model(base, use_ema=False, adapters=[adapter])


def test_peft_loads_our_adapters(base, tmp_path):
    peft = pytest.importorskip("peft")
    out = lora_run(base, tmp_path / "lora")
    ours = load_model(base, adapters=[out / "adapter"], merge=False).model
    with_random_b(ours)  # a visible adapter, saved again in PEFT's format
    lora.save_adapter(tmp_path / "ad", ours.state_dict(), rank=4, alpha=4.0,
                      modules=sorted(lora.lora_layers(ours)), base={})  # fmt: skip
    theirs = peft.PeftModel.from_pretrained(load_model(base).model, str(tmp_path / "ad"))
    batch = edit_batch(ours.cfg)
    batch = batch.replace(timesteps=torch.full_like(batch.timesteps, 10))
    with torch.no_grad():
        a, b = ours(batch), theirs(batch)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.image_pred, b.image_pred, atol=1e-5, rtol=0)
    assert not torch.allclose(a.logits, load_model(base).model(batch).logits)  # the adapter does something


# --- the editing data ----------------------------------------------------------------------------------------
def test_the_editing_source_holds_five_kinds_and_keeps_its_held_out_combinations_out_of_training():
    train_items = ShapeEditsDataset(16, seed=0, split="train")
    seen = [train_items[i] for i in range(300)]
    assert Counter(r.meta["kind"] for r in seen) == {k: 60 for k in EDIT_KINDS}
    assert not any(r.meta["held_out"] for r in seen)
    evals = edit_eval_items(6, image_size=32)
    assert {r.meta["kind"] for r in evals if r.meta["held_out"]} == set(EDIT_KINDS)
    assert sum(r.meta["held_out"] for r in evals) == 15 and all(r.meta["kind"] in HELD_OUT for r in evals)

    def combo(meta: dict) -> tuple:  # what HELD_OUT lists, read back from the item's own description
        e, scene = meta["edit"], meta["scene"]["objects"]
        if e["kind"] == "swap":
            return scene[e["targets"][0]]["shape"], scene[e["targets"][1]]["shape"]
        return e["shape"], e["direction"] if e["kind"] == "move" else e["color"]

    assert not any(combo(r.meta) in HELD_OUT[r.meta["kind"]] for r in seen)
    assert all((combo(r.meta) in HELD_OUT[r.meta["kind"]]) == r.meta["held_out"] for r in evals)
    # the judge: the target scene is the edit, the input returned unchanged is not (but keeps the rest)
    for r in evals:
        assert judge_edit(detect_scene(r.target), r.meta) == {"edit": True, "kept": True, "exact": True}
        unchanged = judge_edit(detect_scene(r.image), r.meta)
        assert unchanged["edit"] is False and unchanged["kept"] is True
    # the paper's sequence: the input clean without a loss, the instruction, the output
    import random

    sample = pair(seen[0], ByteTokenizer().encode, Config().data, random.Random(0))
    kinds = [type(s).__name__ for s in sample.segments]
    assert kinds == ["Image", "Text", "Image"] and sample.segments[0].condition and sample.segments[0].t == 0
    assert not sample.text_loss
    # packed beside a caption in one row, the edit has no text targets and the caption keeps its own
    tok = ByteTokenizer()
    for seg in sample.segments:
        if isinstance(seg, Image):
            seg.latent = torch.zeros(8, 4, 4)
    row = pack([sample, Sample([Text(tok.encode("a red circle"))])], 96, Specials.of(tok), 4)
    assert row.ids.shape[0] == 1 and (row.text_targets != IGNORE).sum() == len("a red circle") + 1  # + EOS


def test_the_input_image_stays_clean_and_carries_no_loss():
    cfg = Config()
    from transfusion.config import tiny
    from transfusion.model import Transfusion

    torch.manual_seed(0)
    model = Transfusion(tiny())
    batch = edit_batch(model.cfg)
    assert batch.conditions.tolist() == [True, False] * 3
    assert (batch.text_targets == IGNORE).all()  # the loss is on the output image only (the paper's 4.4)
    schedule = make_schedule(cfg.diffusion)
    noisy, target = noised(batch, schedule, cfg.diffusion, torch.Generator().manual_seed(0))
    assert torch.equal(noisy.latents[0::2], batch.latents[0::2]) and (noisy.timesteps[0::2] == 0).all()
    assert not torch.equal(noisy.latents[1::2], batch.latents[1::2])
    losses = training_loss(model, batch, schedule, cfg.diffusion, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model(noisy).image_pred
    want = (pred[1::2] - target[1::2]).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(losses.image, want)


# --- editing through every door ------------------------------------------------------------------------------
def test_edits_from_python_generate_and_per_row_adapters_agree(base, tmp_path):
    out = lora_run(base, tmp_path / "lora")
    pipe = Pipeline.from_pretrained(out, "cpu")
    item = edit_eval_items(1, image_size=16)[0]
    item.image.save(tmp_path / "in.png")
    edits = pipe.edit(
        tmp_path / "in.png", item.text, n=2, steps=4, seed=7, output_type="latent", progress=False
    )
    assert cli.main(["generate", "--checkpoint", str(out), "--image", str(tmp_path / "in.png"), "--prompt", item.text,
                     "--num-images", "2", "--steps", "4", "--seed", "7", "--out", str(tmp_path / "gen")]) == 0  # fmt: skip
    pngs = sorted((tmp_path / "gen").glob("*.png"))
    assert [p.read_bytes() for p in pngs] == [
        save_png(pipe, z, tmp_path / f"e{i}") for i, z in enumerate(edits)
    ]
    # two adapters and the base in one batch: each row as its merged model draws it alone
    base_model = load_model(base).model
    two = copy.deepcopy(base_model)
    lora.add_adapter(two, "a", 4)
    lora.add_adapter(two, "b", 2, targets=("wq", "up"))
    with_random_b(two)
    names = ["a", None, "b", "a"]
    tok, dcfg = pipe.tokenizer, pipe.config.diffusion
    gen = GenerationConfig(steps=3, cfg_scale=2.0, max_new_tokens=4, max_images=1, temperature=0.0)
    prompts = [["a red circle"], ["two blue squares"], [pipe.encode([item.image])[0], "make it"], ["x"]]
    force = [True, True, True, False]
    mixed = Decoder(two, tok, dcfg).generate(prompts, gen, [1, 2, 3, 4], force, adapters=names)
    for row, name in enumerate(names):
        alone = only(two, name)
        want = Decoder(alone, tok, dcfg).generate([prompts[row]], gen, [row + 1], [force[row]])[0]
        got = mixed[row]
        assert [type(s) for s in got] == [type(s) for s in want]
        for g, w in zip(got, want):
            assert g == w if isinstance(w, str) else torch.allclose(g, w, atol=1e-4), (row, name)


def only(model: torch.nn.Module, name: str | None) -> torch.nn.Module:
    """A copy of ``model`` with adapter ``name`` merged into its weights and the others dropped."""
    alone = copy.deepcopy(model)
    for layer in lora.lora_layers(alone).values():
        for other in [n for n in layer.lora_A if n != name]:
            del layer.lora_A[other], layer.lora_B[other]
            layer.scaling.pop(other)
    return lora.merge(alone)


def save_png(pipe: Pipeline, latent: torch.Tensor, stem: Path) -> bytes:
    pipe.to_pil([latent])[0].save(stem.with_suffix(".png"))
    return stem.with_suffix(".png").read_bytes()


def test_the_edits_route_equals_generate_and_openai_clients_use_it(base, tmp_path):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image as PILImage
    from test_serve import on_socket

    from transfusion.serve.app import ServeLimits, make_app
    from transfusion.serve.worker import EngineLoop

    out = lora_run(base, tmp_path / "lora")
    pipe = Pipeline.from_pretrained(base, "cpu", adapters={"edit": out / "adapter"})
    loop = EngineLoop(pipe, 4, 8).start()
    app = make_app(loop, ServeLimits(preview_every=2))
    item = edit_eval_items(1, image_size=16)[0]
    buf = io.BytesIO()
    item.image.save(buf, format="PNG")
    try:
        with TestClient(app) as client:
            r = client.post("/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                            data={"prompt": item.text, "n": "2", "seed": "5", "num_inference_steps": "3", "model": "edit"})  # fmt: skip
            assert r.status_code == 200, r.text
            assert client.get("/v1/info").json()["adapters"] == ["edit"]
            bad = client.post("/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                              data={"prompt": item.text, "model": "nope"})  # fmt: skip
            assert bad.status_code == 400 and "'edit'" in bad.json()["error"]["message"]
        want = Pipeline.from_pretrained(out, "cpu").edit(
            item.image, item.text, n=2, steps=3, seed=5, progress=False
        )
        import base64

        import numpy as np

        got = [np.asarray(PILImage.open(io.BytesIO(base64.b64decode(d["b64_json"]))), dtype=int)
               for d in r.json()["data"]]  # fmt: skip
        assert all(np.abs(g - np.asarray(w, dtype=int)).max() <= 1 for g, w in zip(got, want))
        # OpenAI's own client, unchanged, against the server on a socket
        with on_socket(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            answer = client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt=item.text, n=1,
                                        model="edit", response_format="b64_json", extra_body={"seed": 5, "num_inference_steps": 3})  # fmt: skip
            served = base64.b64decode(answer.data[0].b64_json)
            assert np.abs(np.asarray(PILImage.open(io.BytesIO(served)), dtype=int) - got[0]).max() <= 1
    finally:
        loop.stop()


# --- many processes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 4])
def test_fine_tuning_on_two_fsdp_ranks_equals_one_process(base, tmp_path, rank):
    """Full fine-tuning and LoRA under FSDP2 on 2 gloo ranks: the losses and the weights of one process
    reading the same global batch (2 data streams); the full run's sharded checkpoint starts another run."""
    import os
    import sys

    from test_distributed import ranks

    args = ["--init-checkpoint", str(base), "--data", "shape-edits", "--steps", "3", "--set", "train.lr=3e-3",
            "--set", "train.log_every=1", "--set", "train.ckpt_every=3", *TRAIN,
            *(["--lora-rank", str(rank)] if rank else [])]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "transfusion",
           "train", "--out", str(tmp_path / "two"), "--set", "train.parallel=fsdp", *args]  # fmt: skip
    ranks(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path / "two")
    assert cli.main(["train", "--out", str(tmp_path / "one"), "--set", "train.grad_accum=2", *args]) == 0
    losses = [[(x["text_loss"], x["image_loss"]) for x in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]
              for d in ("two", "one")]  # fmt: skip
    assert len(losses[0]) == 3 and max(abs(a - b) for g, w in zip(*losses) for a, b in zip(g, w)) < 1e-5, (
        losses
    )
    two, one = (
        load_model(tmp_path / "two").model.state_dict(),
        load_model(tmp_path / "one").model.state_dict(),
    )
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=1e-4)
    if rank:
        assert (tmp_path / "two" / "adapter" / lora.WEIGHTS_FILE).is_file()  # gathered from the shards
        return
    sharded = resolve_checkpoint(tmp_path / "two")
    assert (sharded / "shards").is_dir()
    cfg = Config()
    cfg.train.init_checkpoint, cfg.train.device, cfg.data.source = str(tmp_path / "two"), "cpu", "shape-edits"
    run = start_run(resolve_text_side(cfg), tmp_path / "three", None, False)
    meta = json.loads((sharded / "meta.json").read_text())
    raw = read_weights(sharded, meta, use_ema=False)[1]
    assert all(torch.equal(run.parallel.model.state_dict()[k], v) for k, v in raw.items())


def test_the_editing_experiment_reports_arms_baselines_and_costs(base, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", "edit", "--from", str(base), "--examples", "40", "--arms", "full", "lora4", "--seeds", "1",
            "--steps", "2", "--edits-per-kind", "2", "--sample-steps", "2", "--captions", "2", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    unchanged = summary["base"]["unchanged"]["all"]
    assert unchanged["edit"] == 0.0 and unchanged["kept"] == 1.0  # the input returned as it is
    full, adapted = summary["arms"]["full-n40"], summary["arms"]["lora4-n40"]
    assert full["trained_share"]["median"] == 1.0 and 0 < adapted["trained_share"]["median"] < 0.2
    assert adapted["file_share"]["median"] < 0.5 and adapted["peak_rss_mb"]["median"] > 0
    assert all(0 <= full[f"{k}.edit"]["median"] <= 1 for k in EDIT_KINDS)
    assert any("lora4" in t["target"] for t in summary["targets"])
    assert (out / "edit.html").is_file() and (out / "grid-lora4-n40.png").is_file()
    # resumed with another arm: the runs already done are not trained again
    before = (out / "runs" / "full-n40-s0" / "metrics.jsonl").stat().st_mtime
    assert cli.main([*args[:7], "full", "--seeds", "1", *args[11:], "--resume"]) == 0
    assert (out / "runs" / "full-n40-s0" / "metrics.jsonl").stat().st_mtime == before
    assert cli.main([*args[:-2], "--out", str(out), "--resume", "--steps", "3"]) == 2
    assert "ran with steps=2" in capsys.readouterr().err


def test_lora_modality_picks_mot_copies_and_the_patcher_travels_with_the_adapter(base, tmp_path):
    from transfusion.config import tiny
    from transfusion.model import Transfusion

    mot = Transfusion(tiny(modality_weights="mot"))
    image_only = lora.target_linears(mot, ("wq", "down"), "image")
    assert image_only == [f"layers.{i}.{m}.image" for i in (0, 1) for m in ("attn.wq", "mlp.down")]
    assert len(lora.target_linears(mot, lora.DEFAULT_TARGETS, "both")) == 2 * 7 * 2
    with pytest.raises(ValueError, match="not linear layers of the blocks"):
        lora.target_linears(mot, ("wz",), "both")
    # with train.lora_patcher the patcher trains too; the adapter carries it, and loading applies it
    out = lora_run(base, tmp_path / "lora", 3, "--set", "train.lora_patcher=true")
    config, tensors = lora.read_adapter(out / "adapter")
    assert config["modules_to_save"] == ["patcher"] and any(
        k.startswith("base_model.model.patcher.") for k in tensors
    )
    trained = load_model(out).model.state_dict()
    before = load_model(base).model.state_dict()
    changed = [k for k in before if k.startswith("patcher.") and not torch.equal(trained[k], before[k])]
    assert changed  # the patcher moved, and the run's checkpoint and the adapter agree on it
    via_adapter = load_model(base, adapters=[out / "adapter"]).model.state_dict()
    assert all(torch.equal(via_adapter[k], trained[k]) for k in trained)


def test_serve_adapter_option_needs_a_name_and_a_directory(base, capsys):
    pytest.importorskip("fastapi")
    assert cli.main(["serve", "--checkpoint", str(base), "--adapter", "no-equals-sign"]) == 2
    assert "give NAME=DIR" in capsys.readouterr().err
    assert cli.main(["serve", "--checkpoint", str(base), "--adapter", "base=x"]) == 2
    assert "the name 'base' is taken" in capsys.readouterr().err
    assert cli.main(["serve", "--checkpoint", str(base), "--adapter", "edit=missing"]) == 2
    assert "missing is not an adapter directory" in capsys.readouterr().err
