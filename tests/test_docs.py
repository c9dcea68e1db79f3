"""The documentation holds together: links land, README commands parse, the README stays a guide.

Every relative Markdown link in README.md, docs/*.md and benchmarks/RESULTS.md points to a file that
exists, and its anchor (if any) to a heading of that file; every `transfusion <command>` line in the
README's bash blocks parses with that command's own parser; the README stays under its length limit
and opens its Python examples with the `Pipeline` block.
"""

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

from transfusion import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
MAX_README_LINES = 480

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()  # a link's text only
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(without_code_blocks(path.read_text())):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links():
    for page in PAGES:
        for match in LINK.finditer(without_code_blocks(page.read_text())):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                yield page, target


@pytest.mark.parametrize(
    "page,target", list(relative_links()), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_relative_link_lands(page, target):
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    where = f"{page.relative_to(ROOT)}: link {target!r}"
    assert dest.exists(), f"{where}: {dest.relative_to(ROOT)} does not exist"
    if anchor:
        assert dest.suffix == ".md", f"{where}: an anchor into a file that is not Markdown"
        assert anchor in anchors(dest), f"{where}: no heading with the anchor #{anchor}"


def test_slug_follows_github():
    assert slug("What limited quality, and what changed") == "what-limited-quality-and-what-changed"
    assert slug("Will it fit? `transfusion plan`") == "will-it-fit-transfusion-plan"
    assert slug("The demo's own choices") == "the-demos-own-choices"
    assert slug("Reproducing the paper's findings") == "reproducing-the-papers-findings"


def readme_blocks(language: str) -> list[str]:
    pattern = re.compile(rf"^```{language}[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
    return [m.group(1) for m in pattern.finditer(README.read_text())]


def readme_commands() -> list[str]:
    """The README's bash lines, comments stripped and backslash continuations joined."""
    commands = []
    for block in readme_blocks("bash"):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def transfusion_argv(command: str) -> list[str] | None:
    """The words after `transfusion` (directly, or in `torchrun ... -m transfusion`), else None."""
    words = shlex.split(command)
    if words[0] == "transfusion":
        return words[1:]
    if words[0] == "torchrun":
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "transfusion":
                return words[i + 2 :]
    return None


CLI_COMMANDS = [c for c in readme_commands() if transfusion_argv(c) is not None]


def test_readme_has_cli_commands():
    assert len(CLI_COMMANDS) >= 10, CLI_COMMANDS


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_readme_command_parses(command):
    argv = transfusion_argv(command)
    assert argv, f"no command after transfusion: {command}"
    name, args = argv[0], argv[1:]
    assert name in cli.COMMANDS, f"unknown command {name!r}: {command}"
    parser = cli.parser(name)
    if "..." in args:  # elided: the options shown must exist, the ones left out may be required
        args = [a for a in args if a != "..."]
        for action in parser._actions:
            action.required = False
    try:
        parser.parse_args(args)
    except SystemExit as e:
        if e.code:
            pytest.fail(f"README command does not parse (see the error above): {command}")


def test_readme_length():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; the guide keeps to {MAX_README_LINES}"


def test_first_python_block_is_the_pipeline():
    text = README.read_text()
    start = text.index("```python\n")
    headings = re.findall(r"^## .*$", without_code_blocks(text[:start]), re.M)
    assert headings and headings[-1].strip() == "## Python", headings[-1:]
    code = readme_blocks("python")[0]
    assert 'Pipeline.from_pretrained("runs/demo/model")' in code
    compile(code, "README.md", "exec")
