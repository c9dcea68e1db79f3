"""Modality-specific weights (``model.modality_weights=mot``, Mixture-of-Transformers): with the two
copies holding the same weights the model is the shared one (outputs and gradients); each position
goes through its own modality's copy, once; FLOPs per position do not change."""

import pytest
import torch
from test_generate import random_head
from torch.utils.flop_counter import FlopCounterMode

from transfusion.config import DiffusionConfig, ModelConfig, tiny
from transfusion.diffusion import make_schedule
from transfusion.layers import Pair
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Sample, Specials, Text, pack

from helpers import TOK, mixed_samples


def as_mot(shared: Transfusion) -> Transfusion:
    """A MoT model whose text and image copies both hold the shared model's weights."""
    mot = Transfusion(ModelConfig(**{**shared.cfg.__dict__, "modality_weights": "mot"}))
    state = {}
    for name, value in shared.state_dict().items():
        for copy in ("text", "image"):
            state[mot_name(mot, name, copy)] = value
    mot.load_state_dict(state)
    return mot


def mot_name(mot: Transfusion, name: str, copy: str) -> str:
    """``layers.0.attn.wq.weight`` -> ``layers.0.attn.wq.<copy>.weight`` where the module is a Pair."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.{copy}.{leaf}" if isinstance(mot.get_submodule(module), Pair) else name


def batch(cfg):
    g = torch.Generator().manual_seed(0)
    return pack(mixed_samples(cfg, g), 64, Specials.of(TOK), cfg.patches_per_image, num_rows=3)


def loss(model, b):
    dc = DiffusionConfig()
    model.zero_grad()
    out = training_loss(model, b, make_schedule(dc), dc, torch.Generator().manual_seed(1))
    out.total.backward()
    return out


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_identical_copies_are_the_shared_model(patcher):
    torch.manual_seed(0)
    shared = random_head(Transfusion(tiny(patcher=patcher, unet_channels=16, n_kv_heads=2))).train()
    mot = as_mot(shared).train()
    b = batch(shared.cfg)
    noisy = b.replace(timesteps=torch.full_like(b.timesteps, 300))
    with torch.no_grad():
        a, m = shared(noisy), mot(noisy)
    torch.testing.assert_close(m.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.image_pred, a.image_pred, atol=1e-5, rtol=1e-5)
    la, lm = loss(shared, b), loss(mot, b)
    torch.testing.assert_close(lm.total, la.total, atol=1e-5, rtol=1e-5)
    grads = dict(mot.named_parameters())
    for name, p in shared.named_parameters():
        t, i = mot_name(mot, name, "text"), mot_name(mot, name, "image")
        got = grads[t].grad if t == i else grads[t].grad + grads[i].grad  # a shared weight serves both
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_each_position_takes_its_own_modalitys_copy():
    """Text-only sequences never touch the image copies; patches never touch the text copies of the
    layers they go through (their gradients are zero); perturbing the image copies changes nothing
    a text-only sequence computes."""
    torch.manual_seed(0)
    mot = random_head(Transfusion(tiny(modality_weights="mot"))).train()
    text = pack(
        [Sample([Text(TOK.encode("only words"))])],
        32,
        Specials.of(TOK),
        mot.cfg.patches_per_image,
        num_rows=1,
    )
    before = mot(text).logits.detach()
    loss(mot, text)
    for name, p in mot.named_parameters():
        if ".image." in name:
            assert p.grad is None or not p.grad.any(), name
    with torch.no_grad():
        for name, p in mot.named_parameters():
            if ".image." in name:
                p.add_(1.0)
    assert torch.equal(mot(text).logits, before)


def test_flops_per_position_are_the_same_and_parameters_double_in_the_trunk():
    torch.manual_seed(0)
    shared = random_head(Transfusion(tiny(patcher="unet", unet_channels=16)))
    mot = as_mot(shared)
    b = batch(shared.cfg)
    b = b.replace(timesteps=torch.full_like(b.timesteps, 300))
    counts = []
    for model in (shared, mot):
        with FlopCounterMode(display=False) as counter:
            out = model(b)
            (out.logits.float().mean() + out.image_pred.mean()).backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0  # each position computed once, by one copy
    trunk = sum(p.numel() for p in shared.layers.parameters())
    assert mot.num_params() == shared.num_params() + trunk


def test_mot_with_discrete_images_is_refused():
    with pytest.raises(ValueError, match="modality_weights=mot needs continuous images"):
        tiny(
            modality_weights="mot", image_tokens="discrete", codebook_size=16, patch_size=1, latent_channels=1
        )
