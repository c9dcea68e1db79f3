"""torch.compile of the training model (on by default on CUDA): the compiled blocks and patcher give
the eager numbers, keep the weights' names, and compile once for the packed batch's shape."""

import pytest
import torch

from transfusion.config import Config, DiffusionConfig, TrainConfig, tiny
from transfusion.distributed import DistInfo
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack
from transfusion.training.loop import compile_model, compiled_graphs, should_compile

from helpers import TOK, latent


def batch(cfg, n_images, seed):
    g = torch.Generator().manual_seed(seed)
    samples = [
        Sample([Text(TOK.encode("a red circle")), Image(latent(cfg, g), seed=i)]) for i in range(n_images)
    ]
    return pack(samples, 64, Specials.of(TOK), cfg.patches_per_image, num_rows=4)


def test_compile_defaults_to_cuda_only():
    cfg = Config(train=TrainConfig())
    assert should_compile(cfg, torch.device("cuda")) and not should_compile(cfg, torch.device("cpu"))
    cfg.train.compile = True
    assert should_compile(cfg, torch.device("cpu"))


@pytest.mark.slow
def test_compiled_training_step_equals_eager_on_the_cpu():
    """Inductor's CPU backend stands in for CUDA here: the same graphs, the same numbers."""
    torch.manual_seed(0)
    cfg = tiny(patcher="unet", unet_channels=16)
    eager = Transfusion(cfg)
    compiled = Transfusion(cfg)
    compiled.load_state_dict(eager.state_dict())
    full = Config(model=cfg, train=TrainConfig(compile=True))
    compile_model(compiled, full, DistInfo())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged: checkpoints load
    dc = DiffusionConfig()
    from transfusion.diffusion import make_schedule

    before = compiled_graphs()
    for n_images in (3, 5, 4):  # the patcher's batch changes; the blocks' shape (4 rows x 64) does not
        b = batch(cfg, n_images, n_images)
        losses = [training_loss(m, b, make_schedule(dc), dc) for m in (eager, compiled)]
        torch.testing.assert_close(losses[1].total, losses[0].total, atol=1e-5, rtol=1e-5)
        for m, loss in zip((eager, compiled), losses):
            m.zero_grad()
            loss.total.backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    # one graph per block (forward), the patcher's encode/decode: no new graph per image count
    graphs = compiled_graphs() - before
    assert 0 < graphs <= 2 * cfg.n_layers + 6
