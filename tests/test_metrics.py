"""Every metric on hand-built cases whose answer is known."""

import math

import numpy as np
import pytest

from transfusion.evaluation import metrics as M


def test_composition_scores_mean_over_kinds():
    s = M.composition_scores([("a", True), ("a", False), ("b", True), ("b", True), ("b", True), ("b", False)])
    assert s["a"] == 0.5 and s["b"] == 0.75 and s["overall"] == pytest.approx(0.625)


def test_cider_identical_and_disjoint():
    refs = [["a red circle"], ["two blue squares"], ["a green triangle"]]
    assert M.cider_d(["purple elephant", "x y", "z"], refs) == 0.0
    same = M.cider_d(["a red circle", "two blue squares", "a green triangle"], refs)
    assert same > 5 and M.cider_d(["a red square", "two blue squares", "a green triangle"], refs) < same
    with pytest.raises(ValueError):
        M.cider_d(["a"], [])


def test_cider_matches_coco_caption():
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    cands = ["a red circle", "two blue squares", "a green triangle above a red circle", "a cyan square"]
    refs = [["a red circle", "one red circle"], ["two blue squares", "a pair of blue squares"],
            ["a green triangle above a red circle"], ["a cyan square and a red circle", "a cyan square"]]  # fmt: skip
    theirs, _ = cider.Cider().compute_score(dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)})
    assert M.cider_d(cands, refs) == pytest.approx(theirs, rel=1e-9)


def test_perplexity_and_bits_per_byte():
    V, n = 256, 100
    nll = n * math.log(V)  # a uniform model over 256 bytes
    assert M.perplexity(nll, n) == pytest.approx(256)
    assert M.bits_per_byte(nll, n) == pytest.approx(8.0)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (200000, 2)) * [1.0, 2.0]
    y = rng.normal(0, 1, (200000, 2)) * [3.0, 0.5] + [1.0, -2.0]
    s1, s2 = np.array([1.0, 4.0]), np.array([9.0, 0.25])
    expected = 1 + 4 + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert M.frechet_distance(x, y) == pytest.approx(expected, rel=0.02)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fashion_caption_class_parsing():
    from transfusion.evaluation.fashion import class_named

    assert class_named("a photo of an ankle boot") == 9
    assert class_named("a t-shirt") == 0 and class_named("a shirt") == 6  # the longest name wins
    assert class_named("a picture of a sneaker.") == 7 and class_named("a cat") is None


def test_precision_recall_on_known_clouds():
    """Kynkaanniemi et al.'s precision (generated points inside the real manifold) and recall (real
    points inside the generated one), against a brute-force count."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    same = rng.normal(size=(200, 4))
    p, r = M.precision_recall(real, same)
    assert p > 0.9 and r > 0.9  # the same distribution
    far = rng.normal(size=(200, 4)) + 50.0
    assert M.precision_recall(real, far) == (0.0, 0.0)
    collapsed = np.repeat(real[:2], 25, axis=0) + 1e-3 * rng.normal(size=(50, 4))  # two real modes only
    p, r = M.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.2  # realistic, but covers little
    # brute force: the 3rd nearest other real point sets each real point's radius
    half = rng.normal(size=(50, 4)) * 0.5
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radius = np.sort(d_rr, axis=1)[:, 3]
    inside = (np.linalg.norm(half[:, None] - real[None], axis=-1) <= radius[None]).any(1)
    assert M.precision_recall(real, half)[0] == pytest.approx(inside.mean())
    with pytest.raises(ValueError, match="more than 3"):
        M.precision_recall(real, far[:3])
