"""The Chameleon-style baseline: images as VQ codes in the vocabulary, one next-token loss, causal
attention throughout; code sampling with guidance; the same decoder, training step and FLOP counter."""

import pytest
import torch

from transfusion.config import DiffusionConfig, TrainConfig, tiny
from transfusion.diffusion import guided, make_schedule
from transfusion.generate import Decoder, GenerationConfig, caption, text_to_image
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, images_as_tokens, pack
from transfusion.training import make_optimizer, train_step

from helpers import TOK

SP = Specials.of(TOK)
K = 16  # codes


def chameleon(**kw):
    return tiny(image_tokens="discrete", codebook_size=K, patch_size=1, latent_channels=1, **kw)


def codes(seed: int) -> torch.Tensor:
    return torch.randint(0, K, (1, 4, 4), generator=torch.Generator().manual_seed(seed)).float()


def test_images_become_tokens_with_every_position_trained():
    cfg = chameleon()
    z = codes(0)
    s = images_as_tokens(Sample([Text(TOK.encode("ab")), Image(z)]), SP, cfg.vocab_size)
    ids = s.segments[1].ids
    assert ids[0] == SP.boi and ids[-1] == SP.eoi and len(ids) == 16 + 2
    assert ids[1:-1] == (cfg.vocab_size + z.flatten().long()).tolist()
    b = pack([s], 64, SP, cfg.patches_per_image)
    assert not b.patch_mask.any() and b.num_images == 0  # no diffusion: all tokens, causal attention
    # every next token is a target: BOS->a ... BOI->first code ... last code->EOI, EOI->EOS
    n = 1 + 2 + 18 + 1
    assert int((b.text_targets[0] != -100).sum()) == n - 1
    assert int(b.text_targets[0, 3]) == cfg.vocab_size + int(z.flatten()[0])  # predicted from BOI


def test_a_chameleon_model_overfits_and_greedy_decoding_reproduces_the_codes():
    torch.manual_seed(0)
    cfg = chameleon()
    model = Transfusion(cfg)
    assert model.patcher is None and model.lm_head.out_features == cfg.vocab_size + K
    data = [("a", codes(1)), ("b", codes(2))]
    samples = [images_as_tokens(Sample([Text(TOK.encode(t)), Image(z)]), SP, cfg.vocab_size) for t, z in data]
    batch = pack(samples, 64, SP, cfg.patches_per_image)
    tc = TrainConfig(lr=3e-3, weight_decay=0.0)
    opt, sched, dc = make_optimizer(model, tc), make_schedule(DiffusionConfig()), DiffusionConfig()
    losses = [
        train_step(model, opt, [batch], sched, dc, lr=tc.lr, grad_clip=1.0).text_loss for _ in range(150)
    ]
    assert losses[-1] < 0.05 * losses[0]
    dec = Decoder(model, TOK, dc)
    gen = GenerationConfig(cfg_scale=1.0, image_temperature=0.0)
    drawn = text_to_image(dec, ["a", "b"], gen)
    assert torch.equal(drawn[0], data[0][1]) and torch.equal(drawn[1], data[1][1])
    # captioning: the codes as an image-first prompt; the text comes back after EOI (none trained here)
    assert isinstance(caption(dec, [data[0][1]], GenerationConfig(max_new_tokens=2, temperature=0.0))[0], str)


def full_logits(model, segments):
    """Next-token logits after ``segments`` (BOS first, no EOS) from a full forward: no cache."""
    s = images_as_tokens(Sample(segments, eos=False), SP, model.cfg.vocab_size)
    b = pack([s], 96, SP, model.cfg.patches_per_image)
    with torch.no_grad():
        out = model(b)
    return out.logits[0, int((b.doc_ids[0] == 0).sum()) - 1]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_code_sampling_equals_two_separate_passes(scale):
    """Conditional rows and their unconditional twins (BOS BOI + the codes so far) in one batch give
    the codes a loop of two full forwards per code gives (guided logits, the same generator)."""
    torch.manual_seed(3)
    model = Transfusion(chameleon()).eval()
    dec = Decoder(model, TOK, DiffusionConfig())
    gen = GenerationConfig(cfg_scale=scale)
    out = text_to_image(dec, ["a red circle", "b"], gen, seeds=[5, 6])
    V = model.cfg.vocab_size
    for prompt, seed, got in zip(["a red circle", "b"], [5, 6], out):
        g = torch.Generator().manual_seed(seed)
        picked: list[int] = []
        for _ in range(16):
            cond = full_logits(model, [Text(TOK.encode(prompt) + [SP.boi] + [V + c for c in picked])])[V:]
            uncond = full_logits(model, [Text([SP.boi] + [V + c for c in picked])])[V:]
            logits = guided(cond, uncond, scale) if scale != 1.0 else cond
            picked.append(int(torch.multinomial(logits.float().softmax(-1), 1, generator=g)))
        assert got.flatten().long().tolist() == picked


def test_discrete_config_checks():
    with pytest.raises(ValueError, match="patch_size=1"):
        tiny(image_tokens="discrete", codebook_size=K)
    with pytest.raises(ValueError, match="codebook_size"):
        tiny(image_tokens="discrete", patch_size=1, latent_channels=1)
