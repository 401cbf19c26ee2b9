"""The layers point only down (ARCHITECTURE.md): every import in every module, at any depth (inside
functions too), read with ``ast``.

    core (sae_lens_attn)  <-  training (sae_lens_attn.training)
                          <-  analysis (sae_lens_attn.analysis)
                          <-  front ends (sae_lens_attn.frontends), which may import all three

Two kinds of module are read by their own rule: the package root (the public facade, which may re-export a
higher layer only lazily, from its module ``__getattr__``) and the compatibility aliases (old import paths
that only re-export a moved module; nothing in the package may import them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE, TRAINING, ANALYSIS, FRONTENDS = "core", "training", "analysis", "frontends"
MAY_IMPORT = {
    CORE: {CORE},
    TRAINING: {CORE, TRAINING},
    ANALYSIS: {CORE, ANALYSIS},
    FRONTENDS: {CORE, TRAINING, ANALYSIS, FRONTENDS},
}
FACADE = "sae_lens_attn"
ALIASES = {"sae_lens_attn.explorer", "sae_lens_attn.training.cli", "sae_lens_attn.analysis.gsae_study"}


def _package_dirs() -> dict[str, Path]:
    """Installed package name -> its folder, from pyproject's ``[tool.setuptools.package-dir]``."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {name: REPO / folder for name, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the project: dotted name -> (file, is a package ``__init__``)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for base, folder in _package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join([base, *(parts[:-1] if is_pkg else parts)])
            mods.setdefault(name, (path, is_pkg))
    return mods


MODULES = _modules()


def layer(name: str) -> str:
    for prefix, which in (("sae_lens_attn.frontends", FRONTENDS), ("sae_lens_attn.analysis", ANALYSIS),
                          ("sae_lens_attn.training", TRAINING)):
        if name == prefix or name.startswith(prefix + "."):
            return which
    return CORE


def imports(name: str) -> list[tuple[int, str, ast.AST]]:
    """(line, imported project module, the enclosing function or None) for every import in ``name``."""
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[tuple[int, str, ast.AST]] = []

    def visit(node: ast.AST, func) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and func is None else func
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            found.extend((child.lineno, t, func) for t in targets if t.split(".")[0] == "sae_lens_attn")
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), None)
    return found


def test_the_layout_is_what_the_test_reads():
    """The test reads the four layers from pyproject; a package mapped elsewhere would go unchecked."""
    assert set(_package_dirs()) == {"sae_lens_attn", "sae_lens_attn.training", "sae_lens_attn.analysis",
                                    "sae_lens_attn.frontends"}
    assert {layer(m) for m in MODULES} == {CORE, TRAINING, ANALYSIS, FRONTENDS}
    assert ALIASES <= set(MODULES)


def test_no_layer_imports_a_higher_or_sideways_one():
    bad = []
    for name in sorted(set(MODULES) - ALIASES - {FACADE}):
        for line, target, _ in imports(name):
            if layer(target) not in MAY_IMPORT[layer(name)]:
                bad.append(f"{MODULES[name][0].relative_to(REPO)}:{line}: {layer(name)} {name} imports "
                           f"{layer(target)} {target}")
    assert not bad, "imports that climb a layer (see ARCHITECTURE.md):\n" + "\n".join(bad)


def test_the_facade_reaches_up_only_lazily():
    """``from sae_lens_attn import train`` works, yet importing any core module loads no trainer: the root
    may name a higher layer only inside its module-level ``__getattr__``."""
    for line, target, func in imports(FACADE):
        if layer(target) != CORE:
            assert func is not None and func.name == "__getattr__", f"sae_lens_attn/__init__.py:{line} {target}"


def test_aliases_hold_no_code_and_nothing_imports_them():
    """An old import path kept for callers only re-exports; if package code used it, the layers would
    be crossed through the back door."""
    for name in sorted(ALIASES):
        tree = ast.parse(MODULES[name][0].read_text())
        for node in tree.body:
            ok = (isinstance(node, ast.Import | ast.ImportFrom)
                  or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))  # the docstring
                  or (isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"])
                  or (isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"))
            assert ok, f"{name} holds code of its own (line {node.lineno}): move it to the module it aliases"
    users = [f"{m} imports {t}" for m in MODULES for _, t, _ in imports(m) if t in ALIASES and m not in ALIASES]
    assert not users


@pytest.mark.parametrize("alias, names", [
    ("sae_lens_attn.explorer", ["ExplorerSession", "LoadedSAE", "Prompt", "UnknownSAEError"]),
    ("sae_lens_attn.training.cli", ["main", "build_parser", "parse_train_config", "add_config_arguments"]),
    ("sae_lens_attn.analysis.gsae_study", ["StudyConfig", "main", "report", "run_study"]),
])
def test_old_import_paths_still_work(alias, names):
    import importlib

    mod = importlib.import_module(alias)
    assert all(hasattr(mod, n) for n in names)


def test_importing_the_core_loads_no_higher_layer():
    """The same rule at run time: import every core module (and the root) in a fresh interpreter."""
    core = [m for m in MODULES if layer(m) == CORE and m not in ALIASES]
    code = ("import importlib, sys\n"
            f"for m in {sorted(core)!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sae_lens_attn.training', "
            "'sae_lens_attn.analysis', 'sae_lens_attn.frontends'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
