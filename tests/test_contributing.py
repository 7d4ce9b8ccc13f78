"""CONTRIBUTING.md's module map stays true: every module of the package, with exactly its imports inside it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = "kubectl_mirror"


def package_imports(pkg_dir: Path) -> dict[str, set[str]]:
    """Each module's imports of sibling modules (relative imports; `from . import __version__` is the package)."""
    modules = {f.stem for f in pkg_dir.glob("*.py") if f.stem != "__init__"}
    found: dict[str, set[str]] = {}
    for name in sorted(modules):
        deps: set[str] = set()
        for node in ast.walk(ast.parse((pkg_dir / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names if a.name in modules)
        found[name] = deps - {name}
    return found


def module_map(text: str) -> dict[str, set[str]]:
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|[^|]*\|[^|]*\|([^|]*)\|$", section, re.M)
    return {name: set(imports.split()) for name, imports in rows}


def test_the_module_map_names_every_module_and_its_imports(repo: Path) -> None:
    documented = module_map((repo / "CONTRIBUTING.md").read_text())
    actual = package_imports(repo / "pkg" / PKG)
    assert sorted(documented) == sorted(actual), "CONTRIBUTING.md's module map and pkg/ list different modules"
    wrong = {m: (sorted(documented[m]), sorted(actual[m])) for m in actual if documented[m] != actual[m]}
    assert not wrong, f"module: (CONTRIBUTING.md says, the code imports): {wrong}"
