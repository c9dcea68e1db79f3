"""Reading shape scenes back: the detector, and the judges of generated images and captions.

- ``judge_image(detect_scene(image), spec)``: does a generated image show what the prompt asked?
- ``judge_caption(text, scene)``: does a generated caption describe the scene correctly?
- ``relation_outcome(scene, spec)``: for a relation, right, flipped, on the other axis, or objects
  wrong (``order_share`` of those: right over right and flipped, 0.5 when word order is ignored).
  ``judge_caption_strict(text, scene, reference)`` also wants every colour and the relation the
  reference caption states.
- ``well_formed(image)``: is each object the detector finds read with confidence (colour, solidity,
  shape)? The share of well-formed objects separates clean shapes from smeared blobs, which FD in a
  small classifier's features does not always do.

The detector (``detect_scene``) models every pixel as a palette colour scaled by a coverage in [0, 1]
over the black background, which is what blur (a VAE decoder's, or a resize's) makes of an object's
edge; a pixel belongs to an object when it is at least half covered. Shapes are told apart by two
measures that blur barely moves: the skewness of the object's vertical mass profile (a triangle, apex
up, piles its mass near its base) and how far it reaches along the diagonals compared with the axes
(a square sqrt(2) times as far, a circle as far).
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

import numpy as np
from PIL import Image

from transfusion.data.base import Record
from transfusion.data.shapes import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    SIZES,
    Scene,
    SceneObject,
    parse_phrase,
    relation,
)

# detection
MIN_AREA_FRACTION = 0.012  # components smaller than this share of the image are noise
MAX_COLOR_DISTANCE = 90.0  # how far (RGB, 0-255) a pixel may lie from every scaled palette colour
MIN_COVERAGE = 0.5  # a pixel belongs to an object when it holds at least this much of its colour
HALO_PER_32_PIXELS = 2  # how far blur may spread an object's edge, in pixels per 32 of the side
TRIANGLE_MAX_SKEW = -0.2  # vertical skewness: triangle (apex up) -0.57, circle and square 0
SQUARE_MIN_DIAGONAL = 1.15  # diagonal over axial extent: square sqrt(2), circle 1
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2
# well-formedness: an object read with confidence (see ``well_formed``)
WELL_FORMED_MAX_RESIDUAL = 20.0  # median distance (RGB) of its pixels from its scaled palette colour
WELL_FORMED_MIN_COVERAGE = 0.85  # median coverage of its pixels: solid, not a smear
WELL_FORMED_FILL = {"triangle": (0.42, 0.72), "circle": (0.66, 0.9), "square": (0.86, 1.01)}
"""Share of its box an object's pixels fill: rendered triangles 0.50-0.56, circles 0.75-0.81,
squares 1.0 at 32 px; a Gaussian blur of 0.8 px moves triangles to 0.68."""


def parse_caption(text: str) -> dict[str, Any] | None:
    """The prompt spec of a caption in the template language (``{"objects": [...], "relation": ...}``,
    without a kind), or None when it does not parse."""
    words = text.strip().lower().rstrip(".").split()
    if not words:
        return None
    parts: list[list[str]] = [words]
    rel = None
    for r in RELATIONS:
        rw = r.split()
        hits = [i for i in range(len(words) - len(rw) + 1) if words[i : i + len(rw)] == rw]
        if hits:
            rel, i = r, hits[0]
            parts = [words[:i], words[i + len(rw) :]]
            break
    if rel is None:
        for sep in ("and", "with"):
            if sep in words:
                i = words.index(sep)
                parts = [words[:i], words[i + 1 :]]
                break
    objects = []
    for p in parts:
        obj = parse_phrase(p)
        if obj is None:
            return None
        objects.append(obj)
    return {"objects": objects, "relation": rel}


# --- judging -----------------------------------------------------------------------------------------
def _as_spec(prompt: Record | dict[str, Any]) -> dict[str, Any]:
    """A prompt spec from a ``Record``, its ``meta`` or the spec itself."""
    if isinstance(prompt, Record):
        prompt = prompt.meta
    if "spec" in prompt:
        prompt = prompt["spec"]
    if "objects" not in prompt:
        raise ValueError(f"not a prompt spec, record or meta: {sorted(prompt)}")
    return prompt


def _matches(o: SceneObject, want: dict[str, Any]) -> bool:
    """Whether an object fits a prompt object (colour and size only where the prompt states them)."""
    return (
        o.shape == want["shape"]
        and want.get("color") in (None, o.color)
        and want.get("size") in (None, o.size)
    )


def judge_image(detected: Scene, prompt: Record | dict[str, Any]) -> bool:
    """True when the detected scene shows exactly the prompt's objects (every one matching its
    shape, and its colour and size where the prompt states them; the right count; nothing else) and,
    for position prompts, their relation. ``prompt`` is a prompt ``Record``, its meta or its spec."""
    spec = _as_spec(prompt)
    slots = [(g, want) for g, want in enumerate(spec["objects"]) for _ in range(want["count"])]
    if len(detected.objects) != len(slots):
        return False
    # few objects (at most 3 from a template): try every assignment of objects to the prompt's slots
    for order in itertools.permutations(detected.objects):
        if not all(_matches(o, want) for o, (_, want) in zip(order, slots)):
            continue
        if not spec.get("relation"):
            return True
        groups: dict[int, list[SceneObject]] = {}
        for o, (g, _) in zip(order, slots):
            groups.setdefault(g, []).append(o)
        if len(groups) == 2 and all(relation(a, b) == spec["relation"] for a in groups[0] for b in groups[1]):
            return True
    return False


_AXIS = {"to the left of": "x", "to the right of": "x", "above": "y", "below": "y"}


def relation_outcome(scene: Scene, prompt: Record | dict[str, Any]) -> str | None:
    """How a scene stands to a prompt that states a relation between two objects: "right" (exactly
    the prompt's two objects, the relation holding; what ``judge_image`` accepts), "flipped" (both on
    the relation's axis, the wrong way round), "other axis", or "objects wrong" (not exactly the
    prompt's two objects). None for a prompt without a relation. Position scores split this way
    tell a model that ignores which object was named first (right and flipped equal) from one that
    misses the axis or the objects."""
    spec = _as_spec(prompt)
    want = spec.get("relation")
    if not want:
        return None
    named = spec["objects"]
    if len(scene.objects) == len(named) == 2 and all(o.get("count", 1) == 1 for o in named):
        for a, b in itertools.permutations(scene.objects):
            if _matches(a, named[0]) and _matches(b, named[1]):
                got = relation(a, b)
                return "right" if got == want else "flipped" if _AXIS[got] == _AXIS[want] else "other axis"
    return "objects wrong"


def order_share(outcomes: list[str | None]) -> float | None:
    """Of the outcomes with both objects on the relation's axis, the share the right way round (0.5:
    which object was named first is ignored); None when there are none."""
    on_axis = [o for o in outcomes if o in ("right", "flipped")]
    return sum(o == "right" for o in on_axis) / len(on_axis) if on_axis else None


def judge_caption(text: str, scene: Scene, require_colors: bool = False) -> bool:
    """True when a caption names every object of the scene with its count, nothing else, every colour
    and size it states is right (with ``require_colors``, it must state every colour), and any
    relation it states holds."""
    spec = parse_caption(text)
    if spec is None or (require_colors and any(o["color"] is None for o in spec["objects"])):
        return False
    return judge_image(scene, spec)


def well_formed(image: Image.Image | np.ndarray) -> list[bool]:
    """For every object ``detect_scene`` finds: whether it is read with confidence, i.e. its colour
    sits on the palette (median residual), it is solid (median coverage), it fills its box as its
    shape does, and its shape measures lie clear of the decision thresholds (a triangle's skewness
    below -0.4; a circle or square symmetric, with a diagonal ratio under 1.15 or over 1.28).
    Rendered scenes and a light blur (a good VAE's) score 1; smeared, noisy or blocky objects do not."""
    return read_scene(image)[1]


def read_scene(image: Image.Image | np.ndarray) -> tuple[Scene, list[bool]]:
    """``detect_scene`` and ``well_formed`` from one detection."""
    found = _detect(image)
    return Scene([o for o, _ in found]), [_is_well_formed(o, m) for o, m in found]


def _is_well_formed(o: SceneObject, m: dict[str, float]) -> bool:
    lo, hi = WELL_FORMED_FILL[o.shape]
    if o.shape == "triangle":
        shape = m["skew"] < 2 * TRIANGLE_MAX_SKEW
    else:
        ratio_ok = m["diagonal"] >= 1.28 if o.shape == "square" else m["diagonal"] <= 1.15
        shape = abs(m["skew"]) < 0.15 and ratio_ok
    return (
        m["residual"] <= WELL_FORMED_MAX_RESIDUAL
        and m["coverage"] >= WELL_FORMED_MIN_COVERAGE
        and lo <= m["fill"] <= hi
        and shape
    )


def judge_caption_strict(text: str, scene: Scene, reference: dict[str, Any]) -> bool:
    """``judge_caption`` and more: the caption carries the reference's information, i.e. states
    every colour the reference states and, when the reference states a relation, states one (which
    must hold). "a cyan triangle and a purple square" for a scene whose reference says which is
    above passes ``judge_caption`` (every relation it states holds: none) but not this."""
    ref = _as_spec(reference)
    colors = all(o.get("color") for o in ref["objects"])
    if not judge_caption(text, scene, require_colors=colors):
        return False
    return not ref.get("relation") or parse_caption(text)["relation"] is not None  # type: ignore[index]


# --- detection -----------------------------------------------------------------------------------------
def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, as arrays of (y, x) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    H, W = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        queue, pixels = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """A boolean mask grown by ``radius`` pixels (a square structuring element)."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def _shape_measures(pixels: np.ndarray, mass: np.ndarray) -> dict[str, float]:
    """The two numbers ``_shape_of`` reads: the vertical mass profile's skewness and the diagonal
    over the axial extent."""
    ys = np.arange(mass.shape[0], dtype=np.float64)[:, None]
    total = max(float(mass.sum()), 1e-6)
    mean = float((mass * ys).sum()) / total
    var = max(float((mass * (ys - mean) ** 2).sum()) / total, 1e-6)
    skew = float((mass * (ys - mean) ** 3).sum()) / total / var**1.5
    y, x = pixels[:, 0], pixels[:, 1]
    axial = max(np.ptp(x), np.ptp(y)) + 1
    # a pixel spans 2 in x + y (and in x - y); a diagonal unit is sqrt(2) of those
    diagonal = (np.ptp(x + y) + np.ptp(x - y) + 2 * 2) / 2 / np.sqrt(2)
    return {"skew": skew, "diagonal": float(diagonal / axial)}


def _shape_of(pixels: np.ndarray, mass: np.ndarray) -> str:
    """Classify an object from its pixels (an (N, 2) array of (y, x)) and its soft mass (coverage,
    an (H, W) map that is zero away from the object).

    A triangle (apex up) piles its mass towards its base: the vertical profile's skewness is about
    -0.57, and blur, a symmetric convolution, keeps the third central moment, only growing the
    variance. A square reaches sqrt(2) times further along the diagonals than along the axes, a
    circle as far; pixel extents blur barely moves, as edges stay where coverage crosses one half.
    """
    m = _shape_measures(pixels, mass)
    if m["skew"] < TRIANGLE_MAX_SKEW:
        return "triangle"
    return "square" if m["diagonal"] >= SQUARE_MIN_DIAGONAL else "circle"


def detect_scene(
    image: Image.Image | np.ndarray,
    max_color_distance: float = MAX_COLOR_DISTANCE,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> Scene:
    """Objects in an image (PIL, or an (H, W, 3) array with values in 0-255).

    Each pixel is explained as the palette colour, scaled by a coverage, that lies nearest to it
    (its hue, in effect); pixels at least half covered and within ``max_color_distance`` of that
    scaled colour are foreground, and 4-connected regions of one colour with at least
    ``min_area_fraction`` of the image are objects. Shape comes from the region's soft coverage and
    extents (see ``_shape_of``), size from its box's extent; the centre is the box's.
    """
    return Scene([o for o, _ in _detect(image, max_color_distance, min_area_fraction)])


def _detect(
    image: Image.Image | np.ndarray,
    max_color_distance: float = MAX_COLOR_DISTANCE,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> list[tuple[SceneObject, dict[str, float]]]:
    """``detect_scene``'s objects, each with the measures its reading rests on (for ``well_formed``)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    background = np.asarray(BACKGROUND, dtype=np.float32)
    arr = arr - background
    H, W, _ = arr.shape
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32) - background  # (K, 3)
    coverage = np.clip(arr @ palette.T / (palette**2).sum(-1), 0.0, None)  # (H, W, K)
    residual = np.linalg.norm(arr[:, :, None, :] - coverage[..., None] * palette, axis=-1)  # (H, W, K)
    label = residual.argmin(-1)
    best_cov = np.take_along_axis(coverage, label[..., None], -1)[..., 0]
    best_res = np.take_along_axis(residual, label[..., None], -1)[..., 0]
    foreground = (best_cov >= MIN_COVERAGE) & (best_res <= max_color_distance)
    min_area = min_area_fraction * H * W
    found = [
        (k, pix)
        for k in range(len(names))
        for pix in _components(foreground & (label == k))
        if len(pix) >= min_area
    ]
    claimed = np.zeros((H, W), dtype=bool)
    for _, pix in found:
        claimed[pix[:, 0], pix[:, 1]] = True
    halo = HALO_PER_32_PIXELS * max(1, round(max(H, W) / 32))
    objects = []
    for k, pix in found:
        own = np.zeros((H, W), dtype=bool)
        own[pix[:, 0], pix[:, 1]] = True
        # the blurred rim belongs to the object, up to where another object begins
        region = _dilate(own, halo) & ~(claimed & ~own)
        mass = np.where(region, np.clip(coverage[..., k], 0.0, 1.0), 0.0)
        (y0, x0), (y1, x1) = pix.min(0), pix.max(0)
        # a shape drawn with half-extent r spans 2r + 1 pixels
        extent = max(x1 - x0, y1 - y0) / max(H, W) / 2
        size = "small" if extent < SIZE_THRESHOLD else "large"
        cy, cx = (y0 + y1 + 1) / 2 / H, (x0 + x1 + 1) / 2 / W
        obj = SceneObject(_shape_of(pix, mass), names[k], size, float(cx), float(cy))
        inner = pix[:, 0], pix[:, 1]
        measures = {
            "residual": float(np.median(best_res[inner])),
            "coverage": float(np.median(coverage[..., k][inner])),
            "fill": len(pix) / float((y1 - y0 + 1) * (x1 - x0 + 1)),
            **_shape_measures(pix, mass),
        }
        objects.append((obj, measures))
    return objects
