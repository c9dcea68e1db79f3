"""The synthetic scenes: deterministic, described exactly, and read back by the detector."""

from collections import Counter

import numpy as np
import pytest

from transfusion.data.shapes import (
    COLORS,
    KINDS,
    Scene,
    SceneObject,
    ShapesDataset,
    detect_scene,
    eval_prompts,
    judge_caption,
    judge_image,
    parse_caption,
    render,
)


def objects(scene):
    return sorted((o.color, o.shape, o.size) for o in scene.objects)


def test_deterministic_per_seed_and_index():
    a, b, c = ShapesDataset(seed=1), ShapesDataset(seed=1), ShapesDataset(seed=2)
    assert np.array_equal(np.asarray(a[5].image), np.asarray(b[5].image)) and a[5].text == b[5].text
    assert not all(np.array_equal(np.asarray(a[i].image), np.asarray(c[i].image)) for i in range(5))
    assert a[0].image.size == (32, 32) and a[0].image.mode == "RGB"


def test_descriptions_match_pixels():
    ds = ShapesDataset()
    for i in range(50):
        r = ds[i]
        arr = np.asarray(r.image)
        for o in Scene.from_dict(r.meta["scene"]).objects:
            y, x = int(o.cy * 32), int(o.cx * 32)
            if o.shape == "triangle":
                y += 1  # a triangle's centroid sits below its box centre
            assert tuple(arr[y, x]) == COLORS[o.color], (r.text, o)


@pytest.mark.parametrize("size,noise", [(32, 0.0), (32, 8.0), (64, 0.0)])
def test_detector_accuracy_at_least_99_percent(size, noise):
    ds = ShapesDataset(image_size=size, seed=3)
    rng = np.random.default_rng(0)
    n, right = 300 if size == 32 else 100, 0
    for i in range(n):
        r = ds[i]
        arr = np.asarray(r.image).astype(np.float32)
        arr = np.clip(arr + rng.normal(0, noise, arr.shape), 0, 255)
        found = detect_scene(arr)
        truth = Scene.from_dict(r.meta["scene"])
        right += objects(found) == objects(truth) and judge_image(found, r.meta["spec"])
    assert right / n >= 0.99


def test_captions_parse_back_and_judge_true():
    ds = ShapesDataset(seed=4)
    for i in range(300):
        r = ds[i]
        spec = parse_caption(r.text)
        assert spec is not None, r.text
        assert [o["shape"] for o in spec["objects"]] == [o["shape"] for o in r.meta["spec"]["objects"]]
        scene = Scene.from_dict(r.meta["scene"])
        assert judge_caption(r.text, scene), r.text
        # captions without colours ("a circle and a square") are not complete descriptions
        assert judge_caption(r.text, scene, require_colors=True) == (r.meta["kind"] != "two_objects"), r.text


def test_judges_reject_wrong_colour_count_and_position():
    left, right = (
        SceneObject("circle", "red", "large", 0.27, 0.5),
        SceneObject("square", "blue", "small", 0.73, 0.5),
    )
    scene = Scene([left, right])
    spec = parse_caption("a red circle to the left of a blue square")
    assert judge_image(scene, spec) and judge_caption("a red circle to the left of a blue square", scene)
    assert not judge_image(scene, parse_caption("a red circle to the right of a blue square"))
    assert not judge_image(scene, parse_caption("a green circle to the left of a blue square"))
    assert not judge_image(Scene([left]), parse_caption("two red circles"))
    assert judge_image(
        Scene([left, SceneObject("circle", "red", "large", 0.73, 0.5)]), parse_caption("two red circles")
    )
    assert not judge_caption("a red circle", scene)  # misses the square
    assert parse_caption("a purple elephant") is None and parse_caption("") is None


def test_kinds_all_present_and_eval_prompts_held_out():
    kinds = Counter(ShapesDataset(seed=0)[i].meta["kind"] for i in range(600))
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 50
    prompts = eval_prompts(3)
    assert Counter(p.meta["kind"] for p in prompts) == {k: 3 for k in KINDS}
    for p in prompts:
        assert judge_image(detect_scene(p.image), p.meta["spec"])


def test_render_draws_nothing_for_an_empty_scene():
    assert np.asarray(render(Scene([]), 32)).max() == 0
    assert detect_scene(render(Scene([]), 32)).objects == []
