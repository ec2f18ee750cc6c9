"""The tree is the architecture: what each subpackage may import (its __init__ docstring says the same), and
no more than 8 modules at the package's top level."""

from __future__ import annotations

import ast

from helpers import ROOT

PACKAGE = ROOT / "letngpt"
# subpackage -> the letngpt modules/subpackages it may import (itself always allowed)
ALLOWED = {
    "model": {"config"},
    "data": {"fsutil"},
    "parallel": {"config", "errors", "data", "model"},
    "renorm": {"config", "model", "parallel"},
    "train": {"config", "errors", "fsutil", "data", "model", "parallel", "renorm"},
    "tools": {"config", "presets", "errors", "data", "model", "parallel", "train.checkpoint"},
    "compare": {"config", "presets", "cli", "errors", "fsutil", "data", "model", "train.metrics", "train.tracking",
                "tools.plan"},
}


def letngpt_imports(path) -> set[str]:
    """Every `letngpt.X...` module a file imports, at any depth of the file (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]  # `from letngpt.train import checkpoint`
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.removeprefix("letngpt.") for n in names if n.startswith("letngpt.")}
    return found


def test_each_subpackage_imports_only_what_its_docstring_allows():
    offenders = []
    for sub, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            for mod in letngpt_imports(path):
                ok = mod.split(".")[0] == sub or any(mod == a or mod.startswith(a + ".") for a in allowed)
                if not ok:
                    offenders.append(f"{path.relative_to(ROOT)} imports letngpt.{mod}")
    assert offenders == []


def test_no_relative_imports_and_at_most_eight_top_level_modules():
    relative = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert relative == []
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert subpackages == sorted(ALLOWED), subpackages
    for sub in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"letngpt/{sub}/__init__.py must say what it may import"
