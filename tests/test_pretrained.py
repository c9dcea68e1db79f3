"""Starting from a pretrained LLM: tiny random Llama / Qwen2 checkpoints written by ``transformers``
load into our model with the same text logits, freeze as asked, and export back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transfusion import diffusion, losses  # noqa: E402
from transfusion.config import DiffusionConfig  # noqa: E402
from transfusion.pretrained import (  # noqa: E402
    added_token_ids,
    export_hf,
    freeze_text,
    load_pretrained,
    trainable_parameters_summary,
)
from transfusion.sequence import Image, Sample, Specials, Text, pack  # noqa: E402

from helpers import latent  # noqa: E402

WORDS = 300  # tokenizer.json's vocabulary: 4 specials + 296 words
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def write_tokenizer(directory) -> None:
    """A WordLevel tokenizer.json: <unk> <s> </s> <pad> w0 ... w295, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(WORDS - 4)])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every weight random and of order one, so that a wrong mapping cannot hide in tiny logits
    (HF initialises norms to one and biases to zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def make_hf(kind: str, directory, seed: int, **save_kw):
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=WORDS, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **TINY
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:  # Qwen2: q/k/v biases, tied embeddings, an embedding matrix padded beyond the tokenizer
        cfg = transformers.Qwen2Config(vocab_size=320, rope_theta=1e6, tie_word_embeddings=True, **TINY)
        model = transformers.Qwen2ForCausalLM(cfg)
    randomise(model, seed)
    model.save_pretrained(directory, **save_kw)
    write_tokenizer(directory)
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return make_hf("llama", d, 1), d


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    return make_hf("qwen2", d, 2), d


def text_batch(ids: list[list[int]], tokenizer, cfg):
    """Rows of text only, no BOS/EOS: the ids are exactly the HF input_ids."""
    samples = [Sample([Text(row)], bos=False, eos=False) for row in ids]
    return pack(samples, len(ids[0]), Specials.of(tokenizer), cfg.patches_per_image, one_per_row=True)


def mixed_batch(tok, cfg, gen: torch.Generator):
    """Two samples in one packed row: text, image, text; a noise-limited image then text."""
    samples = [
        Sample([Text(tok.encode("w1 w2 w3")), Image(latent(cfg, gen)), Text(tok.encode("w4 w5"))]),
        Sample([Image(latent(cfg, gen), noise_limited=True), Text(tok.encode("w6 w7 w8 w9"))]),
    ]
    return pack(samples, 24, Specials.of(tok), cfg.patches_per_image)


def max_logit_diff(ours, hf_model, ids, columns: int | None = None) -> float:
    model, cfg, tokenizer = ours
    with torch.no_grad():
        got = model.eval()(text_batch(ids, tokenizer, cfg)).logits
        want = hf_model(torch.tensor(ids)).logits
    columns = columns or want.shape[-1]
    assert want.std() > 0.5  # logits of order one: the comparison means something
    return (got[..., :columns] - want[..., :columns]).abs().max().item()


IDS = [[5, 17, 42, 299, 3, 100, 7, 250, 8, 9, 11, 64, 120, 33, 2, 1], list(range(200, 216))]


def test_llama_text_logits_equal_transformers(llama):
    hf_model, path = llama
    model, cfg, tok = load_pretrained(path)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ffn_dim) == (64, 2, 4, 2, 96)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.qkv_bias, cfg.tie_embeddings) == (500000.0, 1e-5, False, False)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id) == (1, 2, 3, 300, 301)
    assert cfg.vocab_size == tok.vocab_size == 302 and added_token_ids(tok) == [300, 301]
    diff = max_logit_diff((model, cfg, tok), hf_model, IDS, columns=WORDS)
    print(f"llama max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    # new rows: the mean of the learned rows, in the embedding and in the (untied) LM head
    for w in (model.tok_emb.weight, model.lm_head.weight):
        mean = w[:WORDS].double().mean(0).float()
        torch.testing.assert_close(w[300], mean, rtol=0, atol=1e-7)
        torch.testing.assert_close(w[301], mean, rtol=0, atol=1e-7)
    # the image side keeps the model's own init (zeroed output layer)
    assert model.patcher.proj_out.weight.abs().max() == 0
    text = " ".join(f"w{i}" for i in (3, 1, 4, 1, 5))
    assert tok.encode(text) == [7, 5, 8, 5, 9]


def test_qwen2_text_logits_equal_transformers(qwen2):
    hf_model, path = qwen2
    model, cfg, tok = load_pretrained(path, model_overrides={"latent_size": 4, "max_seq_len": 64})
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.rope_theta == 1e6 and cfg.max_seq_len == 64
    # BOI/EOI (300, 301) fall on the checkpoint's padding rows: the row count stays 320
    assert cfg.vocab_size == 320 and (tok.boi_id, tok.eoi_id) == (300, 301)
    assert model.lm_head.weight is model.tok_emb.weight
    freeze_text(model, tokenizer=tok)
    assert "tied with lm_head" in trainable_parameters_summary(model)
    diff = max_logit_diff((model, cfg, tok), hf_model, IDS, columns=WORDS)
    print(f"qwen2 max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    mean = model.tok_emb.weight[:WORDS].double().mean(0).float()
    torch.testing.assert_close(model.tok_emb.weight[301], mean, rtol=0, atol=1e-7)
    # the padding rows after the new ids are the checkpoint's
    hf_emb = hf_model.model.embed_tokens.weight
    assert torch.equal(model.tok_emb.weight[302:], hf_emb[302:])


def test_sharded_checkpoint_loads_like_one_file(llama, tmp_path):
    hf_model, path = llama
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    write_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    sharded, _, _ = load_pretrained(tmp_path)
    whole, _, _ = load_pretrained(path)
    text_side = [k for k in whole.state_dict() if not k.startswith("patcher.")]
    for k in text_side:
        assert torch.equal(sharded.state_dict()[k], whole.state_dict()[k]), k


def edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_checkpoints_say_which_key(llama, tmp_path):
    _, path = llama
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        load_pretrained(edited(path, tmp_path / "a", model_type="mistral"))
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ValueError, match="rope_parameters.rope_type='llama3'"):
        load_pretrained(edited(path, tmp_path / "b", rope_parameters=rope))
    with pytest.raises(ValueError, match="rope_scaling.rope_type='linear'"):
        load_pretrained(edited(path, tmp_path / "c", rope_parameters=None, rope_scaling={"type": "linear"}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"):
        load_pretrained(edited(path, tmp_path / "d", intermediate_size=128))
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.1.input_layernorm.weight'"):
        load_pretrained(edited(path, tmp_path / "e", num_hidden_layers=1))
    with pytest.raises(ValueError, match="weight 'model.layers.2.input_layernorm.weight' is missing"):
        load_pretrained(edited(path, tmp_path / "f", num_hidden_layers=3))
    v4_style = edited(path, tmp_path / "v4", rope_parameters=None, rope_theta=2e5, rope_scaling=None)
    assert load_pretrained(v4_style)[1].rope_theta == 2e5  # transformers v4's config layout
    with pytest.raises(ValueError, match="architectures"):
        load_pretrained(edited(path, tmp_path / "g", architectures=["LlamaModel"]))
    with pytest.raises(ValueError, match="dim=128 contradicts"):
        load_pretrained(path, model_overrides={"dim": 128})
    with pytest.raises(ValueError, match="unknown key 'latent_sise'"):
        load_pretrained(path, model_overrides={"latent_sise": 4})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_pretrained(path, model_overrides={"max_seq_len": 4096})


def test_freeze_text_trains_only_the_chosen_parts(llama):
    _, path = llama
    model, cfg, tok = load_pretrained(path, model_overrides={"latent_size": 4})
    model.train()
    freeze = freeze_text(model, train_layers=[-1], tokenizer=tok)
    assert freeze.new_rows == [300, 301] and freeze.row_masked == ["tok_emb.weight", "lm_head.weight"]
    summary = trainable_parameters_summary(model)
    assert "layers.0" in summary and "rows 300..301" in summary and "patcher" in summary
    print(summary)

    decay = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(decay, lr=1e-2, weight_decay=0.1)
    freeze.attach(opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batch = mixed_batch(tok, cfg, gen)
    dcfg = DiffusionConfig()
    schedule = diffusion.make_schedule(dcfg)
    for _ in range(3):
        loss = losses.training_loss(model, batch, schedule, dcfg, generator=gen).total
        opt.zero_grad()
        loss.backward()
        opt.step()

    after = model.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("patcher.", "layers.1.")):
            assert not same, f"{k} should have trained"
        elif k in ("tok_emb.weight", "lm_head.weight"):
            old_rows, new_rows = before[k][:300], after[k][:300]
            assert torch.equal(old_rows, new_rows), f"{k}: pretrained rows moved"
            assert not torch.equal(before[k][300:], after[k][300:]), f"{k}: BOI/EOI rows did not train"
        else:
            assert same, f"{k} should be frozen"

    with pytest.raises(ValueError, match="tokenizer"):
        freeze_text(model)
    with pytest.raises(ValueError, match="train_layers: layer 5"):
        freeze_text(model, train_layers=[5], train_embeddings_new_rows=False)
    freeze.remove()


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("llama", "qwen2")])
def test_export_loads_in_transformers_with_the_same_logits(kind, arch, llama, qwen2, tmp_path):
    _, path = llama if kind == "llama" else qwen2
    ours = load_pretrained(path)
    model, cfg, tok = ours
    out = export_hf(model, cfg, tok, tmp_path / "export", arch=arch)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert hf_model.config.vocab_size == cfg.vocab_size
    ids = [IDS[0][:-2] + [tok.boi_id, tok.eoi_id], IDS[1]]
    diff = max_logit_diff(ours, hf_model, ids)  # every column, BOI/EOI included
    print(f"export {kind}->{arch} max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    if kind == "qwen2":
        with pytest.raises(ValueError, match="arch='qwen2'"):
            export_hf(model, cfg, tok, tmp_path / "as_llama", arch="llama")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.convert_tokens_to_ids(tok.BOI) == tok.boi_id
    # and back: the exported directory loads into the same text weights, with no new rows
    again, cfg2, tok2 = load_pretrained(out)
    assert added_token_ids(tok2) == [] and cfg2.vocab_size == cfg.vocab_size
    assert (tok2.boi_id, tok2.eoi_id) == (tok.boi_id, tok.eoi_id)
    for k, v in model.state_dict().items():
        if not k.startswith("patcher."):
            assert torch.equal(again.state_dict()[k], v), k


def test_train_cli_init_from_with_frozen_text(llama, tmp_path):
    """`transfusion train --init-from DIR --freeze-text`: text weights stay, the patcher learns, the run
    resumes with the checkpoint's tokenizer."""
    from safetensors.torch import load_file

    from transfusion import cli
    from transfusion.checkpoint import load_model, resolve_checkpoint
    from transfusion.tokenizer import HFTokenizer

    _, path = llama
    out = tmp_path / "run"
    args = ["train", "--init-from", str(path), "--freeze-text", "--out", str(out), "--vae", "random", "--steps", "3",
            "--no-progress", "--set", "model.latent_size=4", "--set", "vae.image_size=16", "--set", "data.image_size=16",
            "--set", "train.batch_size=2", "--set", "train.seq_len=64", "--set", "train.eval_every=0",
            "--set", "train.warmup_steps=1"]  # fmt: skip
    assert cli.main(args) == 0
    start, _, _ = load_pretrained(path, {"latent_size": 4})
    trained = load_file(resolve_checkpoint(out) / "model.safetensors")
    assert torch.equal(trained["layers.0.attn.wq.weight"], start.state_dict()["layers.0.attn.wq.weight"])
    assert not torch.equal(trained["patcher.proj_in.weight"], start.state_dict()["patcher.proj_in.weight"])
    loaded = load_model(out)
    assert loaded.tokenizer.encode("a red circle") == HFTokenizer(path).encode("a red circle")
    assert loaded.model.cfg.vocab_size == start.cfg.vocab_size
    # the resumed run takes its config (init_from, freezing, image side) from the run directory
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "5", "--no-progress"]) == 0
    assert load_model(out).meta["step"] == 5
    trained = load_file(resolve_checkpoint(out) / "model.safetensors")
    assert torch.equal(trained["layers.0.attn.wq.weight"], start.state_dict()["layers.0.attn.wq.weight"])
    # the checkpoint carries its tokenizer file: it loads from anywhere
    moved = tmp_path / "moved"
    shutil.copytree(resolve_checkpoint(out), moved)
    assert (moved / "tokenizer.json").is_file()
    assert json.loads((moved / "meta.json").read_text())["tokenizer"]["path"] == "tokenizer.json"
    assert load_model(moved).tokenizer.encode("a red circle") == HFTokenizer(path).encode("a red circle")
    # the trained checkpoint exports (CLI) and loads in transformers with its own text logits
    assert (
        cli.main(["export", "--checkpoint", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(out)
    diff = max_logit_diff((ours.model, ours.config.model, ours.tokenizer), hf_model, IDS)
    assert diff < 1e-4, diff


def test_init_from_keeps_set_fields_and_refuses_contradictions(llama, tmp_path, capsys):
    from transfusion import cli
    from transfusion.config import Config

    _, path = llama
    base = ["train", "--init-from", str(path), "--vae", "random", "--steps", "1", "--no-progress",
            "--set", "model.latent_size=4", "--set", "vae.image_size=16", "--set", "data.image_size=16",
            "--set", "train.batch_size=1", "--set", "train.seq_len=48", "--set", "train.eval_every=0"]  # fmt: skip
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--set", "model.max_seq_len=48"]) == 0
    cfg = Config.from_json((tmp_path / "a" / "config.json").read_text())
    assert cfg.model.max_seq_len == 48 and cfg.model.dim == TINY["hidden_size"]
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--set", "model.dim=96"]) == 2
    err = capsys.readouterr().err
    assert "dim=96" in err and "contradicts" in err and len(err.strip().splitlines()) == 1
    assert cli.main([*base, "--out", str(tmp_path / "c"), "--train-layers", "1"]) == 2  # needs --freeze-text
    assert "freeze_text" in capsys.readouterr().err


def test_lmfusion_mot_keeps_the_llms_text_logits_exactly_while_the_image_copies_train(llama):
    """``--init-from --freeze-text`` with modality-specific weights (LMFusion): both copies start as
    the LLM's layers, the text copies are frozen, the image copies train; after training steps on
    mixed samples the text-only logits are bit for bit what they were (the LLM's, to 1e-4 against
    transformers), while the image copies have moved."""
    hf_model, path = llama
    model, cfg, tok = load_pretrained(path, model_overrides={"latent_size": 4, "modality_weights": "mot"})
    assert cfg.modality_weights == "mot"
    state = model.state_dict()
    assert torch.equal(state["layers.1.attn.wq.image.weight"], state["layers.1.attn.wq.text.weight"])
    assert max_logit_diff((model, cfg, tok), hf_model, IDS, columns=WORDS) < 1e-4
    with torch.no_grad():
        before = model.eval()(text_batch(IDS, tok, cfg)).logits[..., :WORDS].clone()
    model.train()
    freeze = freeze_text(model, tokenizer=tok)
    assert all(".image." in n or not n.startswith("layers.") for n in freeze.trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    freeze.attach(opt)
    gen = torch.Generator().manual_seed(0)
    batch = mixed_batch(tok, cfg, gen)
    dcfg = DiffusionConfig()
    for _ in range(3):
        loss = losses.training_loss(model, batch, diffusion.make_schedule(dcfg), dcfg, generator=gen).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert not torch.equal(after["layers.1.attn.wq.image.weight"], state["layers.1.attn.wq.text.weight"])
    with torch.no_grad():
        assert torch.equal(model.eval()(text_batch(IDS, tok, cfg)).logits[..., :WORDS], before)
    freeze.remove()
