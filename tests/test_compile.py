"""``training.parallelize``: activation checkpointing and torch.compile (on by default on CUDA) give the
eager numbers, keep the weights' names, compile what the model actually calls (the blocks and the
patcher's encode/decode), compile once for the packed batch's shape, and fall back to eager with one
line when compiling fails."""

import pytest
import torch

from transfusion.config import Config, DiffusionConfig, TrainConfig, tiny
from transfusion.diffusion import make_schedule
from transfusion.distributed import DistInfo
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack
from transfusion.training.parallelize import compile_model, compiled_graphs, parallelize, should_compile

from helpers import TOK, latent


def batch(cfg, n_images, seed, rows=4, seq_len=64):
    g = torch.Generator().manual_seed(seed)
    samples = [
        Sample([Text(TOK.encode("a red circle")), Image(latent(cfg, g), seed=i)]) for i in range(n_images)
    ]
    return pack(samples, seq_len, Specials.of(TOK), cfg.patches_per_image, num_rows=rows)


def twins(cfg):
    torch.manual_seed(0)
    a = Transfusion(cfg)
    b = Transfusion(cfg)
    b.load_state_dict(a.state_dict())
    return a, b


def loss_and_grads(model, b):
    dc = DiffusionConfig()
    model.zero_grad()
    loss = training_loss(model, b, make_schedule(dc), dc)
    loss.total.backward()
    return loss.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compile_defaults_to_cuda_only():
    cfg = Config(train=TrainConfig())
    assert should_compile(cfg, torch.device("cuda")) and not should_compile(cfg, torch.device("cpu"))
    cfg.train.compile = True
    assert should_compile(cfg, torch.device("cpu"))


def test_the_patchers_encode_and_decode_are_compiled():
    """The model calls ``patcher.encode`` / ``decode`` directly (not the patcher's ``__call__``): a graph
    is built when encode is called directly, which ``nn.Module.compile`` on the patcher never did."""
    torch._dynamo.reset()
    cfg = tiny(patcher="unet", unet_channels=16)
    model = Transfusion(cfg)
    names = set(model.state_dict())
    compile_model(model, backend="eager")
    assert set(model.state_dict()) == names  # names unchanged: checkpoints load either way
    before = compiled_graphs()
    x, t = torch.randn(3, *latent(cfg).shape), torch.tensor([1, 500, 999])
    tokens, ctx = model.patcher.encode(x, t)
    assert compiled_graphs() > before
    after_encode = compiled_graphs()
    model.patcher.decode(tokens, ctx)
    assert compiled_graphs() > after_encode


def test_blocks_share_one_graph_and_image_counts_do_not_recompile():
    torch._dynamo.reset()
    cfg = tiny(n_layers=4)
    model = Transfusion(cfg)
    compile_model(model, backend="eager")
    dc = DiffusionConfig()
    before = compiled_graphs()
    training_loss(model, batch(cfg, 3, 3), make_schedule(dc), dc).total.backward()
    first = compiled_graphs() - before
    for n_images in (5, 4, 2):  # the patcher's batch changes; the blocks' shape (4 rows x 64) does not
        training_loss(model, batch(cfg, n_images, n_images), make_schedule(dc), dc).total.backward()
    # the blocks' graph, the patcher's encode and decode; a second patcher graph when its batch size
    # first changes (dynamic shapes from then on): nothing per image count, nothing per block
    assert first <= 3 and compiled_graphs() - before - first <= 2


def test_a_compile_failure_warns_once_and_runs_eagerly(capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler on this machine")

    torch._dynamo.reset()
    cfg = tiny()
    eager, compiled = twins(cfg)
    compile_model(compiled, backend=broken)
    b = batch(cfg, 3, 0)
    for _ in range(2):
        want, got = loss_and_grads(eager, b), loss_and_grads(compiled, b)
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed for layers.0") == 1
    # one line per compiled piece (each block, the patcher's encode and decode), once each
    assert "no compiler on this machine" in err and err.count("running it eagerly") == cfg.n_layers + 2


@pytest.mark.parametrize("mode", ["full", "every:2"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    cfg = tiny(n_layers=4, patcher="unet", unet_channels=16)
    plain, ckpt = twins(cfg)
    parallel = parallelize(
        ckpt, Config(model=cfg, train=TrainConfig(activation_checkpointing=mode)), DistInfo()
    )
    assert parallel.checkpointed == ([0, 1, 2, 3] if mode == "full" else [0, 2])
    assert set(ckpt.state_dict()) == set(plain.state_dict())
    b = batch(cfg, 5, 1)
    (want_loss, want), (got_loss, got) = loss_and_grads(plain, b), loss_and_grads(ckpt, b)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=0)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)


def saved_bytes(model, b):
    """Bytes of the distinct tensors autograd keeps for the backward pass of one training forward."""
    seen: dict[int, int] = {}

    def pack_hook(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    dc = DiffusionConfig()
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss = training_loss(model, b, make_schedule(dc), dc).total
    loss.backward()
    return sum(seen.values())


def test_full_checkpointing_keeps_a_fraction_of_the_activations():
    cfg = tiny(n_layers=6, dim=128)
    plain, ckpt = twins(cfg)
    parallelize(ckpt, Config(model=cfg, train=TrainConfig(activation_checkpointing="full")), DistInfo())
    b = batch(cfg, 12, 0, rows=4, seq_len=128)
    params = sum(p.numel() * 4 for p in plain.parameters())
    kept, full = saved_bytes(ckpt, b) - params, saved_bytes(plain, b) - params
    assert kept < 0.35 * full, (kept, full)


def test_activation_checkpointing_is_validated():
    for bad in ("some", "every:0", "every:x", "every"):
        with pytest.raises(ValueError, match="activation_checkpointing"):
            TrainConfig(activation_checkpointing=bad)


@pytest.mark.slow
def test_compiled_training_step_equals_eager_on_the_cpu():
    """Inductor's CPU backend stands in for CUDA here: the same graphs, the same numbers."""
    cfg = tiny(patcher="unet", unet_channels=16)
    eager, compiled = twins(cfg)
    full = Config(model=cfg, train=TrainConfig(compile=True, activation_checkpointing="every:2"))
    assert parallelize(compiled, full, DistInfo()).compiled
    for n_images in (3, 5, 4):
        b = batch(cfg, n_images, n_images)
        (want_loss, want), (got_loss, got) = loss_and_grads(eager, b), loss_and_grads(compiled, b)
        torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_mot_blocks_compile_once_for_any_number_of_patches():
    """With modality-specific weights each copy gathers as many positions as the batch has of its
    modality: the blocks compile with dynamic shapes, not once per image count."""
    torch._dynamo.reset()
    cfg = tiny(n_layers=2, modality_weights="mot")
    model = Transfusion(cfg)
    compile_model(model, backend="eager")
    dc = DiffusionConfig()
    before = compiled_graphs()
    for n_images in (3, 5, 4, 2):
        training_loss(model, batch(cfg, n_images, n_images), make_schedule(dc), dc).total.backward()
    assert compiled_graphs() - before <= 5  # blocks, encode, decode, and a dynamic recompile of the patcher
