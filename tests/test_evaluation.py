"""The shapes evaluation counts what it is shown: right images, wrong ones, and blank ones."""

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
