"""The shapes evaluation counts what it is shown: right images, wrong ones, and blank ones."""

import pytest
import torch

from transfusion.data.shapes import KINDS
from transfusion.evaluation import shapes
from transfusion.vae import pil_to_tensor

from helpers import PixelVAE


def test_composition_scores_right_wrong_and_blank_images(monkeypatch):
    """Each prompt is answered with its own rendering (right), a black image (blank), or another
    prompt's rendering (wrong, not blank), in turn: the scores and the blank rates count them."""

    def answer(decoder, texts, gen, seeds):
        prompts = shapes.eval_prompts(3, seed=100, image_size=32)
        out = []
        for i, p in enumerate(prompts):
            if i % 3 == 0:
                out.append(pil_to_tensor([p.image])[0])
            elif i % 3 == 1:
                out.append(torch.full((3, 32, 32), -1.0))  # black: nothing drawn
            else:
                other = prompts[(i + 3) % len(prompts)]  # another kind's scene
                out.append(pil_to_tensor([other.image])[0])
        return out

    monkeypatch.setattr(shapes, "text_to_image", answer)
    scores, rows, pairs = shapes.composition(None, PixelVAE(), 3, None, 32, 100)
    assert len(rows) == 3 * len(KINDS) and len(pairs) == len(rows)
    assert [r["blank"] for r in rows] == [i % 3 == 1 for i in range(len(rows))]
    for kind in KINDS:
        assert scores[kind] == 1 / 3  # only the first of each kind's three is right
        assert scores[f"blank_rate_{kind}"] == 1 / 3
    assert scores["blank_rate"] == 1 / 3 and scores["overall"] == 1 / 3


def test_well_formed_objects_rendered_blurred_noisy_and_blocky():
    """Rendered scenes and a light blur (a good VAE's) are read with confidence; a smear, noise and
    4x4-pixel blocks (code-like artefacts) are not."""
    import numpy as np
    from PIL import Image, ImageFilter

    from transfusion.data.shapes import ShapesDataset
    from transfusion.evaluation.scenes import well_formed

    ds = ShapesDataset(32, seed=5)
    images = [ds[i].image for i in range(60)]
    rng = np.random.default_rng(0)

    def share(f):
        marks = [w for im in images for w in well_formed(f(im))]
        return sum(marks) / len(marks)

    def noisy(im):
        return Image.fromarray(
            (np.asarray(im, np.float32) + rng.normal(0, 40, (32, 32, 3))).clip(0, 255).astype(np.uint8)
        )

    assert share(lambda im: im) == 1.0
    assert share(lambda im: im.filter(ImageFilter.GaussianBlur(0.6))) == 1.0
    assert share(lambda im: im.filter(ImageFilter.GaussianBlur(1.2))) < 0.4
    assert share(noisy) < 0.1
    assert share(lambda im: im.resize((8, 8), Image.BILINEAR).resize((32, 32), Image.NEAREST)) < 0.1
    assert well_formed(Image.new("RGB", (32, 32))) == []


@pytest.mark.slow  # trains the FD classifier (1000 steps, about a minute on 2 cores)
def test_image_metrics_move_the_right_way_down_a_ladder_of_degradations():
    """FD, precision, recall and well-formedness on real scenes, then blurred, noisy, blocky (code-like),
    with objects removed, and blank: each moves the way it should against the real-vs-real rung."""
    clf, acc = shapes.train_scene_classifier(32)
    assert acc > 0.9
    got = shapes.ladder_scores(clf)
    real = got.pop("real")
    assert real["precision"] > 0.9 and real["recall"] > 0.8 and real["well_formed"] == 1.0
    for rung, g in got.items():
        assert g["fd"] > 2 * real["fd"], rung  # every degradation moves FD away
        assert g["recall"] < real["recall"] - 0.3, rung  # and loses coverage of the real scenes
    for rung in ("blur", "noise", "blocky", "blank"):  # off the real manifold, badly drawn
        assert got[rung]["precision"] < real["precision"] - 0.4, rung
        assert got[rung]["well_formed"] < 0.4, rung
    # removing objects keeps every image realistic and well drawn: only recall and FD see it
    assert got["removed"]["precision"] > 0.9 and got["removed"]["well_formed"] == 1.0
    assert got["blank"]["precision"] == got["blank"]["recall"] == 0.0


def test_prompts_in_reading_order_are_judged_against_the_prompt_as_written(monkeypatch):
    """A stand-in for a model trained on reading-order captions only: it draws the prompt's scene but
    always puts the object named first above or left, whatever the relation word. Given the prompts
    rewritten into reading order it is right on every position prompt; given them as written, only on
    those that already said "above" or "to the left of" (the rest come out flipped), and the
    evaluation reports both, redrawing the rewritten prompts with their own seeds."""
    from dataclasses import replace

    from transfusion.data.shapes import Scene, reading_order, render

    prompts = shapes.eval_prompts(8, seed=100, image_size=32)
    given: list[tuple[str, int]] = []

    def reading_order_model(decoder, texts, gen, seeds):
        out = []
        for text, seed in zip(texts, seeds):
            given.append((text, seed))
            p = prompts[seed]
            assert text in (p.text, reading_order(p.text))
            scene = Scene.from_dict(p.meta["scene"])
            if " below " in text or " to the right of " in text:  # the word is ignored: first-named top/left
                a, b = scene.objects
                scene = Scene([replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)])
            out.append(pil_to_tensor([render(scene, 32)])[0])
        return out

    monkeypatch.setattr(shapes, "text_to_image", reading_order_model)
    written, rows, _ = shapes.composition(None, PixelVAE(), 8, None, 32, 100)
    assert "position_as_written" not in written and len(given) == len(prompts)
    position = [p for p in prompts if p.meta["kind"] == "position"]
    forward = sum(p.meta["spec"]["relation"] in ("above", "to the left of") for p in position) / len(position)
    assert 0 < forward < 1 and written["position"] == forward and written["position_order"] == forward

    given.clear()
    scores, rows, _ = shapes.composition(None, PixelVAE(), 8, None, 32, 100, in_reading_order=True)
    assert scores["position"] == 1.0 and scores["position_order"] == 1.0
    assert scores["position_as_written"] == forward and scores["position_order_as_written"] == forward
    assert scores["overall_as_written"] == written["overall"] < scores["overall"]
    for kind in KINDS:
        if kind != "position":
            assert scores[kind] == written[kind] == 1.0
    assert all(" below " not in r["asked"] and " right of " not in r["asked"] for r in rows)
    assert [r["prompt"] for r in rows] == [p.text for p in prompts]  # judged against the prompt as written
    redrawn = given[len(prompts) :]
    assert len(redrawn) == round(len(position) * (1 - forward))
    assert all(text == prompts[seed].text and reading_order(text) != text for text, seed in redrawn)


def test_evaluate_checkpoint_passes_each_setting_to_its_own_parameter(monkeypatch):
    """The shapes evaluator gets the guidance interval and the prompt wording under their names (they
    sit after other optional parameters, where a positional call would shift them)."""
    import inspect

    from transfusion.config import Config
    from transfusion.evaluation import evaluate_checkpoint

    got, signature = {}, inspect.signature(shapes.evaluate)

    def fake_evaluate(*args, **kwargs):
        got.update(signature.bind(*args, **kwargs).arguments)
        return {}, {}

    monkeypatch.setattr(shapes, "evaluate", fake_evaluate)
    pipe = type("FakePipeline", (), {"config": Config()})()
    evaluate_checkpoint(pipe, "out", 3, 4, 5, "flow", 2.0, 7, None, 600, "reading-order")
    assert got["pipe"] is pipe and got["guidance_max_t"] == 600 and got["relation_wording"] == "reading-order"
    assert "fd_cache" not in got
    assert (got["n_per_kind"], got["n_captions"], got["steps"], got["sampler"], got["cfg_scale"], got["seed"]) == (
        3, 4, 5, "flow", 2.0, 7,
    )  # fmt: skip
