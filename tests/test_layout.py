"""The data flow of docs/layout.md, read from the source: which of bonewatch's folders each one
may import (at module level or inside a function alike)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each folder may import of bonewatch besides itself; worker and bench wire everything.
ALLOWED: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "db": (),
    "deliver": (),  # DICOM objects from plain values: never the ledger
    "models": ("bonewatch.ingest",),
    # the review app: the ledger, the readers, and the metric functions `evaluate` shares
    "web": ("bonewatch.db", "bonewatch.ingest", "bonewatch.models.evaluate"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute bonewatch import in ``path``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "bonewatch"]


def _within(module: str, allowed: str) -> bool:
    return module == allowed or module.startswith(allowed + ".")


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_folder_imports_only_what_the_layout_allows(folder: str) -> None:
    own = f"bonewatch.{folder}"
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in _imports(path)
        if not _within(module, own) and not any(_within(module, a) for a in ALLOWED[folder])
    ]
    assert not wrong, "against the data flow of docs/layout.md:\n" + "\n".join(wrong)


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "quantize.py"
    source.write_text("def f():\n    from bonewatch.worker.synth import synthesize\n")
    assert _imports(source) == [(2, "bonewatch.worker.synth")]
