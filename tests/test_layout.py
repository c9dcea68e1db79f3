"""The package's shape: arrows point down only, and no function is too long to read.

Layers, lowest first (shared/DESIGN.md): errors/io/config -> building blocks -> model, data and
checkpoints -> training, generation, evaluation -> demo, benchmarks, experiments -> commands.
A module may import its own layer or lower ones, never a higher one (imports inside functions count).
"""

import ast
from pathlib import Path

import transfusion

PACKAGE = Path(transfusion.__file__).parent
MAX_FUNCTION_LINES = 80

# module name prefix (after "transfusion.") -> layer; the longest matching prefix decides
LAYERS = {
    "errors": 0, "io": 0, "config": 0,
    "tokenizer": 1, "sequence": 1, "masks": 1, "layers": 1, "patching": 1, "unet": 1, "diffusion": 1,
    "distributed": 1, "vae": 1, "vq": 1, "autoencoders": 1, "data.base": 1, "data.shapes": 1,
    "model": 2, "lora": 2, "losses": 2, "flops": 2, "checkpoint": 2, "model_directory": 2, "data": 2, "pretrained": 2,
    "generate": 3, "decoding": 3, "pipeline": 3, "recipe": 3, "training": 3, "evaluation": 3,
    "demo": 4, "bench": 4, "experiments": 4, "serve": 4,
    "commands": 5, "cli": 5, "__main__": 5, "__init__": 5,  # the package's face: Pipeline
}  # fmt: skip


def layer_of(module: str) -> int:
    name = module.removeprefix("transfusion.").removeprefix("transfusion")
    parts = name.split(".") if name else ["__init__"]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"transfusion.{name} has no layer in tests/test_layout.py: give it one")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name.removesuffix(".__init__")
        yield name, path


def imports(path: Path, module: str) -> list[str]:
    """Every transfusion module ``path`` imports, at the top or inside a function (not those only a
    type checker reads)."""
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {  # imports under `if TYPE_CHECKING:` never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("transfusion")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("transfusion"):
                # `from transfusion import training` names a module; `from transfusion.x import f` names x
                out += [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def test_every_import_points_down():
    wrong = []
    for module, path in modules():
        mine = layer_of(module)
        for target in imports(path, module):
            if layer_of(target) > mine:
                wrong.append(f"{module} (layer {mine}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_can_fail():
    """The walk sees imports inside functions and relative ones: a command imported by the model
    would be caught."""
    fake = PACKAGE / "model.py"
    tree_imports = imports(fake, "transfusion.model")
    assert "transfusion.masks" in tree_imports and "transfusion.config" in tree_imports
    assert layer_of("transfusion.commands.train") > layer_of("transfusion.model")
    assert layer_of("transfusion.data.shapes") < layer_of("transfusion.data.loader")


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_no_two_modules_import_each_other():
    """No import cycles (``vae`` and ``vq`` once did, through a function-level import): the module graph,
    imports inside functions included, is a DAG."""
    graph = {module: {t for t in imports(path, module) if t != module} for module, path in modules()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle.extend([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
                return True
            if nxt in graph and not state.get(nxt) and visit(nxt, [*stack, nxt]):
                return True
        state[node] = 2
        return False

    assert not any(visit(m, [m]) for m in sorted(graph) if not state.get(m)), " -> ".join(cycle)
