"""The autoencoder: shapes, training lowers the loss, PSNR, scale/shift, save/load, diffusers adapter."""

import json
import math

import numpy as np
import pytest
import torch

from transfusion import cli
from transfusion.autoencoders import load_vae, make_autoencoder
from transfusion.config import DataConfig, VAEConfig
from transfusion.data.shapes import ShapesDataset
from transfusion.training.vae import load_images, train_vae
from transfusion.vae import (
    KLVAE,
    compute_latent_stats,
    pil_to_tensor,
    psnr,
    tensor_to_pil,
    vae_hash,
)


@pytest.mark.parametrize("down", [4, 8])
def test_shapes(down):
    vae = KLVAE(VAEConfig(image_size=32, downsample=down, base_channels=8))
    z = vae.encode(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 8, 32 // down, 32 // down)
    assert vae.decode(z).shape == (2, 3, 32, 32)


def test_psnr_closed_form():
    a = torch.zeros(3, 3, 8, 8)
    b = a + 0.1  # MSE 0.01, range 2: 10 log10(4 / 0.01) = 26.0206 dB
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)
    c = torch.cat([a[:1] + 0.1, a[:1] + 0.2])  # per-image, then averaged
    assert psnr(a[:2], c) == pytest.approx((10 * math.log10(400) + 10 * math.log10(100)) / 2, rel=1e-6)


def test_pil_roundtrip():
    imgs = [ShapesDataset(16)[i].image for i in range(3)]
    back = tensor_to_pil(pil_to_tensor(imgs))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, back))


def test_training_lowers_loss_sets_stats_and_saves(tmp_path):
    ds = ShapesDataset(16, seed=0)
    train = pil_to_tensor([ds[i].image for i in range(256)])
    val = pil_to_tensor([ShapesDataset(16, seed=9)[i].image for i in range(32)])
    cfg = VAEConfig(image_size=16, base_channels=8)
    result = train_vae(cfg, train, val, tmp_path / "vae", steps=80, batch_size=16, lr=3e-3, progress=False)
    assert result["last_mse"] < 0.5 * result["first_mse"]
    vae = result["vae"]
    z = vae.to_diffusion(vae.encode(train[:256]))
    assert abs(z.mean().item()) < 0.05 and z.std().item() == pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(vae.from_diffusion(z), vae.encode(train[:256]), atol=1e-4, rtol=1e-4)
    metrics = json.loads((tmp_path / "vae" / "metrics.json").read_text())
    assert metrics["psnr_val"] == pytest.approx(result["psnr_val"]) and metrics["psnr_val"] > 10
    loaded = load_vae(tmp_path / "vae")
    assert loaded.config.scale == pytest.approx(vae.config.scale)
    torch.testing.assert_close(loaded.decode(loaded.encode(val)), vae.decode(vae.encode(val)))
    h = vae_hash(loaded)
    with torch.no_grad():
        loaded.decoder[0].weight[0, 0, 0, 0] += 1.0
    assert vae_hash(loaded) != h


def test_compute_latent_stats():
    vae = KLVAE(VAEConfig(image_size=16, base_channels=8))
    images = torch.randn(100, 3, 16, 16)
    scale, shift = compute_latent_stats(vae, images, batch_size=32)  # several batches
    with torch.no_grad():
        z = vae.encode(images).double()
    assert scale > 0 and math.isfinite(shift)
    # on the images they were computed from: exactly zero mean and unit variance (float64 reference)
    assert shift == pytest.approx(z.mean().item(), abs=1e-6)
    assert ((z - shift) * scale).std().item() == pytest.approx(1.0, abs=1e-4)
    assert ((z - shift) * scale).mean().item() == pytest.approx(0.0, abs=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no VAE"):
        load_vae(tmp_path)


def test_diffusers_adapter_roundtrip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.5,
    ).eval()  # fmt: skip
    ref.save_pretrained(tmp_path / "hf")
    ours = load_vae(tmp_path / "hf")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_ref = ref.encode(x).latent_dist.mean
        torch.testing.assert_close(ours.encode(x), z_ref)
        torch.testing.assert_close(ours.to_diffusion(z_ref), z_ref * 0.5)
        torch.testing.assert_close(ours.decode(z_ref), ref.decode(z_ref).sample)
    assert ours.config.latent_channels == 4 and ours.config.downsample == 4


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-vae", "--help"])
    assert e.value.code == 0
    out = tmp_path / "v"
    args = ["train-vae", "--out", str(out), "--image-size", "16", "--base-channels", "8", "--steps", "5",
            "--train-images", "64", "--val-images", "8"]  # fmt: skip
    assert cli.main(args) == 0
    # the reported PSNR is the saved autoencoder's on the command's held-out images, recomputed here
    val = load_images(DataConfig(source="shapes", image_size=16), "val", 8)
    vae = load_vae(out).eval()
    with torch.no_grad():
        expected = psnr(vae.reconstruct(val).clamp(-1, 1), val)
    reported = json.loads((out / "metrics.json").read_text())["psnr_val"]
    assert reported == pytest.approx(expected, abs=1e-3) and 5 < reported < 60
    (tmp_path / "file").write_text("x")
    assert cli.main(["train-vae", "--out", str(tmp_path / "file"), "--steps", "1"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_train_vae_resume_equals_straight(tmp_path):
    ds = ShapesDataset(16, seed=0)
    train = pil_to_tensor([ds[i].image for i in range(64)])
    val = train[:8]
    cfg = VAEConfig(image_size=16, base_channels=8)
    kw = {"steps": 12, "batch_size": 8, "progress": False, "ckpt_every": 4}
    a = train_vae(cfg, train, val, tmp_path / "a", **kw)
    assert (
        train_vae(VAEConfig(image_size=16, base_channels=8), train, val, tmp_path / "b", stop_after=6, **kw)[
            "stopped_at"
        ]
        == 6
    )
    b = train_vae(VAEConfig(image_size=16, base_channels=8), train, val, tmp_path / "b", resume=True, **kw)
    assert all(
        torch.equal(x, y) for x, y in zip(a["vae"].state_dict().values(), b["vae"].state_dict().values())
    )
    assert a["psnr_val"] == b["psnr_val"]
    with pytest.raises(ValueError, match="resume"):
        train_vae(cfg, train, val, tmp_path / "c", resume=True, **kw)


def test_grad_clip_caps_the_norm_it_records(tmp_path):
    """The history records the gradient's norm before the cap; a cap above every norm changes nothing,
    a cap below them changes the weights."""
    ds = ShapesDataset(16, seed=0)
    train = pil_to_tensor([ds[i].image for i in range(32)])
    kw = {"steps": 3, "batch_size": 8, "progress": False, "lr": 3e-3}

    def run(name, clip):
        return train_vae(VAEConfig(image_size=16, base_channels=8), train, train[:4], tmp_path / name,
                         grad_clip=clip, **kw)["vae"].state_dict()  # fmt: skip

    free, loose, tight = run("free", None), run("loose", 1e9), run("tight", 1e-4)
    assert all(torch.equal(free[k], loose[k]) for k in free)
    assert not all(torch.equal(free[k], tight[k]) for k in free)
    torch.manual_seed(0)
    vae = make_autoencoder(VAEConfig(image_size=16, base_channels=8))
    gen = torch.Generator().manual_seed(0)
    vae.loss(train[torch.randint(0, len(train), (8,), generator=gen)], gen)[
        0
    ].backward()  # train_vae's step 0
    first = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in vae.parameters() if p.grad is not None])
    )
    history = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert history["first_grad_norm"] == pytest.approx(first.item(), rel=1e-5)
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        run("negative", -1.0)


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_any_step_count_trains(tmp_path, steps):
    """Short runs: the warm-up is at least one step and never longer than the run (train-vae --steps 20
    used to divide by zero in its learning-rate schedule)."""
    out = tmp_path / "v"
    args = ["train-vae", "--out", str(out), "--image-size", "16", "--base-channels", "8", "--steps", str(steps),
            "--batch-size", "4", "--train-images", "16", "--val-images", "4", "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == steps and math.isfinite(metrics["psnr_val"])


def test_warmup_cosine_schedule():
    from transfusion.training import warmup_cosine

    lrs = [warmup_cosine(i, 20, 1, 1.0, 0.05) for i in range(20)]
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 18 / 19)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays from the peak, never rises again
    assert [warmup_cosine(i, 10, 4, 1.0, 0.0) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(0, 1, 1, 2e-3, 1e-4) == 2e-3  # a one-step run with a one-step warm-up
