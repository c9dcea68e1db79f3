"""`transfusion encode`: a dataset (here WebDataset shards of JPEGs) through a VAE (here a diffusers
AutoencoderKL, the paper's 8x kind) into latent shards, once, resumable, by every torchrun rank; and
training that streams them without decoding an image."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfusion import cli
from transfusion.autoencoders import load_vae
from transfusion.config import DataConfig, VAEConfig
from transfusion.data.latents import LatentShards
from transfusion.data.sources import make_source
from transfusion.vae import KLVAE, encode_images, save_vae


def write_shards(root: Path, n: int = 24, size: int = 64) -> str:
    """Two tar shards of ``n`` JPEG scenes (the built-in shapes, enlarged) with captions."""
    src = make_source(DataConfig(source="shapes", image_size=32, seed=3))
    for shard in range(2):
        with tarfile.open(root / f"part-{shard}.tar", "w") as tar:
            for i in range(shard * n // 2, (shard + 1) * n // 2):
                rec = src[i]
                buf = io.BytesIO()
                rec.image.resize((size, size)).save(buf, format="JPEG", quality=95)
                for name, data in ((f"k{i:04d}.jpg", buf.getvalue()), (f"k{i:04d}.txt", rec.text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / "part-{0..1}.tar")


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.7,
    ).eval()  # fmt: skip
    path = tmp_path_factory.mktemp("hf") / "vae"
    vae.save_pretrained(path)
    return path


def test_encode_webdataset_through_a_diffusers_vae_then_train_on_the_latents(
    tmp_path, diffusers_vae, monkeypatch
):
    pattern = write_shards(tmp_path)
    out = tmp_path / "latents"
    args = ["encode", "--vae", str(diffusers_vae), "--data", "webdataset", "--data-path", pattern, "--out", str(out),
            "--shard-size", "8", "--num-workers", "2", "--no-progress", "--set", "data.val_fraction=0.2"]  # fmt: skip
    assert cli.main(args) == 0
    vae = load_vae(diffusers_vae)
    assert vae.config.downsample == 8
    data = DataConfig(source="webdataset", path=pattern, image_size=64, val_fraction=0.2)
    for split in ("train", "val"):
        source, store = make_source(data, split), LatentShards(out / split)
        assert len(store) == len(source) > 0 and store.meta["dtype"] == "float16"
        want = encode_images(vae, [source[i].image for i in range(len(source))])  # (N, 8, 8, 8)
        got = torch.stack([store[i].latent for i in range(len(store))]).float()
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # stored as float16
        assert [store[i].text for i in range(len(store))] == [source[i].text for i in range(len(source))]
    # run again: every shard is there, nothing is encoded again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("shard_*.safetensors")}
    assert cli.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("shard_*.safetensors")} == stamps
    # train from the latents without opening an image
    monkeypatch.setattr(
        Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("an image was decoded"))
    )
    run = tmp_path / "run"
    train = ["train", "--preset", "tiny", "--data", "latents", "--data-path", str(out), "--vae", str(diffusers_vae),
             "--out", str(run), "--steps", "3", "--no-progress", "--set", "model.latent_size=8",
             "--set", "model.latent_channels=8", "--set", "train.seq_len=96", "--set", "train.eval_every=3",
             "--set", "train.ckpt_every=3", "--set", "data.num_workers=1"]  # fmt: skip
    assert cli.main(train) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and lines[-1]["image_loss"] > 0 and "val_image_loss" in lines[-1]


def test_encode_refuses_another_vaes_store_and_training_refuses_another_vae(tmp_path, capsys):
    vaes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vaes.append(
            save_vae(KLVAE(VAEConfig(image_size=16, base_channels=8)).eval(), tmp_path / f"vae{seed}")
        )
    args = ["--data", "shapes", "--limit", "20", "--splits", "train", "--out", str(tmp_path / "lat"),
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    assert cli.main(["encode", "--vae", str(vaes[0]), *args]) == 0
    capsys.readouterr()
    assert cli.main(["encode", "--vae", str(vaes[1]), *args]) == 2
    assert "holds latents of another VAE" in capsys.readouterr().err
    train = ["train", "--preset", "tiny", "--data", "latents", "--data-path", str(tmp_path / "lat"), "--vae", str(vaes[1]),
             "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress", "--set", "train.eval_every=0"]  # fmt: skip
    assert cli.main(train) == 2
    assert "give the VAE the latents were made with" in capsys.readouterr().err


def test_every_torchrun_rank_encodes_its_own_shards(tmp_path):
    torch.manual_seed(0)
    vae = save_vae(KLVAE(VAEConfig(image_size=16, base_channels=8)).eval(), tmp_path / "vae")
    args = ["encode", "--vae", str(vae), "--data", "shapes", "--limit", "40", "--splits", "train",
            "--shard-size", "8", "--num-workers", "1", "--no-progress", "--device", "cpu"]  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "transfusion",
    ]
    r = subprocess.run([*cmd, *args, "--out", str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = LatentShards(tmp_path / "two" / "train"), LatentShards(tmp_path / "one" / "train")
    assert len(two) == len(one) == 40 and two.meta["shards"] == 5
    assert all(torch.equal(two[i].latent, one[i].latent) and two[i].text == one[i].text for i in range(40))
