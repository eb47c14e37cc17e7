"""The package's two wings: the algorithm (python/latentseek/*.py) never imports the harness (python/latentseek/eval/).

Read from the source with ast, so an import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "latentseek"
ALGORITHM = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")
HARNESS = "latentseek.eval"


def imported_modules(path: Path, folder: Path | None = None) -> list[str]:
    """Every module a file imports, relative imports resolved as if the file sat in ``folder`` (default: its own)."""
    package = ["latentseek", *(folder or path.parent).relative_to(PACKAGE).parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return found


def crossings(modules: list[str]) -> list[str]:
    return [m for m in modules if m == HARNESS or m.startswith(HARNESS + ".")]


def test_the_algorithm_wing_is_there():
    names = {p.stem for p in ALGORITHM}
    assert {"config", "model", "chat", "kv_cache", "generation", "loop", "rewards"} <= names, names


@pytest.mark.parametrize("path", ALGORITHM, ids=lambda p: p.name)
def test_the_algorithm_never_imports_the_harness(path):
    assert not crossings(imported_modules(path)), f"{path.name} imports the harness"


@pytest.mark.parametrize(
    "source",
    [
        "from .eval.judge import answers_match\n",
        "from .eval import judge\n",
        "import latentseek.eval.judge\n",
        "def f():\n    from latentseek.eval.judge import answers_match\n",
    ],
)
def test_a_crossing_is_seen(tmp_path, source):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert crossings(imported_modules(probe, folder=PACKAGE))


def test_harness_relative_imports_resolve_to_the_algorithm(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..loop import LatentSeek\n")
    assert "latentseek.loop" in imported_modules(probe, folder=PACKAGE / "eval")
