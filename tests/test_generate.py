"""The decoder: cached decoding equals a full recompute; batching and guidance change nothing."""

import pytest
import torch

from transfusion.config import DiffusionConfig, tiny
from transfusion.diffusion import guided
from transfusion.generate import Decoder, GenerationConfig, KVCache, caption, sample_token, text_to_image
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack

from helpers import TOK, latent

SP = Specials.of(TOK)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    model = Transfusion(tiny()).eval()
    torch.nn.init.normal_(model.patcher.proj_out.weight, std=0.05)  # non-trivial noise predictions
    return Decoder(model, TOK, DiffusionConfig())


def full_forward(model, sample):
    b = pack([sample], 128, SP, model.cfg.patches_per_image)
    b = b.replace(timesteps=b.timesteps.clamp(min=0))
    with torch.no_grad():
        return model(b), b


def test_cached_decoding_equals_full_recompute(decoder):
    model = decoder.model
    cfg = model.cfg
    z1, x_t, z2 = latent(cfg), latent(cfg), latent(cfg)
    prompt = [Text(TOK.encode("draw")), Image(z1, t=0), Text(TOK.encode("then"))]
    cache = KVCache(model, 1, 128, torch.device("cpu"), torch.float32)
    row = torch.tensor([0])
    with torch.no_grad():
        logits = decoder._prefill(cache, row, [Sample(prompt, eos=False)])
        ref, b = full_forward(model, Sample(prompt, eos=False))
        L = int((b.doc_ids[0] == 0).sum())
        torch.testing.assert_close(logits[0], ref.logits[0, L - 1], atol=1e-5, rtol=1e-5)
        # a denoising step: only the patches, against the cached prefix, not committed
        decoder._text_step(cache, row, [SP.boi])
        before = int(cache.lens[0])
        pred = decoder._image_pred(cache, row, x_t[None], torch.tensor([300]), commit=False)
        assert int(cache.lens[0]) == before
        ref, _ = full_forward(model, Sample([*prompt, Image(x_t, t=300)], eos=False))
        torch.testing.assert_close(pred[0], ref.image_pred[1], atol=1e-5, rtol=1e-5)
        # the clean image committed at t = 0, then EOI and more text
        decoder._image_pred(cache, row, z2[None], torch.tensor([0]), commit=True)
        logits = decoder._text_step(cache, row, [SP.eoi])
        logits = decoder._text_step(cache, row, [ord("x")])
        ref, b = full_forward(model, Sample([*prompt, Image(z2, t=0), Text([ord("x")])], eos=False))
        L = int((b.doc_ids[0] == 0).sum())
        torch.testing.assert_close(logits[0], ref.logits[0, L - 1], atol=1e-5, rtol=1e-5)


def test_batched_equals_one_at_a_time(decoder):
    cfg = decoder.model.cfg
    prompts = [["a red circle"], [latent(cfg)], ["two"], ["x", latent(cfg), "y z"]]
    force = [True, False, True, False]
    gen = GenerationConfig(max_new_tokens=6, steps=8, temperature=0.0, cfg_scale=3.0, max_images=1)
    seeds = [11, 12, 13, 14]
    batched = decoder.generate(prompts, gen, seeds, force)
    for i in range(len(prompts)):
        alone = decoder.generate([prompts[i]], gen, [seeds[i]], [force[i]])[0]
        assert len(alone) == len(batched[i])
        for a, b in zip(alone, batched[i]):
            if isinstance(a, str):
                assert a == b
            else:  # an untrained model's samples grow large: compare relative to their scale
                scale = a.abs().max().clamp(min=1.0)
                torch.testing.assert_close(a / scale, b / scale, atol=1e-5, rtol=1e-5)
    assert isinstance(batched[0][0], torch.Tensor) and batched[0][0].shape == (8, 4, 4)


def test_guidance_batch_equals_two_passes(decoder):
    model = decoder.model
    cfg = model.cfg
    cache = KVCache(model, 2, 128, torch.device("cpu"), torch.float32)
    uncond = KVCache(model, 2, 2 + cfg.patches_per_image, torch.device("cpu"), torch.float32)
    rows = torch.tensor([0, 1])
    with torch.no_grad():
        decoder._prefill(
            cache,
            rows,
            [Sample([Text(TOK.encode(c)), Text([SP.boi])], eos=False) for c in ("ab", "longer one")],
        )
        decoder._prefill(uncond, rows, [Sample([Text([SP.boi])], eos=False)] * 2)
        x = torch.stack([latent(cfg), latent(cfg)])
        t = torch.tensor([700, 20])
        both = decoder._image_pred_pair(cache, uncond, rows, x, t)
        cond = decoder._image_pred(cache, rows, x, t, commit=False)
        unc = decoder._image_pred(uncond, rows, x, t, commit=False)
    torch.testing.assert_close(both[:2], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], unc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided(both[:2], both[2:], 3.0), unc + 3 * (cond - unc), atol=1e-5, rtol=1e-5)


def test_forced_image_then_text_and_greedy_determinism(decoder):
    gen = GenerationConfig(max_new_tokens=5, steps=4, temperature=0.0, cfg_scale=1.0, max_images=1)
    out = decoder.generate([["cat"]], gen, force_image=[True])[0]
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (8, 4, 4)
    assert all(isinstance(s, str) for s in out[1:])  # max_images=1: only text after the image
    again = decoder.generate([["cat"]], gen, force_image=[True])[0]
    torch.testing.assert_close(out[0], again[0], atol=0, rtol=0)
    assert out[1:] == again[1:]
    imgs = text_to_image(decoder, ["a", "b"], GenerationConfig(steps=3, cfg_scale=2.0))
    assert len(imgs) == 2 and not torch.allclose(imgs[0], imgs[1])
    caps = caption(decoder, [latent(decoder.model.cfg)], GenerationConfig(max_new_tokens=4, temperature=0))
    assert isinstance(caps[0], str)


def test_eos_stops_and_top_k_one_is_greedy():
    logits = torch.tensor([0.1, 3.0, 0.2, -1.0])
    g = torch.Generator().manual_seed(0)
    greedy = GenerationConfig(temperature=0.0)
    assert sample_token(logits, greedy, g) == 1
    assert all(sample_token(logits, GenerationConfig(temperature=1.0, top_k=1), g) == 1 for _ in range(20))
    assert all(sample_token(logits, GenerationConfig(temperature=1.0, top_p=0.5), g) == 1 for _ in range(20))
    # a model whose LM head always says EOS stops at once
    model = Transfusion(tiny()).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[SP.eos] = 1.0
        model.norm.weight.fill_(1.0)
    dec = Decoder(model, TOK, DiffusionConfig())
    torch.nn.init.constant_(model.tok_emb.weight, 1.0)
    assert dec.generate([["hi"]], GenerationConfig(temperature=0.0))[0] == []


def test_prompt_errors(decoder):
    with pytest.raises(ValueError, match="expects"):
        decoder.generate([[torch.zeros(3, 4, 4)]], GenerationConfig())
    with pytest.raises(ValueError, match="context"):
        decoder.generate([["x" * 400]], GenerationConfig())
    with pytest.raises(ValueError, match="sampler"):
        decoder.generate([["x"]], GenerationConfig(sampler="flow"))


def test_cli_happy_path_and_errors(tmp_path, capsys):
    import json

    from transfusion import cli
    from transfusion.checkpoint import save_model
    from transfusion.config import Config, VAEConfig
    from transfusion.vae import KLVAE, save_vae

    cfg = Config(model=tiny(), vae=VAEConfig(image_size=16, base_channels=8))
    ckpt = tmp_path / "ckpt"
    save_model(ckpt, Transfusion(cfg.model), cfg, TOK, {"step": 1, "vae": "vae"})
    save_vae(KLVAE(cfg.vae), ckpt / "vae")
    out = tmp_path / "gen"
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "a red circle", "--num-images", "2",
                     "--steps", "3", "--out", str(out)]) == 0  # fmt: skip
    record = json.loads((out / "output.json").read_text())
    assert len(record["outputs"]) == 2 and (out / record["outputs"][0][0]["image"]).is_file()
    assert (out / "output.md").read_text().startswith("# a red circle")
    img = out / record["outputs"][0][0]["image"]
    capsys.readouterr()
    assert cli.main(["caption", "--checkpoint", str(ckpt), str(img), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(str(img))
    # errors: one line, exit 2, no traceback
    cases = [
        ["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"],
        ["caption", "--checkpoint", str(ckpt), str(tmp_path / "nope.png")],
        ["caption", "--checkpoint", str(ckpt), str(out / "output.json")],
        ["generate", "--checkpoint", str(ckpt), "--prompt", "x" * 300],
    ]
    for args in cases:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    from PIL import Image as PILImage

    PILImage.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    assert cli.main(["caption", "--checkpoint", str(ckpt), str(tmp_path / "tiny.png")]) == 2
    assert "smaller than" in capsys.readouterr().err


def test_flow_model_samples_with_the_flow_sampler():
    model = Transfusion(tiny()).eval()
    torch.nn.init.normal_(model.patcher.proj_out.weight, std=0.05)
    dec = Decoder(model, TOK, DiffusionConfig(objective="flow", sampler="flow"))
    img = text_to_image(dec, ["a"], GenerationConfig(sampler="flow", steps=4, cfg_scale=2.0))[0]
    assert img.shape == (8, 4, 4) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match="flow"):
        text_to_image(dec, ["a"], GenerationConfig(sampler="ddpm", steps=4))
