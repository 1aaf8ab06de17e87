"""Imports run one way: entry points (cli, train, sft) -> Run (megaapo.run) -> parts, never back. Read from the
source (every import statement, also those inside functions), so a lazy import that closes a circle fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megaapo"
ENTRY = {"megaapo.cli", "megaapo.train", "megaapo.sft"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")


def test_no_part_imports_an_entry_point():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module(path)
        if mod in ENTRY:
            continue
        hits = sorted(m for m in _imports(path) if m in ENTRY or any(m.startswith(e + ".") for e in ENTRY))
        bad += [f"{mod} imports {m}" for m in hits]
    assert not bad, bad


def test_entry_points_do_not_import_each_other_except_cli():
    # cli dispatches to train/sft; train and sft are siblings that share only Run and its parts.
    for mod in ("train", "sft"):
        hits = {m for m in _imports(PKG / f"{mod}.py") if m.split(".")[:2] in (["megaapo", "train"],
                                                                                 ["megaapo", "sft"], ["megaapo", "cli"])}
        assert hits <= {f"megaapo.{mod}"}, (mod, hits)
