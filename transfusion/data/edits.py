"""Shape-scene edits: an input scene, an instruction, and the scene the instruction makes of it.

The paper's last experiment (section 4.4) fine-tunes on (input image, edit prompt, output image)
triples, laid out as one interleaved sequence: image, text, image. This source makes such triples from
the built-in shape scenes (``data/shapes.py``), of five kinds:

- recolour: "make the red circle blue" (the object keeps its shape, size and place);
- remove: "remove the green triangle";
- add: "add a yellow square to the right of the red circle" (in the free grid cell beside it);
- move: "move the blue square to the top" (to the free cell above, below, left or right of it);
- swap: "swap the circle and the square" (the two objects trade places).

Scenes hold one to three objects, each of its own shape and its own colour, so "the circle" and "the
red circle" always name one object. Objects sit in the cells of the 2 x 2 grid the shape scenes use;
a moved object keeps its offset within the cell.

Held out: the test split draws its scenes from another stream, and ``HELD_OUT`` lists one combination
per kind and shape (a shape with a new colour, a shape added or removed in one colour, a shape moved
one way, one order of naming a swapped pair) that the training split never contains. ``edit_eval_items``
gives a balanced test set, half of it in held-out combinations.

Judging an edit (``judge_edit``) compares the scene the detector reads from the output with the
instruction: ``edit`` (the named object changed as asked: recoloured, gone, added beside its
reference, moved to that side, swapped), ``kept`` (every object the instruction did not name is still
there, same shape and colour, within ``KEPT_TOLERANCE`` of where it was) and ``exact`` (the whole
scene equals the instructed one).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from transfusion.data.base import Record
from transfusion.data.shapes import (
    CELL_CENTRES,
    CELL_JITTER,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    relation,
    render,
)

EDIT_KINDS = ("recolour", "remove", "add", "move", "swap")
DIRECTIONS = {"top": (0, -1), "bottom": (0, 1), "left": (-1, 0), "right": (1, 0)}
HELD_OUT: dict[str, set[tuple[str, str]]] = {
    "recolour": {("circle", "purple"), ("square", "cyan"), ("triangle", "yellow")},  # shape, new colour
    "remove": {("circle", "cyan"), ("square", "yellow"), ("triangle", "purple")},  # shape, colour
    "add": {("circle", "yellow"), ("square", "purple"), ("triangle", "cyan")},  # shape, colour
    "move": {("circle", "left"), ("square", "top"), ("triangle", "right")},  # shape, direction
    "swap": {("triangle", "circle")},  # the shapes in the order the instruction names them
}
"""Per kind, the combinations the training split never holds (the test split holds them)."""
KEPT_TOLERANCE = 0.12
"""How far (a fraction of the side) an object the instruction did not name may move and still be kept."""
TEMPLATES = {
    "recolour": ("make the {o} {c}", "change the {o} to {c}", "turn the {o} {c}"),
    "remove": ("remove the {o}", "delete the {o}", "take away the {o}"),
    "add": ("add {n} {rel} the {r}", "put {n} {rel} the {r}"),
    "move": ("move the {o} to the {d}", "put the {o} at the {d}"),
    "swap": ("swap the {o} and the {p}", "swap the places of the {o} and the {p}"),
}


def _cell(o: SceneObject) -> int:
    """The grid cell an object sits in (index into ``CELL_CENTRES``)."""
    return min(
        range(len(CELL_CENTRES)),
        key=lambda k: abs(CELL_CENTRES[k][0] - o.cx) + abs(CELL_CENTRES[k][1] - o.cy),
    )


def _cell_toward(cell: int, direction: str) -> int | None:
    """The cell beside ``cell`` in ``direction``, or None at the grid's edge."""
    dx, dy = DIRECTIONS[direction]
    x, y = CELL_CENTRES[cell]
    want = (x + 0.5 * dx, y + 0.5 * dy)
    for k, c in enumerate(CELL_CENTRES):
        if abs(c[0] - want[0]) < 1e-6 and abs(c[1] - want[1]) < 1e-6:
            return k
    return None


def _free_beside(scene: Scene, o: SceneObject) -> list[tuple[str, int]]:
    """(direction, cell) of every free grid cell beside ``o`` (sharing its row or column)."""
    taken = {_cell(x) for x in scene.objects}
    return [(d, k) for d in DIRECTIONS if (k := _cell_toward(_cell(o), d)) is not None and k not in taken]


def _beside(a: int, b: int) -> bool:
    """Whether two cells share a row or a column (their relation is then never ambiguous)."""
    return any(_cell_toward(a, d) == b for d in DIRECTIONS)


def _moved(o: SceneObject, cell: int) -> SceneObject:
    """``o`` in ``cell``, keeping its offset from its own cell's centre."""
    ox, oy = CELL_CENTRES[_cell(o)]
    nx, ny = CELL_CENTRES[cell]
    return replace(o, cx=o.cx - ox + nx, cy=o.cy - oy + ny)


def _name(o: SceneObject, rng: random.Random, with_color: float = 1.0) -> str:
    return f"{o.color} {o.shape}" if rng.random() < with_color else o.shape


def _scene(rng: random.Random, n: int) -> Scene:
    """n objects of distinct shapes and colours in distinct cells, jittered as the shape scenes are."""
    shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
    cells = rng.sample(range(len(CELL_CENTRES)), n)
    objs = []
    for s, c, k in zip(shapes, colors, cells):
        jx, jy = rng.uniform(-CELL_JITTER, CELL_JITTER), rng.uniform(-CELL_JITTER, CELL_JITTER)
        objs.append(
            SceneObject(s, c, rng.choice(list(SIZES)), CELL_CENTRES[k][0] + jx, CELL_CENTRES[k][1] + jy)
        )
    return Scene(objs)


def random_edit(rng: random.Random, kind: str) -> tuple[Scene, Scene, str, dict[str, Any]] | None:
    """(input scene, output scene, instruction, spec) of ``kind`` from ``rng``; None when the drawn
    scene admits no such edit (the caller draws again). The spec names what the judge checks."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"edit kind must be one of {', '.join(EDIT_KINDS)}, got {kind!r}")
    tpl = rng.choice(TEMPLATES[kind])
    return MAKERS[kind](rng, tpl)


def _recolour(rng: random.Random, tpl: str) -> tuple[Scene, Scene, str, dict[str, Any]] | None:
    scene = _scene(rng, rng.randint(1, 3))
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    new = rng.choice([c for c in COLORS if c not in {x.color for x in scene.objects}])
    out = Scene([replace(x, color=new) if j == i else x for j, x in enumerate(scene.objects)])
    spec = {
        "kind": "recolour",
        "target": i,
        "shape": o.shape,
        "color": new,
        "old_color": o.color,
        "combo": (o.shape, new),
    }
    return scene, out, tpl.format(o=f"{o.color} {o.shape}", c=new), spec


def _remove(rng: random.Random, tpl: str) -> tuple[Scene, Scene, str, dict[str, Any]] | None:
    scene = _scene(rng, rng.randint(2, 3))
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    out = Scene([x for j, x in enumerate(scene.objects) if j != i])
    spec = {"kind": "remove", "target": i, "shape": o.shape, "color": o.color, "combo": (o.shape, o.color)}
    return scene, out, tpl.format(o=_name(o, rng, 0.8)), spec


def _add(rng: random.Random, tpl: str) -> tuple[Scene, Scene, str, dict[str, Any]] | None:
    scene = _scene(rng, rng.randint(1, 2))
    r = rng.randrange(len(scene.objects))
    ref = scene.objects[r]
    free = _free_beside(scene, ref)
    if not free:
        return None
    _, cell = rng.choice(free)
    shape = rng.choice([s for s in SHAPES if s not in {x.shape for x in scene.objects}])
    color = rng.choice([c for c in COLORS if c not in {x.color for x in scene.objects}])
    jx, jy = rng.uniform(-CELL_JITTER, CELL_JITTER), rng.uniform(-CELL_JITTER, CELL_JITTER)
    new = SceneObject(
        shape, color, rng.choice(list(SIZES)), CELL_CENTRES[cell][0] + jx, CELL_CENTRES[cell][1] + jy
    )
    rel = relation(new, ref)
    out = Scene([*scene.objects, new])
    spec = {
        "kind": "add",
        "reference": r,
        "shape": shape,
        "color": color,
        "relation": rel,
        "combo": (shape, color),
    }
    return scene, out, tpl.format(n=f"a {color} {shape}", rel=rel, r=_name(ref, rng, 0.5)), spec


def _move(rng: random.Random, tpl: str) -> tuple[Scene, Scene, str, dict[str, Any]] | None:
    scene = _scene(rng, rng.randint(1, 3))
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    ways = _free_beside(scene, o)
    if not ways:
        return None
    d, cell = rng.choice(ways)
    out = Scene([_moved(x, cell) if j == i else x for j, x in enumerate(scene.objects)])
    spec = {
        "kind": "move",
        "target": i,
        "shape": o.shape,
        "color": o.color,
        "direction": d,
        "combo": (o.shape, d),
    }
    return scene, out, tpl.format(o=_name(o, rng, 0.7), d=d), spec


def _swap(rng: random.Random, tpl: str) -> tuple[Scene, Scene, str, dict[str, Any]] | None:
    scene = _scene(rng, rng.randint(2, 3))
    pairs = [(i, j) for i in range(len(scene.objects)) for j in range(len(scene.objects))
             if i != j and _beside(_cell(scene.objects[i]), _cell(scene.objects[j]))]  # fmt: skip
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    a, b = scene.objects[i], scene.objects[j]
    objs = list(scene.objects)
    objs[i], objs[j] = _moved(a, _cell(b)), _moved(b, _cell(a))
    with_color = 0.5
    spec = {"kind": "swap", "targets": [i, j], "combo": (a.shape, b.shape)}
    return scene, Scene(objs), tpl.format(o=_name(a, rng, with_color), p=_name(b, rng, with_color)), spec


MAKERS = {"recolour": _recolour, "remove": _remove, "add": _add, "move": _move, "swap": _swap}


def is_held_out(spec: dict[str, Any]) -> bool:
    return tuple(spec["combo"]) in HELD_OUT[spec["kind"]]


def draw_edit(
    rng: random.Random, kind: str, held_out: bool | None
) -> tuple[Scene, Scene, str, dict[str, Any]]:
    """An edit of ``kind`` whose combination is held out (True), seen in training (False) or either (None)."""
    while True:
        made = random_edit(rng, kind)
        if made is not None and (held_out is None or is_held_out(made[3]) == held_out):
            return made


def edit_record(scene: Scene, out: Scene, text: str, spec: dict[str, Any], image_size: int) -> Record:
    meta = {"kind": spec["kind"], "scene": scene.to_dict(), "target_scene": out.to_dict(),
            "edit": {k: v for k, v in spec.items() if k != "combo"}, "held_out": is_held_out(spec)}  # fmt: skip
    return Record(render(scene, image_size), text, meta, target=render(out, image_size))


class ShapeEditsDataset:
    """Map-style: item i is the same for a given (seed, split, i). The training split never holds a
    ``HELD_OUT`` combination; kinds are drawn with equal shares. With ``scenes`` (a ``ShapesDataset``)
    and ``scene_share``, that share of the items are its captioned scenes instead: the base's own data
    replayed beside the edits, so that fine-tuning keeps what the base knew."""

    def __init__(self, image_size: int = 32, seed: int = 0, length: int | None = None, split: str = "train",
                 scenes: Any = None, scene_share: float = 0.0):  # fmt: skip
        self.image_size, self.seed, self.split = image_size, seed, split
        self.length = 1_000_000 if length is None else length
        self.scenes, self.scene_share = scenes, scene_share

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = random.Random(f"edits-{self.seed}-{self.split}-{i}")
        if self.scenes is not None and rng.random() < self.scene_share:
            return self.scenes[i % len(self.scenes)]
        kind = EDIT_KINDS[i % len(EDIT_KINDS)]
        held = False if self.split == "train" else None
        return edit_record(*draw_edit(rng, kind, held), self.image_size)

    def describe(self) -> str:
        more = f", scene_share={self.scene_share}" if self.scene_share else ""
        return f"shape-edits(size={self.image_size}, seed={self.seed}, split={self.split}, length={self.length}{more})"


def edit_eval_items(n_per_kind: int, seed: int = 54321, image_size: int = 32) -> list[Record]:
    """A held-out test set: ``n_per_kind`` edits of every kind from their own stream, the first half of
    each kind in held-out combinations (``HELD_OUT``), the rest in combinations training saw."""
    out = []
    for kind in EDIT_KINDS:
        for i in range(n_per_kind):
            rng = random.Random(f"edit-eval-{seed}-{kind}-{i}")
            out.append(edit_record(*draw_edit(rng, kind, i < (n_per_kind + 1) // 2), image_size))
    return out


def _matches(a: SceneObject, b: SceneObject, tolerance: float = KEPT_TOLERANCE) -> bool:
    return (
        a.shape == b.shape
        and a.color == b.color
        and abs(a.cx - b.cx) <= tolerance
        and abs(a.cy - b.cy) <= tolerance
    )


def _find(scene: Scene, shape: str, color: str) -> list[SceneObject]:
    return [o for o in scene.objects if o.shape == shape and o.color == color]


def judge_edit(detected: Scene, record_meta: dict[str, Any]) -> dict[str, bool]:
    """``edit``, ``kept`` and ``exact`` for the scene read from an output (see the module's docstring)."""
    before = Scene.from_dict(record_meta["scene"])
    after = Scene.from_dict(record_meta["target_scene"])
    spec = record_meta["edit"]
    kind = spec["kind"]
    named = {spec["target"]} if "target" in spec else set(spec.get("targets", []))
    kept = all(
        any(_matches(o, d) for d in detected.objects) for j, o in enumerate(before.objects) if j not in named
    )
    if kind == "recolour":
        o = before.objects[spec["target"]]
        edit = bool(_find(detected, o.shape, spec["color"])) and not _find(detected, o.shape, o.color)
    elif kind == "remove":
        edit = not _find(detected, spec["shape"], spec["color"])
    elif kind == "add":
        ref = before.objects[spec["reference"]]
        found_ref = _find(detected, ref.shape, ref.color)
        new = _find(detected, spec["shape"], spec["color"])
        edit = len(new) == 1 and len(found_ref) == 1 and relation(new[0], found_ref[0]) == spec["relation"]
    elif kind == "move":
        o = before.objects[spec["target"]]
        found = _find(detected, o.shape, o.color)
        dx, dy = DIRECTIONS[spec["direction"]]
        edit = (
            len(found) == 1
            and ((dx and (found[0].cx - 0.5) * dx > 0) or (dy and (found[0].cy - 0.5) * dy > 0))
            and not _matches(found[0], o)
        )
    else:  # swap: each named object where the other was
        i, j = spec["targets"]
        a, b = before.objects[i], before.objects[j]
        fa, fb = _find(detected, a.shape, a.color), _find(detected, b.shape, b.color)
        edit = len(fa) == 1 and len(fb) == 1 and relation(fa[0], fb[0]) == relation(b, a)
    exact = len(detected.objects) == len(after.objects) and all(
        any(_matches(o, d) for d in detected.objects) for o in after.objects
    )
    return {"edit": bool(edit), "kept": bool(kept), "exact": bool(exact)}


def target_caption(record_meta: dict[str, Any]) -> str:
    """A caption of the instructed scene in the shape scenes' template language (the text-to-image
    baseline's prompt): its objects, with colours, and the relation of the first two, named in reading
    order (the upper or left object first, as the demo's model reads relations)."""
    from transfusion.data.shapes import canonical, caption_for

    objs = Scene.from_dict(record_meta["target_scene"]).objects
    phrase = [{"shape": o.shape, "color": o.color, "size": None, "count": 1} for o in objs[:2]]
    if len(objs) == 1:
        return caption_for({"kind": "colors", "objects": phrase, "relation": None})
    rel = relation(objs[0], objs[1])
    return caption_for(canonical({"kind": "position", "objects": phrase, "relation": rel}))
