"""Import rules that keep the layering of DESIGN.md: the runtime loop knows no backend and no CLI;
the CLI is a thin face over the library API.

Checked on the source (every `import` / `from ... import`, at any depth, lazy imports included),
so a violation fails here before it can hide behind a lazy import path."""

from __future__ import annotations

import ast
from pathlib import Path

import specee_compile

PKG = Path(specee_compile.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the package modules a file imports (relative imports resolved)."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return modules_in(path.read_text(), parts[:-1])


def modules_in(source: str, package: list[str]) -> set[str]:
    """Package modules imported by `source`, a module of package `package` (e.g. ["specee_compile", "runtime"])."""
    tree = ast.parse(source)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None:  # `from . import x`: x is a module of that package
                out.update(f"{mod}.{a.name}" for a in node.names)
            else:
                out.add(mod)
    return {m for m in out if m == "specee_compile" or m.startswith("specee_compile.")}


def test_runtime_imports_no_backend_and_no_cli():
    files = sorted((PKG / "runtime").glob("*.py"))
    assert files
    for f in files:
        bad = {m for m in imported_modules(f)
               if m.startswith(("specee_compile.backends", "specee_compile.api")) or m == "specee_compile.cli"}
        assert not bad, (f"{f.relative_to(PKG.parent)} imports {sorted(bad)}: the runtime calls backends only "
                         "through runtime/contract.py")


def test_cli_imports_only_the_api():
    allowed = {"specee_compile.api", "specee_compile.config", "specee_compile.errors"}
    mods = imported_modules(PKG / "cli.py")
    assert "specee_compile.api" in mods
    assert mods <= allowed, f"cli.py imports {sorted(mods - allowed)}: route it through specee_compile.api"


def test_nothing_imports_the_cli():
    for f in sorted(PKG.rglob("*.py")):
        if f.name == "cli.py" and f.parent == PKG:
            continue
        assert "specee_compile.cli" not in imported_modules(f), f"{f.relative_to(PKG.parent)} imports the CLI"


def test_rule_checker_sees_relative_and_lazy_imports():
    """The checker itself: relative imports at any level, inside functions, resolve to package names."""
    src = ("import torch\ndef g():\n    from ..backends.onnx_runner import x\n    from . import contract\n"
           "    import specee_compile.cli\n")
    assert modules_in(src, ["specee_compile", "runtime"]) == {
        "specee_compile.backends.onnx_runner", "specee_compile.runtime.contract", "specee_compile.cli"}
