"""Synthetic shape scenes: the built-in data, rendered on the fly with their captions.

A scene holds one to three objects (3 shapes x 6 colours x 2 sizes) drawn without anti-aliasing on a
black background. Placement is a coarse grid: each object sits in its own cell of a 2 x 2 grid (centres
at ``CELL_CENTRES``, jittered by at most ``CELL_JITTER``), so objects never overlap and two objects
always share a row or a column: their centres differ by at least ``MIN_RELATION_MARGIN`` of the image
side along the axis of their relation and by at most twice the jitter along the other, so "left of",
"right of", "above" and "below" are never ambiguous.

Every item carries its scene (``Scene``: objects with shape, colour, size and centre) and a *prompt
spec*, the structured meaning of its caption: a list of objects, each ``{"shape", "color", "size",
"count"}`` (colour and size None where the caption does not state them), and an optional relation.
Prompt kinds follow GenEval: single_object, two_objects, counting, colors, position, color_attr.
Reading scenes back (the detector, and the judges of generated images and captions) is evaluation's
job: ``transfusion.evaluation.scenes``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

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
ARTICLES = {"a": 1, "an": 1, **{word: n for n, word in NUMBERS.items()}}
RELATIONS = ("to the left of", "to the right of", "above", "below")
BACKGROUND = (0, 0, 0)
MIN_IMAGE_SIZE = 16
DEFAULT_LENGTH = 1_000_000
MAX_OBJECTS = 3

# placement: a 2 x 2 grid, visited around the square so that consecutive cells share a row or a column
CELL_CENTRES = ((0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75))
CELL_JITTER = 0.02  # fraction of the side
MIN_RELATION_MARGIN = 0.75 - 0.25 - 2 * CELL_JITTER  # the least centre distance along a relation's axis

# caption templates: how often the optional variants are used
ONE_WORD_PROB = 0.15  # "one red circle" rather than "a red circle"
SIZE_WORD_PROB = 0.25  # single objects: "a large red circle"
COLORED_TEMPLATE_PROB = 0.5  # colour prompts: "a circle colored red"
AND_PROB = 0.7  # two objects: "... and ..." rather than "... with ..."


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    cx: float  # centre of the object's box, as a fraction of the image side (0 left, 1 right)
    cy: float  # (0 top, 1 bottom)


@dataclass
class Scene:
    objects: list[SceneObject] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls([SceneObject(**o) for o in d["objects"]])

    def counts(self, with_color: bool = True) -> dict[tuple[str | None, str], int]:
        """How many objects of each (colour, shape); the colour is None without ``with_color``."""
        out: dict[tuple[str | None, str], int] = {}
        for o in self.objects:
            key = (o.color if with_color else None, o.shape)
            out[key] = out.get(key, 0) + 1
        return out

    def relation(self, i: int, j: int) -> str:
        """How object i stands to object j (one of ``RELATIONS``)."""
        return relation(self.objects[i], self.objects[j])


def relation(a: SceneObject, b: SceneObject) -> str:
    """How a stands to b: along the axis where their centres differ most (image y grows downwards)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


# --- rendering ---------------------------------------------------------------------------------------
def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as an RGB image, drawn without anti-aliasing (every pixel is a palette colour or
    the background)."""
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
        else:  # apex up, base along the bottom of the box
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return img


def _cells(rng: random.Random, n: int) -> list[tuple[float, float]]:
    """Centres for n objects: consecutive cells of the grid, so that two objects share a row or a
    column, starting anywhere and going either way round."""
    start = rng.randrange(len(CELL_CENTRES))
    cells = list(CELL_CENTRES[start:] + CELL_CENTRES[:start])
    if rng.random() < 0.5:
        cells = [cells[0], *cells[:0:-1]]
    jitter = [
        (rng.uniform(-CELL_JITTER, CELL_JITTER), rng.uniform(-CELL_JITTER, CELL_JITTER)) for _ in cells[:n]
    ]
    return [(cx + jx, cy + jy) for (cx, cy), (jx, jy) in zip(cells, jitter)]


def kinds_for(max_objects: int) -> list[str]:
    """The prompt kinds a scene of at most ``max_objects`` objects can be drawn as."""
    return [k for k in KINDS if max_objects >= 2 or k in ("single_object", "colors")]


def random_item(
    rng: random.Random, max_objects: int = MAX_OBJECTS, kind: str | None = None
) -> tuple[Scene, dict[str, Any], str]:
    """A scene, its prompt spec and its caption, all from ``rng``."""
    kind = kind or rng.choice(kinds_for(max_objects))
    size = rng.choice(list(SIZES))
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    if kind in ("single_object", "colors"):
        objs = [(shape, color)]
    elif kind == "counting":
        objs = [(shape, color)] * rng.randint(2, min(MAX_OBJECTS, max(2, max_objects)))
    else:  # two distinct objects
        shape2 = rng.choice([s for s in SHAPES if s != shape])
        color2 = rng.choice([c for c in COLORS if c != color])
        objs = [(shape, color), (shape2, color2)]
    places = _cells(rng, len(objs))
    sizes = [size] * len(objs) if kind == "counting" else [rng.choice(list(SIZES)) for _ in objs]
    scene = Scene([SceneObject(s, c, z, x, y) for (s, c), z, (x, y) in zip(objs, sizes, places)])
    spec = _spec_for(scene, kind, with_size=kind == "single_object" and rng.random() < SIZE_WORD_PROB)
    return scene, spec, caption_for(spec, rng)


def _spec_for(scene: Scene, kind: str, with_size: bool = False) -> dict[str, Any]:
    o = scene.objects
    if kind == "counting":
        objects = [{"shape": o[0].shape, "color": o[0].color, "size": None, "count": len(o)}]
        return {"kind": kind, "objects": objects, "relation": None}
    with_color = kind != "two_objects"
    objects = [
        {
            "shape": x.shape,
            "color": x.color if with_color else None,
            "size": x.size if with_size else None,
            "count": 1,
        }
        for x in o
    ]
    rel = relation(o[0], o[1]) if kind == "position" else None
    return {"kind": kind, "objects": objects, "relation": rel}


def _phrase(obj: dict[str, Any], rng: random.Random | None = None) -> str:
    n, color, shape, size = obj["count"], obj["color"], obj["shape"], obj.get("size")
    words = [w for w in (size, color) if w] + [shape + ("s" if n > 1 else "")]
    article = NUMBERS[n] if n > 1 else ("one" if rng and rng.random() < ONE_WORD_PROB else "a")
    return " ".join([article, *words])


def caption_for(spec: dict[str, Any], rng: random.Random | None = None) -> str:
    """A caption stating exactly the spec, from templates ("a red circle", "a large red circle",
    "two blue squares", "a circle colored red", "a green triangle above a red circle", "a red circle
    and a blue square"); ``rng`` picks among the equivalent wordings (None: the plainest)."""
    objs = spec["objects"]
    if len(objs) == 1:
        o = objs[0]
        if spec.get("kind") == "colors" and rng and rng.random() < COLORED_TEMPLATE_PROB:
            return f"a {o['shape']} colored {o['color']}"
        return _phrase(o, rng)
    if spec["relation"]:
        return f"{_phrase(objs[0], rng)} {spec['relation']} {_phrase(objs[1], rng)}"
    joiner = " and " if not rng or rng.random() < AND_PROB else " with "
    return _phrase(objs[0], rng) + joiner + _phrase(objs[1], rng)


READING_ORDER = {"below": "above", "to the right of": "to the left of"}
"""Each relation that names the lower or right object first, and the word for the same scene stated the
other way round."""


def canonical(spec: dict[str, Any]) -> dict[str, Any]:
    """The same two-object relation stated with the upper or left object first ("a red circle below
    a blue square" -> "a blue square above a red circle"): the words name the objects in reading order."""
    if spec["relation"] not in READING_ORDER:
        return spec
    return {**spec, "objects": spec["objects"][::-1], "relation": READING_ORDER[spec["relation"]]}


def reading_order(text: str) -> str:
    """``canonical`` on a caption's text: "X below Y" -> "Y above X", "X to the right of Y" -> "Y to the
    left of X", where X and Y are object phrases of this source ("a red circle", "two large blue
    squares"); any other text comes back unchanged."""
    for word, flipped in READING_ORDER.items():
        first, sep, second = text.partition(f" {word} ")
        if sep and parse_phrase(first.split()) and parse_phrase(second.split()):
            return f"{second} {flipped} {first}"
    return text


def trained_in_reading_order(data: Any) -> bool:
    """Whether a model trained on ``data`` (a ``DataConfig``) only ever read relations stated in reading
    order (the shapes source with ``canonical_relations`` 1): it never saw "below" or "to the right of",
    so its prompts are best given rewritten with ``reading_order``."""
    return data.source == "shapes" and data.canonical_relations >= 1


def parse_phrase(words: list[str]) -> dict[str, Any] | None:
    """The object of a phrase as ``_phrase`` and the colour template write them: ``[article] [size]
    [colour] shape(s)`` or ``a shape colored colour``; None when the words are not one."""
    if len(words) == 4 and words[0] in ("a", "an") and words[2] == "colored":
        words = [words[0], words[3], words[1]]
    if len(words) < 2 or words[0] not in ARTICLES:
        return None
    n, rest = ARTICLES[words[0]], words[1:]
    size = rest.pop(0) if len(rest) > 1 and rest[0] in SIZES else None
    color = rest.pop(0) if len(rest) > 1 and rest[0] in COLORS else None
    if len(rest) != 1:
        return None
    shape = rest[0]
    if n > 1:
        if not shape.endswith("s"):
            return None
        shape = shape[:-1]
    if shape not in SHAPES:
        return None
    return {"shape": shape, "color": color, "size": size, "count": n}


# --- the dataset -----------------------------------------------------------------------------------------
class ShapesDataset:
    """Map-style: item i is the same for a given (seed, i), whatever the order or process.

    ``ds[i]`` is a ``Record`` with the rendered image, its caption and ``meta = {"scene": ..., "spec":
    ..., "kind": ...}``. ``descriptive``: the share of two-object scenes captioned with everything they
    hold, colours and relation (the position template), whatever caption kind they drew.
    ``position_share``: the share of items drawn as position scenes (two objects captioned with their
    colours and relation), the other kinds sharing the rest equally; None: every kind 1/6, the stream
    of the plain dataset item for item."""

    def __init__(
        self,
        image_size: int = 32,
        seed: int = 0,
        max_objects: int = MAX_OBJECTS,
        length: int | None = None,
        descriptive: float = 0.0,
        position_share: float | None = None,
        canonical_relations: float = 0.0,
        pairs_in_reading_order: bool = False,
    ):
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"shape scenes need image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
        if not 1 <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 0.0 <= descriptive <= 1.0:
            raise ValueError(f"descriptive must be within [0, 1], got {descriptive}")
        if position_share is not None and not 0.0 <= position_share <= 1.0:
            raise ValueError(f"position_share must be within [0, 1], got {position_share}")
        if not 0.0 <= canonical_relations <= 1.0:
            raise ValueError(f"canonical_relations must be within [0, 1], got {canonical_relations}")
        if position_share and max_objects < 2:
            raise ValueError(
                f"position scenes hold two objects: position_share needs max_objects >= 2, got {max_objects}"
            )
        self.image_size, self.seed, self.max_objects = image_size, seed, max_objects
        self.descriptive, self.position_share = descriptive, position_share
        self.canonical_relations, self.pairs_in_reading_order = canonical_relations, pairs_in_reading_order
        self.length = DEFAULT_LENGTH if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = random.Random(f"shapes-{self.seed}-{i}")
        kind = None
        if self.position_share is not None:
            others = [k for k in kinds_for(self.max_objects) if k != "position"]
            kind = "position" if rng.random() < self.position_share else rng.choice(others)
        scene, spec, text = random_item(rng, self.max_objects, kind)
        if (
            self.descriptive
            and spec["kind"] in ("two_objects", "color_attr")
            and rng.random() < self.descriptive
        ):
            spec = _spec_for(scene, "position")  # the same scene, its caption stating colours and relation
            text = caption_for(spec, rng)
        if self.canonical_relations and spec["relation"] and rng.random() < self.canonical_relations:
            spec = canonical(spec)
            text = caption_for(spec, rng)
        if (
            self.pairs_in_reading_order
            and spec["kind"] in ("two_objects", "color_attr")
            and scene.relation(0, 1) in READING_ORDER
        ):  # "X and Y" with the upper or left object first, as relation captions in canonical wording
            spec = {**spec, "objects": spec["objects"][::-1]}
            text = caption_for(spec, rng)
        return Record(
            render(scene, self.image_size),
            text,
            {"scene": scene.to_dict(), "spec": spec, "kind": spec["kind"]},
        )

    def describe(self) -> str:
        more = f", descriptive={self.descriptive}" if self.descriptive else ""
        more += f", position_share={self.position_share}" if self.position_share is not None else ""
        more += f", canonical_relations={self.canonical_relations}" if self.canonical_relations else ""
        more += ", pairs_in_reading_order=True" if self.pairs_in_reading_order else ""
        return f"shapes(size={self.image_size}, seed={self.seed}, max_objects={self.max_objects}{more})"


def eval_prompts(n_per_kind: int, seed: int = 12345, image_size: int = 32) -> list[Record]:
    """Held-out prompts, ``n_per_kind`` of each GenEval kind, with the ground-truth scene rendered.
    They come from their own random stream (``eval-{seed}-...``), apart from every training item."""
    out = []
    for kind in KINDS:
        for i in range(n_per_kind):
            rng = random.Random(f"eval-{seed}-{kind}-{i}")
            scene, spec, text = random_item(rng, MAX_OBJECTS, kind)
            meta = {"scene": scene.to_dict(), "spec": spec, "kind": kind}
            out.append(Record(render(scene, image_size), text, meta))
    return out
