"""Synthetic shape scenes: the built-in data, rendered on the fly, and a detector that reads them back.

A scene holds one to three objects (3 shapes x 6 colours x 2 sizes) on a black background, each in its
own cell of a 2 x 2 grid, so that every pair of objects is clearly left/right of (different columns)
or above/below (same column) each other. Every item carries a *prompt spec*, the structured meaning
of its caption (objects with optional colour and a count, and an optional relation), so evaluation
checks generated images and captions exactly:

- ``judge_image(detect_scene(image), spec)``: does a generated image show what the prompt asked?
- ``judge_caption(text, scene)``: does a generated caption describe the scene correctly?

Prompt kinds follow GenEval: single_object, two_objects, counting, colors, position, color_attr.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from transfusion.data.base import Record

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 235),
    "yellow": (235, 220, 30),
    "purple": (170, 50, 210),
    "cyan": (30, 210, 220),
}
SIZES = {"small": 0.12, "large": 0.18}  # half-extent as a fraction of the image side
KINDS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
NUMBERS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
BACKGROUND = (0, 0, 0)
MIN_AREA_FRACTION = 0.012  # components smaller than this share of the image are noise


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, as a fraction of the image side
    cy: float


@dataclass
class Scene:
    objects: list[SceneObject] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls([SceneObject(**o) for o in d["objects"]])

    def counts(self, with_color: bool = True) -> dict[tuple[str | None, str], int]:
        out: dict[tuple[str | None, str], int] = {}
        for o in self.objects:
            key = (o.color if with_color else None, o.shape)
            out[key] = out.get(key, 0) + 1
        return out


def relation(a: SceneObject, b: SceneObject) -> str:
    """How a stands to b: left/right when their columns differ, else above/below."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


# --- rendering ---------------------------------------------------------------------------------------
def render(scene: Scene, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        r = SIZES[o.size] * size
        x, y = o.cx * size, o.cy * size
        box = [round(x - r), round(y - r), round(x + r), round(y + r)]
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return img


def _cells(rng: random.Random, n: int) -> list[tuple[float, float]]:
    cells = [(0.27, 0.27), (0.73, 0.27), (0.73, 0.73), (0.27, 0.73)]  # around the square
    start = rng.randrange(4)
    cells = cells[start:] + cells[:start]  # consecutive cells: two objects share a row or a column
    if rng.random() < 0.5:
        cells = [cells[0], *cells[:0:-1]]
    jitter = 0.02
    return [(cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)) for cx, cy in cells[:n]]


def random_item(rng: random.Random, max_objects: int = 3, kind: str | None = None) -> tuple[Scene, dict, str]:
    """A scene, its prompt spec and its caption, all from ``rng``."""
    kinds = [k for k in KINDS if max_objects >= 2 or k in ("single_object", "colors")]
    kind = kind or rng.choice(kinds)
    size = rng.choice(list(SIZES))
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    if kind in ("single_object", "colors"):
        objs = [(shape, color)]
    elif kind == "counting":
        objs = [(shape, color)] * rng.randint(2, min(3, max_objects))
    else:  # two distinct objects
        shape2 = rng.choice([s for s in SHAPES if s != shape])
        color2 = rng.choice([c for c in COLORS if c != color])
        objs = [(shape, color), (shape2, color2)]
    places = _cells(rng, len(objs))
    sizes = [size] * len(objs) if kind == "counting" else [rng.choice(list(SIZES)) for _ in objs]
    scene = Scene([SceneObject(s, c, z, x, y) for (s, c), z, (x, y) in zip(objs, sizes, places)])
    spec = _spec_for(scene, kind)
    return scene, spec, caption_for(spec, rng)


def _spec_for(scene: Scene, kind: str) -> dict[str, Any]:
    o = scene.objects
    if kind == "counting":
        return {
            "kind": kind,
            "objects": [{"shape": o[0].shape, "color": o[0].color, "count": len(o)}],
            "relation": None,
        }
    with_color = kind != "two_objects"
    objects = [{"shape": x.shape, "color": x.color if with_color else None, "count": 1} for x in o]
    rel = relation(o[0], o[1]) if kind == "position" else None
    return {"kind": kind, "objects": objects, "relation": rel}


def _phrase(obj: dict[str, Any], rng: random.Random | None = None) -> str:
    n, color, shape = obj["count"], obj["color"], obj["shape"]
    words = ([color] if color else []) + [shape + ("s" if n > 1 else "")]
    article = NUMBERS[n] if n > 1 else ("one" if rng and rng.random() < 0.15 else "a")
    return " ".join([article, *words])


def caption_for(spec: dict[str, Any], rng: random.Random | None = None) -> str:
    """Template captions: "a red circle", "two blue squares", "a green triangle above a red circle"."""
    objs = spec["objects"]
    if len(objs) == 1:
        text = _phrase(objs[0], rng)
        if spec["kind"] == "colors" and rng and rng.random() < 0.5:
            o = objs[0]
            text = f"a {o['shape']} colored {o['color']}"
        return text
    if spec["relation"]:
        return f"{_phrase(objs[0], rng)} {spec['relation']} {_phrase(objs[1], rng)}"
    joiner = " and " if not rng or rng.random() < 0.7 else " with "
    return _phrase(objs[0], rng) + joiner + _phrase(objs[1], rng)


def parse_caption(text: str) -> dict[str, Any] | None:
    """The prompt spec of a caption in the template language, or None when it does not parse."""
    words = text.strip().lower().rstrip(".").split()
    if not words:
        return None
    rel = None
    for r in RELATIONS:
        rw = r.split()
        for i in range(len(words) - len(rw) + 1):
            if words[i : i + len(rw)] == rw:
                rel, parts = r, [words[:i], words[i + len(rw) :]]
                break
        if rel:
            break
    if rel is None:
        for sep in ("and", "with"):
            if sep in words:
                i = words.index(sep)
                parts = [words[:i], words[i + 1 :]]
                break
        else:
            parts = [words]
    objects = []
    for p in parts:
        obj = _parse_phrase(p)
        if obj is None:
            return None
        objects.append(obj)
    return {"objects": objects, "relation": rel}


def _parse_phrase(words: list[str]) -> dict[str, Any] | None:
    if len(words) == 4 and words[0] == "a" and words[2] == "colored":  # "a circle colored red"
        words = ["a", words[3], words[1]]
    if len(words) < 2:
        return None
    counts = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
    if words[0] not in counts:
        return None
    n, rest = counts[words[0]], words[1:]
    color = rest[0] if len(rest) == 2 and rest[0] in COLORS else None
    if len(rest) == 2 and color is None:
        return None
    shape = rest[-1]
    if n > 1:
        if not shape.endswith("s"):
            return None
        shape = shape[:-1]
    if shape not in SHAPES or len(rest) > 2:
        return None
    return {"shape": shape, "color": color, "count": n}


# --- judging -----------------------------------------------------------------------------------------
def judge_image(detected: Scene, spec: dict[str, Any]) -> bool:
    """True when the detected scene shows exactly the prompt's objects (colour where the prompt names
    one, and count) and, for position prompts, their relation. Sizes are not judged."""
    want: dict[tuple[str | None, str], int] = {}
    for o in spec["objects"]:
        want[(o["color"], o["shape"])] = want.get((o["color"], o["shape"]), 0) + o["count"]
    with_color = all(o["color"] for o in spec["objects"])
    if detected.counts(with_color=with_color) != want:
        return False
    if spec.get("relation"):
        a, b = spec["objects"]
        oa = next(o for o in detected.objects if o.shape == a["shape"] and o.color == a["color"])
        ob = next(o for o in detected.objects if o.shape == b["shape"] and o.color == b["color"])
        return relation(oa, ob) == spec["relation"]
    return True


def judge_caption(text: str, scene: Scene, require_colors: bool = False) -> bool:
    """True when a caption names every object of the scene with its count, nothing else, every colour
    it states is right (with ``require_colors``, it must state them all), and any relation it states
    holds."""
    spec = parse_caption(text)
    if spec is None or (require_colors and any(o["color"] is None for o in spec["objects"])):
        return False
    return judge_image(scene, spec)


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


def detect_scene(image: Image.Image | np.ndarray, max_color_distance: float = 110.0) -> Scene:
    """Objects in an image: each pixel takes its nearest palette colour (or background), connected
    regions of one colour become objects, classified by how much of their bounding box they fill
    (square ~1, circle ~0.79, triangle ~0.5) and sized by their extent."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    H, W, _ = arr.shape
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names] + [BACKGROUND], dtype=np.float32)  # (K+1, 3)
    dist = np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, K+1)
    label = dist.argmin(-1)
    label[dist.min(-1) > max_color_distance] = len(names)  # far from every colour: background
    objects = []
    min_area = MIN_AREA_FRACTION * H * W
    for k, name in enumerate(names):
        for pix in _components(label == k):
            if len(pix) < min_area:
                continue
            (y0, x0), (y1, x1) = pix.min(0), pix.max(0)
            bw, bh = x1 - x0 + 1, y1 - y0 + 1
            fill = len(pix) / (bw * bh)
            shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
            extent = max(bw, bh) / W / 2  # half-extent as a fraction of the side
            size = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
            cy, cx = (y0 + y1 + 1) / 2 / H, (x0 + x1 + 1) / 2 / W
            objects.append(SceneObject(shape, name, size, float(cx), float(cy)))
    return Scene(objects)


# --- the dataset -----------------------------------------------------------------------------------------
class ShapesDataset:
    """Map-style: item i is the same for a given (seed, i), whatever the order or process."""

    def __init__(self, image_size: int = 32, seed: int = 0, max_objects: int = 3, length: int | None = None):
        if image_size < 16:
            raise ValueError(f"shape scenes need image_size >= 16, got {image_size}")
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
        self.image_size, self.seed, self.max_objects = image_size, seed, max_objects
        self.length = length or 1_000_000

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = random.Random(f"shapes-{self.seed}-{i}")
        scene, spec, text = random_item(rng, self.max_objects)
        return Record(
            render(scene, self.image_size),
            text,
            {"scene": scene.to_dict(), "spec": spec, "kind": spec["kind"]},
        )

    def describe(self) -> str:
        return f"shapes(size={self.image_size}, seed={self.seed}, max_objects={self.max_objects})"


def eval_prompts(n_per_kind: int, seed: int = 12345, image_size: int = 32) -> list[Record]:
    """Held-out prompts, ``n_per_kind`` of each GenEval kind, with the ground-truth scene rendered."""
    out = []
    for kind in KINDS:
        for i in range(n_per_kind):
            rng = random.Random(f"eval-{seed}-{kind}-{i}")
            scene, spec, text = random_item(rng, 3, kind)
            out.append(
                Record(
                    render(scene, image_size), text, {"scene": scene.to_dict(), "spec": spec, "kind": kind}
                )
            )
    return out
