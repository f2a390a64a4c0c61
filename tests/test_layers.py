"""The layering docs/DESIGN.md states: `dschat` (the DeepSpeed-Chat-compatible core) imports nothing of `mpo_ext`.

Read from the source with `ast`, so an import hidden inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_imported_modules_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from mpo_ext import dpo\n    import mpo_ext.plots\n")
    assert imported_modules(source) == [(1, "os"), (4, "mpo_ext"), (5, "mpo_ext.plots")]


def test_dschat_imports_nothing_of_mpo_ext():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for path in sorted((REPO / "dschat").rglob("*.py"))
                 for line, module in imported_modules(path)
                 if module == "mpo_ext" or module.startswith("mpo_ext.")]
    assert not offenders, "dschat must not import mpo_ext:\n" + "\n".join(offenders)
