"""The training step's hot path never waits for the device, except once a step for the numbers it
reports and decides on.

The meta device stands in for a GPU: its tensors hold no data, so anything that would copy a value to
the host (``.item()``, ``.tolist()``, ``bool(t)``, a boolean-mask index, ``nonzero``) raises there. A
whole optimizer step runs with the model and the batches on it, the one intended copy counted."""

import pytest
import torch

from transfusion.config import Config, tiny
from transfusion.diffusion import make_schedule
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Specials, pack
from transfusion.training.step import make_optimizer, train_step

from distributed_run import text_only
from helpers import TOK, mixed_samples

MODELS = {"shared": tiny(), "mot": tiny(modality_weights="mot"), "unet": tiny(patcher="unet")}


def batches(cfg: Config):
    mixed = pack(mixed_samples(cfg.model), 64, Specials.of(TOK), cfg.model.patches_per_image)
    return [mixed, text_only(mixed, TOK.pad_id)]


@pytest.mark.parametrize("kind", MODELS)
def test_a_training_step_waits_for_the_device_once(kind, monkeypatch):
    """Two micro-batches (one with images, one text-only), forward, backward, the global norm,
    clipping, the skip decision and AdamW, on the meta device: the one host copy is the step's
    (text, image, norm) at the end. The noise is drawn from the batches' host copies (``MixedBatch.
    host``): the device batches' timesteps, seeds and noise-limit flags are meta tensors."""
    cfg = Config(model=MODELS[kind])
    model = Transfusion(cfg.model).to("meta")
    opt = make_optimizer(model, cfg.train)
    copies: list[tuple[int, ...]] = []
    real = torch.Tensor.tolist

    def tolist(t):
        if t.device.type != "meta":
            return real(t)
        copies.append(tuple(t.shape))
        return [1.0] * t.numel()

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    on_device = [b.to("meta") for b in batches(cfg)]
    assert all(b.host is not None and b.timesteps.device.type == "meta" for b in on_device)
    result = train_step(
        model, opt, on_device, make_schedule(cfg.diffusion), cfg.diffusion, lr=1e-3, grad_clip=1.0
    )
    assert result.finite and copies == [(3,)]


def test_the_meta_device_catches_a_host_sync():
    """The check can fail: a boolean-mask index (what ``image_outputs`` used to do) raises on meta."""
    h = torch.zeros(2, 8, 4, device="meta")
    with pytest.raises(NotImplementedError):
        h[torch.ones(2, 8, dtype=torch.bool, device="meta")]
    with pytest.raises(RuntimeError):
        torch.zeros((), device="meta").item()


@pytest.mark.parametrize("kind", ["shared", "mot"])
def test_the_model_call_traces_as_one_graph(kind):
    """``model(batch)`` under ``torch.compile(fullgraph=True)``: a data-dependent branch or a host copy
    would be a graph break, an error here. Traced only (the eager backend), and equal to eager, for a
    batch with images and a text-only one."""
    cfg = Config(model=MODELS[kind])
    torch.manual_seed(0)
    model = Transfusion(cfg.model)
    traced = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    for b in batches(cfg):
        b = b.replace(timesteps=torch.full_like(b.timesteps, 300))
        want, got = model(b), traced(b)
        assert torch.equal(want.logits, got.logits) and torch.equal(want.image_pred, got.image_pred)
    torch._dynamo.reset()


def test_a_text_only_micro_batch_gives_every_parameter_a_gradient():
    """``Transfusion.idle_image_term``: with no image in the batch, the patcher, the timestep MLP and the
    image copies of an MoT trunk still get a gradient (zero), so DDP and FSDP2 see the same set of
    gradients on every rank; the loss and the text gradients are those of the plain text model."""
    for kind in MODELS:
        cfg = Config(model=MODELS[kind])
        torch.manual_seed(0)
        model = Transfusion(cfg.model)
        b = batches(cfg)[1]
        losses = training_loss(model, b, make_schedule(cfg.diffusion), cfg.diffusion)
        losses.total.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (kind, missing)
        image_side = [
            p.grad for n, p in model.named_parameters() if n.startswith("patcher.") or ".image." in n
        ]
        assert image_side and all(torch.count_nonzero(g) == 0 for g in image_side)
        with torch.no_grad():  # no gradient, no idle term: the same loss to the bit
            again = training_loss(model, b, make_schedule(cfg.diffusion), cfg.diffusion)
        assert torch.equal(losses.total.detach(), again.total) and float(again.image) == 0.0
