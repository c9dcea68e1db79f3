"""``transfusion.Pipeline``: the library's face. A few lines of user code give what the CLI gives for the
same seeds; a model directory written by ``save_pretrained`` / ``export`` loads back to the same outputs;
the README's Python snippet runs as written."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from test_generate import random_head

from transfusion import Pipeline, cli
from transfusion.checkpoint import save_model
from transfusion.config import Config, VAEConfig, tiny
from transfusion.model import Transfusion
from transfusion.sequence import Specials
from transfusion.tokenizer import ByteTokenizer
from transfusion.vae import KLVAE, save_vae

ROOT = Path(__file__).parents[1]
METRICS = {"geneval_overall": 0.4321, "caption_accuracy": 0.75, "eval_steps": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model with a VAE (16 px images), a little more likely to draw an image in free text, and
    its run's evaluation beside it."""
    root = tmp_path_factory.mktemp("pipeline") / "ckpt"
    cfg = Config(model=tiny(max_seq_len=128), vae=VAEConfig(image_size=16, base_channels=8))
    torch.manual_seed(0)
    model = random_head(Transfusion(cfg.model))
    with torch.no_grad():
        model.lm_head.weight[Specials.of(ByteTokenizer()).boi, 0] = 0.6
        model.tok_emb.weight[:, 0] += 1.0
    save_model(
        root,
        model,
        cfg,
        ByteTokenizer(),
        {"step": 7, "tokens_seen": 12345, "flops_seen": 6.5e9, "vae": "vae"},
    )
    save_vae(KLVAE(cfg.vae).eval(), root / "vae")
    (root / "metrics.json").write_text(json.dumps(METRICS))
    return root


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(PILImage.open(i) if isinstance(i, (str, Path)) else i) for i in images]


def test_five_lines_give_what_the_cli_gives(checkpoint, tmp_path, capsys):
    pipe = Pipeline.from_pretrained(checkpoint, device="cpu")
    images = pipe.text_to_image("a red circle", n=2, steps=3, seed=5, progress=False)
    captions = pipe.caption(images, max_new_tokens=12)
    story = pipe.generate([images[0], "what is it?"], steps=3, max_new_tokens=20, seed=3)
    # the same through the command line
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a red circle", "--num-images", "2",
                     "--steps", "3", "--seed", "5", "--out", str(tmp_path / "t2i")]) == 0  # fmt: skip
    cli_images = pixels(sorted((tmp_path / "t2i").glob("output*_image0.png")))
    assert len(images) == 2 and all(np.array_equal(a, b) for a, b in zip(pixels(images), cli_images))
    images[0].save(tmp_path / "first.png")
    images[1].save(tmp_path / "second.png")
    capsys.readouterr()
    assert cli.main(["caption", "--checkpoint", str(checkpoint), "--max-new-tokens", "12",
                     str(tmp_path / "first.png"), str(tmp_path / "second.png")]) == 0  # fmt: skip
    printed = [line.split("\t", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert printed == [" ".join(c.split()) for c in captions]
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "first.png"),
                     "--prompt", "what is it?", "--text", "--steps", "3", "--max-new-tokens", "20", "--seed", "3",
                     "--out", str(tmp_path / "free")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "free" / "output.json").read_text())["outputs"][0]
    assert [("text" if isinstance(s, str) else "image") for s in story] == [next(iter(r)) for r in record]
    for seg, rec in zip(story, record):
        if isinstance(seg, str):
            assert seg == rec["text"]
        else:
            assert np.array_equal(np.asarray(seg), pixels([tmp_path / "free" / rec["image"]])[0])


def test_settings_and_wording_have_one_home(checkpoint):
    """The checkpoint's sampling defaults fill what is left None; an unknown relation wording, adapters
    (not in this version) and a prompt of nothing are one-line errors."""
    pipe = Pipeline.from_pretrained(checkpoint, device="cpu")
    gen = pipe.settings()
    d = pipe.config.diffusion
    assert (gen.sampler, gen.steps, gen.cfg_scale) == (d.sampler, d.sample_steps, d.cfg_scale)
    assert pipe.settings(steps=7, guidance=1.5).steps == 7 and pipe.settings(guidance=1.5).cfg_scale == 1.5
    assert (
        pipe.prompt_text("a red circle below a blue square", "reading-order")
        == "a blue square above a red circle"
    )
    assert pipe.prompt_text("a red circle below a blue square") == "a red circle below a blue square"  # auto
    with pytest.raises(Exception, match="relation_wording 'sideways'"):
        pipe.prompt_text("x", "sideways")
    with pytest.raises(FileNotFoundError, match="lora is not an adapter directory"):
        Pipeline.from_pretrained(checkpoint, device="cpu", adapters=["lora"])
    with pytest.raises(ValueError, match="the prompt is empty"):
        pipe.generate([])
    with pytest.raises(ValueError, match=r"is 24x24, but this model reads 16x16 images.*resize=True"):
        pipe.caption(PILImage.new("RGB", (24, 24)))
    with pytest.raises(ValueError, match=r"image 0: image is 8x8, smaller than the configured 16x16"):
        pipe.caption(PILImage.new("RGB", (8, 8)), resize=True)  # never upscaled
    notes: list[str] = []
    assert len(pipe.encode([PILImage.new("RGB", (24, 32))], resize=True, notes=notes)) == 1
    assert notes == ["image 0 is 24x32; resized and centre-cropped to 16x16"]


def test_a_model_directory_round_trips_with_its_card(checkpoint, tmp_path):
    """save_pretrained (and export) write config.json, the weights, the tokenizer, vae/ and a model card
    naming the run's numbers; from_pretrained reads it back to the same images; above the shard size
    the weights split into files with transformers' index, and load the same."""
    pipe = Pipeline.from_pretrained(checkpoint, device="cpu")
    out = pipe.save_pretrained(tmp_path / "exported")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json", "vae"]
    card = (out / "README.md").read_text()
    assert "library_name: transfusion" in card and "7 steps" in card and "12.3k positions seen" in card
    assert (
        "6.5GFLOPs" in card
        and "| geneval_overall | 0.4321 |" in card
        and "| caption_accuracy | 0.75 |" in card
    )
    assert 'Pipeline.from_pretrained("exported")' in card
    again = Pipeline.from_pretrained(out, device="cpu")
    a = pipe.text_to_image(["a red circle", "two blue squares"], steps=3, seed=1, progress=False)
    b = again.text_to_image(["a red circle", "two blue squares"], steps=3, seed=1, progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    assert json.loads((out / "config.json").read_text())["metrics"] == METRICS
    # sharded, through the CLI; every --checkpoint reads a model directory
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "sharded"),
                     "--max-shard-gb", "0.00005"]) == 0  # fmt: skip
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in files)
    c = Pipeline.from_pretrained(tmp_path / "sharded", device="cpu").text_to_image(
        ["a red circle", "two blue squares"], steps=3, seed=1, progress=False
    )
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(c)))
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "sharded"), "--prompt", "a red circle", "--steps", "3",
                     "--seed", "1", "--out", str(tmp_path / "from-dir")]) == 0  # fmt: skip
    assert np.array_equal(pixels([tmp_path / "from-dir" / "output0_image0.png"])[0], pixels(a)[0])
    # a directory that is not empty is refused, and nothing is half-written
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == names
    (tmp_path / "sharded" / files[1]).unlink()
    with pytest.raises(ValueError, match=f"is incomplete: {files[1]} is missing"):
        Pipeline.from_pretrained(tmp_path / "sharded", device="cpu")


def test_the_readme_python_snippet_runs_as_written(checkpoint, tmp_path, monkeypatch):
    """The first ```python block of the README, under '## Python', with the demo's path pointed at a
    tiny checkpoint (and the sampling steps cut for time): it draws, captions, generates interleaved
    and saves a model directory."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python") :]
    snippet = section[
        section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)
    ]
    assert 'Pipeline.from_pretrained("runs/demo/model")' in snippet
    monkeypatch.chdir(tmp_path)
    real_settings = Pipeline.settings
    monkeypatch.setattr(Pipeline, "settings", lambda self, **k: real_settings(self, **{**k, "steps": 2}))
    scope: dict = {}
    exec(compile(snippet.replace('"runs/demo/model"', repr(str(checkpoint))), "README.md", "exec"), scope)  # noqa: S102
    assert len(scope["images"]) == 4 and all(isinstance(i, PILImage.Image) for i in scope["images"])
    assert isinstance(scope["story"], list) and scope["story"]
    assert (tmp_path / "my-model" / "config.json").is_file() and (
        tmp_path / "my-model" / "README.md"
    ).is_file()
