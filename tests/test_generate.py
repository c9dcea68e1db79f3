"""The decoder: cached decoding equals a full recompute; batching and guidance change nothing; the CLI."""

import dataclasses
import json

import pytest
import torch

from transfusion import cli
from transfusion.config import Config, DiffusionConfig, VAEConfig, tiny
from transfusion.diffusion import guided, make_sampler, make_schedule
from transfusion.generate import Decoder, GenerationConfig, KVCache, caption, sample_token, text_to_image
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack
from transfusion.tokenizer import ByteTokenizer

from helpers import TOK, latent

SP = Specials.of(TOK)
CPU = torch.device("cpu")


class IdTokenizer(ByteTokenizer):
    """Decodes to the token ids themselves, so text outputs compare token for token."""

    def decode(self, ids: list[int], errors: str = "replace") -> str:
        return " ".join(map(str, ids))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny matrices: a second thread only contends (conftest restores it)


def random_head(model: Transfusion) -> Transfusion:
    """The image output layer starts at zero (DiT); random weights make the predictions non-trivial."""
    with torch.no_grad():
        for p in model.patcher.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return Decoder(random_head(Transfusion(tiny())), TOK, DiffusionConfig())


def full_forward(model, sample):
    """The training path: pack one sample, run ``model(batch)``; returns (output, batch, sample length)."""
    b = pack([sample], 96, SP, model.cfg.patches_per_image)
    with torch.no_grad():
        out = model(b.replace(timesteps=b.timesteps.clamp(min=0)))
    return out, b, int((b.doc_ids[0] == 0).sum())


def close(a, b, tol=1e-5):
    """Equal within tol relative to the larger magnitude: untrained models' samples grow large."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    torch.testing.assert_close(a / scale, b / scale, atol=tol, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefix_attention_equals_sdpa_over_concatenated_keys(kv_heads):
    """Reading the cache in place (``Prefix``), by parts, with padded slots and a part whose one
    cached row every query row shares, equals SDPA over the concatenated keys with a mask."""
    import torch.nn.functional as F

    from transfusion.layers import Prefix

    torch.manual_seed(0)
    H, Dh, L = 4, 8, 3
    q = torch.randn(5, H, L, Dh, dtype=torch.float64)
    k, v = torch.randn(2, 5, kv_heads, L, Dh, dtype=torch.float64)
    cached = torch.randn(2, 3, kv_heads, 7, Dh, dtype=torch.float64)  # rows 0-2 own a cache row each
    shared = torch.randn(2, 1, kv_heads, 4, Dh, dtype=torch.float64)  # rows 3-4 share one
    valid = torch.arange(7)[None, :] < torch.tensor([7, 2, 5])[:, None]
    got = Prefix([(3, cached[0], cached[1], valid), (2, shared[0], shared[1], None)]).attend(q, k, v)
    rep = H // kv_heads
    for rows, (pk, pv), ok in (
        (slice(0, 3), cached, valid),
        (slice(3, 5), shared, torch.ones(1, 4, dtype=bool)),
    ):
        n = rows.stop - rows.start
        keys = torch.cat([pk.expand(n, -1, -1, -1), k[rows]], 2).repeat_interleave(rep, 1)
        vals = torch.cat([pv.expand(n, -1, -1, -1), v[rows]], 2).repeat_interleave(rep, 1)
        mask = torch.cat([ok.expand(n, -1), torch.ones(n, L, dtype=bool)], 1)[:, None, None, :]
        want = F.scaled_dot_product_attention(q[rows], keys, vals, attn_mask=mask)
        torch.testing.assert_close(got[rows], want)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_steps_equal_full_recompute(decoder, kv_heads):
    """(kv_heads 2: grouped-query attention, as in pretrained Llama / Qwen2 checkpoints.)"""
    if kv_heads != decoder.model.cfg.n_heads:
        torch.manual_seed(3)
        decoder = Decoder(random_head(Transfusion(tiny(n_kv_heads=kv_heads))), TOK, DiffusionConfig())
    model = decoder.model
    z1, x_t, z2 = latent(model.cfg), latent(model.cfg), latent(model.cfg)
    prompt = [Text(TOK.encode("draw")), Image(z1, t=0), Text(TOK.encode("then"))]
    cache = KVCache(model, 1, 64, CPU, torch.float32)
    row = torch.tensor([0])
    with torch.no_grad():
        logits = decoder.steps.prefill(cache, row, [Sample(prompt, eos=False)])
        ref, _, L = full_forward(model, Sample(prompt, eos=False))
        torch.testing.assert_close(logits[0], ref.logits[0, L - 1], atol=1e-5, rtol=1e-5)
        # a denoising step: only the patches, against the cached prefix, not committed
        decoder.steps.text(cache, row, [SP.boi])
        before = int(cache.lens[0])
        pred = decoder.steps.image(cache, row, x_t[None], torch.tensor([300]), commit=False)
        assert int(cache.lens[0]) == before
        ref, _, _ = full_forward(model, Sample([*prompt, Image(x_t, t=300)], eos=False))
        torch.testing.assert_close(pred[0], ref.image_pred[1], atol=1e-5, rtol=1e-5)
        # the clean image committed at t = 0, then EOI and more text
        decoder.steps.image(cache, row, z2[None], torch.tensor([0]), commit=True)
        decoder.steps.text(cache, row, [SP.eoi])
        logits = decoder.steps.text(cache, row, [ord("x")])
        ref, _, L = full_forward(model, Sample([*prompt, Image(z2, t=0), Text([ord("x")])], eos=False))
        torch.testing.assert_close(logits[0], ref.logits[0, L - 1], atol=1e-5, rtol=1e-5)


def reference_decode(
    model,
    objective: str,
    prompt: str,
    seed: int,
    steps: int,
    scale: float,
    max_new_tokens: int,
    max_images: int,
    guidance_max_t: int | None = None,
):
    """A forced image, then greedy decoding (more images on BOI), with no cache at all: every step
    packs the whole sequence and runs ``model(batch)``; the unconditional branch of guidance is
    ``Sample([Image])`` (BOS BOI), as training drops the conditioning. Returns the generated segments."""
    clip = None if objective == "flow" else DiffusionConfig().sample_clip  # as the decoder does
    sampler = make_sampler(
        "flow" if objective == "flow" else "ddpm",
        make_schedule(DiffusionConfig()),
        steps,
        objective,
        clip_x0=clip,
    )
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    segments: list = [Text(TOK.encode(prompt))]

    def draw() -> None:
        x = torch.randn(cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
        for i, t in enumerate(sampler.timesteps):
            cond = full_forward(model, Sample([*segments, Image(x, t=t)], eos=False))[0].image_pred[-1:]
            uncond = full_forward(model, Sample([Image(x, t=t)], eos=False))[0].image_pred
            weight = scale if guidance_max_t is None or t <= guidance_max_t else 1.0
            x = sampler.step(guided(cond, uncond, weight), i, x[None], g)[0]
        segments.append(Image(x, t=0))

    draw()
    ids: list[int] = []
    n_text, n_images = 0, 1
    while n_text < max_new_tokens:
        out, _, L = full_forward(model, Sample([*segments, Text(ids)], eos=False))
        logits = out.logits[0, L - 1]
        logits[[SP.bos, SP.eoi, SP.pad]] = float("-inf")  # never predicted in training
        if n_images >= max_images:
            logits[SP.boi] = float("-inf")
        token = int(logits.argmax())
        if token == SP.eos:
            break
        if token == SP.boi:
            segments += [Text(ids)] if ids else []
            ids = []
            draw()
            n_images += 1
            continue
        ids.append(token)
        n_text += 1
    return segments[1:] + ([Text(ids)] if ids else [])


@pytest.mark.parametrize(
    "patcher, objective, image_attention",
    [("linear", "ddpm", "bidirectional"), ("linear", "flow", "bidirectional"), ("unet", "flow", "bidirectional"),
     ("linear", "flow", "causal"), ("linear", "ddpm", "causal"), ("linear", "flow", "rope_2d"), ("unet", "flow", "mot"),
     ("unet", "flow", "image_pos")],
)  # fmt: skip
def test_generate_equals_uncached_reference(patcher, objective, image_attention):
    """(Flow samples stay O(1), so they compare tightly; DDPM samples of an untrained model blow up.)
    Under causal image attention the patches of the image being drawn see only earlier patches, in
    the cached decoder as in the training forward."""
    torch.manual_seed(1)
    rope_2d = image_attention == "rope_2d"  # 2D RoPE positions for the patches, attention as usual
    mot = image_attention == "mot"  # modality-specific weights: patches through the image copies
    image_pos = image_attention == "image_pos"  # a learned vector per patch place
    attention = "bidirectional" if rope_2d or mot or image_pos else image_attention
    model = random_head(
        Transfusion(tiny(patcher=patcher, unet_channels=16, image_attention=attention, rope_2d=rope_2d,
                         modality_weights="mot" if mot else "shared", image_pos_embed=image_pos))
    )  # fmt: skip
    with torch.no_grad():  # a direction every token carries, read by BOI's logit: greedy draws again
        if image_pos:
            model.image_pos.normal_(0.0, 1.0)
        model.tok_emb.weight[:, 0] += 1.0
        model.lm_head.weight[SP.boi, 0] = 3.0
    dec = Decoder(model, IdTokenizer(), DiffusionConfig(objective=objective))
    gen = GenerationConfig(max_new_tokens=4, temperature=0.0, steps=3, cfg_scale=3.0, max_images=2)
    out = dec.generate([["a red circle"]], gen, seeds=[7], force_image=[True])[0]
    ref = reference_decode(
        model, objective, "a red circle", 7, steps=3, scale=3.0, max_new_tokens=4, max_images=2
    )
    # the second image is drawn against the first as committed to the cache (clean, t = 0)
    assert [type(s) for s in out] == [torch.Tensor, torch.Tensor, str]
    assert [type(s) for s in ref] == [Image, Image, Text]
    close(out[0], ref[0].latent)
    close(out[1], ref[1].latent)
    assert out[2] == " ".join(map(str, ref[2].ids))


@pytest.mark.parametrize("max_t", [None, 600, 0])
def test_guidance_interval_equals_uncached_reference(max_t):
    """Guidance only at t <= guidance_max_t (the conditional prediction alone above): equal to a
    full-forward loop that guides exactly those steps; rows guided and unguided share one batch."""
    torch.manual_seed(2)
    model = random_head(Transfusion(tiny()))
    dec = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow", guidance_max_t=max_t))
    gen = GenerationConfig(steps=4, cfg_scale=3.0)
    out = text_to_image(dec, ["a red circle"], gen, seeds=[3])[0]
    ref = reference_decode(model, "flow", "a red circle", 3, steps=4, scale=3.0, max_new_tokens=0, max_images=1,
                           guidance_max_t=max_t)  # fmt: skip
    close(out, ref[0].latent)
    unguided = text_to_image(dec, ["a red circle"], dataclasses.replace(gen, cfg_scale=1.0), seeds=[3])[0]
    assert not torch.equal(out, unguided)  # every setting guides at least the last step (t = 0)
    # the generation setting overrides the checkpoint's: no interval at all is the paper's guidance
    paper = text_to_image(dec, ["a red circle"], dataclasses.replace(gen, guidance_max_t=None), seeds=[3])[0]
    assert torch.equal(paper, out) == (max_t is None)


def test_two_images_then_a_question_equals_uncached_greedy_reference(decoder):
    """Understanding: an image-first prompt with two images and text is answered greedily; every token
    equals what a full forward over the whole sequence picks."""
    model, cfg = decoder.model, decoder.model.cfg
    z1, z2 = latent(cfg), latent(cfg)
    dec = Decoder(model, IdTokenizer(), DiffusionConfig())
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0, max_images=0)
    out = dec.generate([[z1, z2, "which?"]], gen)[0]
    ids = greedy_reference(model, [Image(z1, t=0), Image(z2, t=0), Text(TOK.encode("which?"))], 6)
    assert out == ([" ".join(map(str, ids))] if ids else [])
    assert len(ids) == 6  # an untrained model does not stop early: six real comparisons


def greedy_reference(model, prompt: list, max_new_tokens: int) -> list[int]:
    """Greedy text after ``prompt`` (no images drawn), every token from a full forward over the
    whole sequence: no cache."""
    ids: list[int] = []
    while len(ids) < max_new_tokens:
        o, _, L = full_forward(model, Sample([*prompt, Text(ids)], eos=False))
        logits = o.logits[0, L - 1]
        logits[[SP.bos, SP.eoi, SP.pad, SP.boi]] = float("-inf")
        token = int(logits.argmax())
        if token == SP.eos:
            break
        ids.append(token)
    return ids


@pytest.mark.parametrize("guidance_max_t", [None, 500])
def test_batched_equals_one_at_a_time(guidance_max_t):
    """Rows enter diffusion at different ticks; with a guidance interval, some rows of a tick are
    guided (their twins in the batch) and others not."""
    torch.manual_seed(2)
    model = random_head(Transfusion(tiny()))
    with torch.no_grad():  # a direction every token carries, read by BOI's logit: BOI is sampled often
        model.tok_emb.weight[:, 0] += 1.0
        model.lm_head.weight[SP.boi, 0] = 0.6
    dec = Decoder(model, TOK, DiffusionConfig(guidance_max_t=guidance_max_t))
    cfg = model.cfg
    prompts = [["a red circle"], [latent(cfg)], ["two"], ["x", latent(cfg), "y z"]]
    force = [True, False, False, True]
    gen = GenerationConfig(max_new_tokens=6, steps=3, temperature=1.0, top_p=0.9, cfg_scale=3.0, max_images=2)
    seeds = [1, 2, 3, 4]
    starts: list[int] = []
    batched = dec.generate(prompts, gen, seeds, force, progress=starts.append)
    assert len(set(starts)) > 1, "rows should enter diffusion mode at different ticks"
    assert sum(isinstance(s, torch.Tensor) for out in batched for s in out) >= 4
    for i in range(len(prompts)):
        alone = dec.generate([prompts[i]], gen, [seeds[i]], [force[i]])[0]
        assert [type(s) for s in alone] == [type(s) for s in batched[i]]
        for a, b in zip(alone, batched[i]):
            if isinstance(a, str):
                assert a == b
            else:
                close(a, b)


def test_guidance_one_batch_equals_two_passes(decoder):
    model = decoder.model
    cache = KVCache(model, 2, 64, CPU, torch.float32)
    twins = KVCache(model, 2, 2, CPU, torch.float32)
    rows = torch.tensor([0, 1])
    with torch.no_grad():
        prompts = [Sample([Text(TOK.encode(c)), Text([SP.boi])], eos=False) for c in ("ab", "longer one")]
        decoder.steps.prefill(cache, rows, prompts)
        decoder.steps.prefill(twins, rows, [Sample([Text([SP.boi])], eos=False)] * 2)
        x = torch.stack([latent(model.cfg), latent(model.cfg)])
        t = torch.tensor([700, 20])
        both = decoder.steps.image_pair(cache, decoder.steps.unconditional_prefix(), rows, x, t)
        cond = decoder.steps.image(cache, rows, x, t, commit=False)
        uncond = decoder.steps.image(twins, rows, x, t, commit=False)
    torch.testing.assert_close(both[:2], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        guided(both[:2], both[2:], 3.0), guided(cond, uncond, 3.0), atol=1e-4, rtol=1e-5
    )


def test_forced_image_is_one_image_then_text_and_greedy_is_deterministic(decoder):
    gen = GenerationConfig(max_new_tokens=5, steps=4, temperature=0.0, cfg_scale=1.0, max_images=1)
    ticks: list[int] = []
    out = decoder.generate([["cat"]], gen, force_image=[True], progress=ticks.append)
    out = out[0]
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (8, 4, 4)
    assert len(out) == 2 and isinstance(out[1], str)  # max_images=1: only text after the image
    assert ticks == [1] * 4
    again = decoder.generate([["cat"]], gen, force_image=[True])[0]
    torch.testing.assert_close(out[0], again[0], atol=0, rtol=0)
    assert out[1] == again[1]
    images = text_to_image(decoder, ["a", "b"], GenerationConfig(steps=3, cfg_scale=2.0))
    assert len(images) == 2 and images[0].shape == (8, 4, 4) and not torch.allclose(images[0], images[1])
    z = latent(decoder.model.cfg)
    dec = Decoder(decoder.model, IdTokenizer(), DiffusionConfig())
    texts = caption(dec, [z], GenerationConfig(max_new_tokens=4, temperature=0))
    ids = greedy_reference(decoder.model, [Image(z, t=0)], 4)
    assert len(ids) == 4 and texts == [" ".join(map(str, ids))]  # the caption is the image-first greedy text


def test_top_k_one_equals_greedy(decoder):
    logits = torch.tensor([0.1, 3.0, 0.2, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, GenerationConfig(temperature=0.0), g) == 1
    assert all(sample_token(logits, GenerationConfig(top_k=1), g) == 1 for _ in range(20))
    assert all(sample_token(logits, GenerationConfig(top_p=0.5), g) == 1 for _ in range(20))
    prompts = [["hello"], [latent(decoder.model.cfg), "is"]]
    greedy = decoder.generate(prompts, GenerationConfig(max_new_tokens=8, temperature=0.0, max_images=0))
    top1 = decoder.generate(prompts, GenerationConfig(max_new_tokens=8, top_k=1, max_images=0), seeds=[5, 6])
    assert greedy == top1


def test_stopping_eos_max_new_tokens_and_context():
    model = Transfusion(tiny(max_seq_len=16)).eval()
    ids = IdTokenizer()
    dec = Decoder(model, ids, DiffusionConfig())
    gen = GenerationConfig(max_new_tokens=5, max_images=0)
    (out,) = dec.generate([["hi"]], gen)
    assert len(out[0].split()) == 5  # exactly max_new_tokens
    (out,) = dec.generate([["0123456789"]], dataclasses.replace(gen, max_new_tokens=50))
    assert len(out[0].split()) == 16 - 11  # BOS + 10 prompt bytes: the context ends the row, no error
    with torch.no_grad():  # a model whose LM head says EOI, then EOS: EOI is never sampled, EOS stops
        model.lm_head.weight.zero_()
        model.lm_head.weight[SP.eoi] = 2.0
        model.lm_head.weight[SP.eos] = 1.0
        model.tok_emb.weight.fill_(1.0)
    assert dec.generate([["hi"]], GenerationConfig(temperature=0.0)) == [[]]


def test_user_errors(decoder):
    with pytest.raises(ValueError, match="expects"):
        decoder.generate([[torch.zeros(3, 4, 4)]], GenerationConfig())
    with pytest.raises(ValueError, match="context"):
        decoder.generate([["x" * 300]], GenerationConfig())
    with pytest.raises(ValueError, match="for its image"):  # the prompt fits, its image does not
        decoder.generate([["x" * 250]], GenerationConfig(), force_image=[True])
    with pytest.raises(ValueError, match="sampler"):
        decoder.generate([["x"]], GenerationConfig(sampler="flow"))
    for bad in ({"temperature": -1}, {"top_p": 0.0}, {"top_k": -2}, {"steps": 0}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


def test_flow_model_samples_with_the_flow_sampler():
    model = random_head(Transfusion(tiny()))
    dec = Decoder(model, TOK, DiffusionConfig(objective="flow"))
    assert dec.settings().sampler == "flow"  # the default follows the objective
    gen = GenerationConfig(steps=4, cfg_scale=2.0, max_new_tokens=0, max_images=1, temperature=0.0)
    image = dec.generate([["a"]], gen, seeds=[5], force_image=[True])[0]
    ref = reference_decode(model, "flow", "a", 5, steps=4, scale=2.0, max_new_tokens=0, max_images=1)
    assert len(image) == len(ref) == 1
    close(image[0], ref[0].latent)  # the flow sampler's Euler steps, against the uncached loop
    with pytest.raises(ValueError, match="flow"):
        text_to_image(dec, ["a"], GenerationConfig(sampler="ddpm", steps=4))


# --- the command line -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny checkpoints saved by ``checkpoint.save_model``: one with a VAE beside it, one without."""
    from transfusion.checkpoint import save_model
    from transfusion.vae import KLVAE, save_vae

    root = tmp_path_factory.mktemp("ckpt")
    cfg = Config(model=tiny(), vae=VAEConfig(image_size=16, base_channels=8))
    torch.manual_seed(0)
    model = random_head(Transfusion(cfg.model))
    save_model(root / "with_vae", model, cfg, TOK, {"step": 1, "vae": "vae"})
    save_vae(KLVAE(cfg.vae), root / "with_vae" / "vae")
    save_model(root / "no_vae", model, cfg, TOK, {"step": 1})
    cfg.data.canonical_relations = 1.0  # trained on relations stated in reading order only
    save_model(root / "reading_order", model, cfg, TOK, {"step": 1, "vae": "vae"})
    save_vae(KLVAE(cfg.vae), root / "reading_order" / "vae")
    return root


def test_cli_generate_and_caption(checkpoints, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["--prompt", "a red circle", "--num-images", "2", "--steps", "3", "--out", str(out)]
    assert cli.main(["generate", "--checkpoint", str(checkpoints / "with_vae"), *args]) == 0
    record = json.loads((out / "output.json").read_text())
    assert len(record["outputs"]) == 2 and record["settings"]["steps"] == 3
    assert record["settings"]["guidance_max_t"] is None  # the checkpoint's: every step (the paper's)
    for flag, expected in (("600", 600), ("all", None)):
        assert (
            cli.main(
                ["generate", "--checkpoint", str(checkpoints / "with_vae"), *args, "--guidance-max-t", flag]
            )
            == 0
        )
        assert json.loads((out / "output.json").read_text())["settings"]["guidance_max_t"] == expected
    png = out / record["outputs"][0][0]["image"]
    assert png.suffix == ".png" and png.is_file()
    assert (out / "output.md").read_text().startswith("# a red circle")
    capsys.readouterr()
    assert (
        cli.main(
            ["caption", "--checkpoint", str(checkpoints / "with_vae"), str(png), "--max-new-tokens", "3"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{png}\t") and len(captured.out.splitlines()) == 1
    from PIL import Image as PILImage

    PILImage.new("RGB", (24, 20)).save(tmp_path / "wide.png")  # another size: an error, or --resize
    ckpt = str(checkpoints / "with_vae")
    assert cli.main(["caption", "--checkpoint", ckpt, str(tmp_path / "wide.png")]) == 2
    err = capsys.readouterr().err
    assert "24x20" in err and "16x16" in err and "--resize" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["caption", "--checkpoint", ckpt, "--resize", str(tmp_path / "wide.png")]) == 0
    assert "resized" in capsys.readouterr().err


def test_cli_generate_states_relations_in_reading_order_for_a_model_trained_so(checkpoints, tmp_path, capsys):
    """A checkpoint trained on relations stated only in reading order is given "X below Y" as "Y above
    X" (the same image as prompting that text as written); other checkpoints, other texts and
    --relation-wording as-written pass the prompt unchanged."""
    import numpy as np
    from PIL import Image as PILImage

    def run(ckpt: str, prompt: str, *flags: str) -> tuple[str, np.ndarray]:
        out = tmp_path / "gen"
        args = [
            "--checkpoint",
            str(checkpoints / ckpt),
            "--prompt",
            prompt,
            "--steps",
            "2",
            "--out",
            str(out),
        ]
        assert cli.main(["generate", *args, *flags]) == 0
        record = json.loads((out / "output.json").read_text())
        assert record["prompt"] == prompt
        return record["prompt_given"], np.asarray(PILImage.open(out / record["outputs"][0][0]["image"]))

    below, above = "a red circle below a blue square", "a blue square above a red circle"
    given, image = run("reading_order", below)
    assert given == above and "reading order" in capsys.readouterr().err
    assert np.array_equal(image, run("reading_order", above, "--relation-wording", "as-written")[1])
    assert not np.array_equal(image, run("reading_order", below, "--relation-wording", "as-written")[1])
    assert run("reading_order", below, "--relation-wording", "as-written")[0] == below
    assert run("with_vae", below)[0] == below  # trained on either wording: as written
    assert run("with_vae", below, "--relation-wording", "reading-order")[0] == above
    assert run("reading_order", "a red circle")[0] == "a red circle"


def test_cli_without_vae_saves_latents(checkpoints, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["--checkpoint", str(checkpoints / "no_vae"), "--prompt", "x", "--steps", "2", "--out", str(out)]
    assert cli.main(["generate", *args]) == 0
    assert "latents" in capsys.readouterr().out
    name = json.loads((out / "output.json").read_text())["outputs"][0][0]["image"]
    from safetensors.torch import load_file

    assert load_file(out / name)["latent"].shape == (8, 4, 4)


def test_cli_errors_are_one_line(checkpoints, tmp_path, capsys):
    from PIL import Image as PILImage

    ckpt = str(checkpoints / "with_vae")
    (tmp_path / "notes.png").write_text("not an image")
    PILImage.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    cases = {
        "does not exist": ["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"],
        "no such image": ["caption", "--checkpoint", ckpt, str(tmp_path / "nope.png")],
        "not a readable image": ["caption", "--checkpoint", ckpt, str(tmp_path / "notes.png")],
        "smaller than": ["caption", "--checkpoint", ckpt, str(tmp_path / "tiny.png")],
        "context": ["generate", "--checkpoint", ckpt, "--prompt", "x" * 300],
        "no VAE": ["caption", "--checkpoint", str(checkpoints / "no_vae"), str(tmp_path / "tiny.png")],
        "num-images": ["generate", "--checkpoint", ckpt, "--prompt", "x", "--num-images", "0"],
        "--guidance-max-t": ["generate", "--checkpoint", ckpt, "--prompt", "x", "--guidance-max-t", "soon"],
    }
    out_of_range = [("-3", "give a timestep"), ("1000", "past the model's last timestep (999)")]
    cases = [*cases.items()] + [
        (expected, ["generate", "--checkpoint", ckpt, "--prompt", "x", "--guidance-max-t", value])
        for value, expected in out_of_range
    ]
    for expected, args in cases:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and expected in err, err


def test_sample_clip_keeps_ddpm_samples_bounded(decoder):
    """Without clipping x0, the first step from t = 999 (alpha-bar 2e-9) amplifies an untrained
    model's noise error by 1/sqrt(alpha-bar); with DiffusionConfig.sample_clip it stays bounded."""
    gen = GenerationConfig(steps=10, sampler="ddim", cfg_scale=1.0)
    clipped = Decoder(decoder.model, TOK, DiffusionConfig(sample_clip=4.0))
    raw = Decoder(decoder.model, TOK, DiffusionConfig(sample_clip=None))
    a = text_to_image(clipped, ["x"], gen)[0]
    b = text_to_image(raw, ["x"], gen)[0]
    assert a.abs().max() <= 4.0 + 1e-4 < b.abs().max()


@pytest.mark.parametrize("kind", ["unet", "causal"])
def test_static_steps_equal_the_default_decoder(kind):
    """The static-shape steps that CUDA graphs replay (whole-capacity attention masked from device
    lengths, keys/values scattered in place), run eagerly here: the same text, images and captions
    as the default steps, with guidance, rows in different modes and rows ending at different times."""
    torch.manual_seed(4)
    cfg = tiny(patcher="unet", unet_channels=16) if kind == "unet" else tiny(image_attention="causal")
    model = random_head(Transfusion(cfg))
    with torch.no_grad():
        model.tok_emb.weight[:, 0] += 1.0
        model.lm_head.weight[SP.boi, 0] = 0.6
    prompts = [["a red circle"], [latent(cfg)], ["two"], ["x", latent(cfg), "y z"]]
    gen = GenerationConfig(max_new_tokens=6, steps=3, temperature=1.0, cfg_scale=3.0, max_images=2)
    outs = []
    for static in (False, True):
        dec = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=static)
        assert dec.static == static and not dec.graphs  # the CPU: graphs stay off, static steps run eagerly
        outs.append(dec.generate(prompts, gen, [1, 2, 3, 4], [True, False, False, True]))
    for a, b in zip(*outs):
        assert [type(s) for s in a] == [type(s) for s in b]
        for x, y in zip(a, b):
            assert x == y if isinstance(x, str) else torch.allclose(x, y, atol=1e-4, rtol=1e-4)
    assert sum(isinstance(s, torch.Tensor) for out in outs[1] for s in out) >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager_decoding():
    torch.manual_seed(5)
    model = random_head(Transfusion(tiny(patcher="unet", unet_channels=16))).cuda()
    gen = GenerationConfig(max_new_tokens=8, steps=6, temperature=0.0, cfg_scale=3.0, max_images=1)
    prompts = [["a red circle"], ["two blue squares"]]
    eager = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=False, graphs=False)
    graphed = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), graphs=True)
    a = eager.generate(prompts, gen, [1, 2], [True, True])
    b = graphed.generate(prompts, gen, [1, 2], [True, True])
    for x, y in zip(a, b):
        assert [type(s) for s in x] == [type(s) for s in y]
        for u, v in zip(x, y):
            assert u == v if isinstance(u, str) else torch.allclose(u, v, atol=1e-3, rtol=1e-3)
