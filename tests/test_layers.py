"""Layers import downward only (docs/ARCHITECTURE.md, issue #14).

Every import statement of the package (module level and inside functions, `TYPE_CHECKING`
blocks included) is read with `ast` and checked against `LAYERS`: a module may import a module
of a lower layer, or of its own group; never a higher layer, nor a sibling group of its layer
(the implementations do not import each other). The native build tooling (`TOOLING`) may be
imported only inside functions and imports nothing but `errors`.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from typing import Iterator, NamedTuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
#: Source folder -> the package it installs as (pyproject.toml's package-dir).
ROOTS = {"dga_compile": "dga_compile", "passes": "dga_compile.passes", "kernels": "dga_compile.kernels"}

#: (layer, group, module prefixes), lowest first. A prefix covers its submodules.
LAYERS = [
    (0, "base", ("dga_compile.errors", "dga_compile.config", "dga_compile._validation", "dga_compile.plan",
                 "dga_compile._files")),
    (1, "selection", ("dga_compile.selection",)),                        # steps 1–4 of the spec
    (2, "reference", ("dga_compile.reference", "dga_compile.decode_reference")),  # the spec in code
    (3, "blocked", ("dga_compile.blocked", "dga_compile._blocked_fast")),  # the implementations ...
    (3, "kernels", ("dga_compile.kernels",)),
    (3, "cpp", ("dga_compile._extension",)),
    (4, "op", ("dga_compile.ops", "dga_compile.dispatch", "dga_compile.decode_op")),  # custom ops, the table
    (5, "api", ("dga_compile.api",)),
    (5, "policy", ("dga_compile.policy",)),                              # the one site policy, its report
    (5, "cache", ("dga_compile.cache",)),                                # the DGA KV cache (decoding)
    (6, "passes", ("dga_compile.passes",)),
    (6, "integrations", ("dga_compile.integrations",)),
    (7, "backend", ("dga_compile.backend",)),
    (7, "onnx", ("dga_compile.onnx",)),
    (8, "package", ("dga_compile.__init__",)),                           # what `import dga_compile` exposes
    (9, "eval", ("dga_compile.eval", "dga_compile.models")),             # evaluation; load_model (its aliases fetch)
    (10, "deploy", ("dga_compile.deploy",)),                             # convert / inspect / compare as functions
    (11, "cli", ("dga_compile.cli", "dga_compile._command", "dga_compile.eval.cli", "dga_compile.eval.plan_cli",
                 "dga_compile.eval.__main__")),                          # the command lines; nothing imports them
]
#: Imported only inside the functions that build or fetch; they import only `errors`.
TOOLING = ("dga_compile._cxx", "dga_compile._tools")


class Import(NamedTuple):
    importer: str
    target: str
    line: int
    in_function: bool


def _modules() -> dict[str, pathlib.Path]:
    """Module name -> file, for every module of the package (a package's own name for its __init__)."""
    found = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__") if parts[-1] == "__init__" else name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> tuple[int, str]:
    """(layer, group) of a module; the package's __init__ is "dga_compile.__init__" here."""
    best = None
    for layer, group, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer, group)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best[1], best[2]


def _key(module: str) -> str:
    """The name `_layer` knows a module by (the package itself is its __init__)."""
    return "dga_compile.__init__" if module == "dga_compile" else module


def _imports(module: str, path: pathlib.Path) -> Iterator[Import]:
    """Every import of a dga_compile module in ``path``, resolved to the module it loads."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module
            # `from pkg import name` loads pkg.name when that is a module, else pkg itself.
            names = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in MODULES else pkg for a in node.names]
        else:
            continue
        for name in names:
            if name == "dga_compile" or name.startswith("dga_compile."):
                while name not in MODULES and "." in name:        # `import a.b.c` of a non-module tail
                    name = name.rsplit(".", 1)[0]
                yield Import(module, name, node.lineno, id(node) in in_function)


def _violation(imp: Import) -> str:
    """Why ``imp`` breaks the layers ("" when it does not)."""
    if imp.target == imp.importer:
        return ""
    if imp.importer in TOOLING:
        return "" if imp.target in TOOLING or imp.target == "dga_compile.errors" else "tooling imports beyond errors"
    if imp.target in TOOLING:
        return "" if imp.in_function else "tooling imported at module level"
    (lo, lo_group), (hi, hi_group) = _layer(_key(imp.importer)), _layer(_key(imp.target))
    if hi_group == lo_group or hi < lo:
        return ""
    return f"layer {lo} ({lo_group}) imports layer {hi} ({hi_group})"


ALL_IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def test_every_module_has_a_layer():
    for module in MODULES:
        if module not in TOOLING:
            _layer(_key(module))


def test_imports_go_downward():
    bad = [f"{MODULES[i.importer].relative_to(REPO)}:{i.line}: {i.importer} -> {i.target}: {why}"
           for i in ALL_IMPORTS if (why := _violation(i))]
    assert not bad, "imports against the layers (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("source, importer, target, why", [
    pytest.param("from dga_compile.dispatch import run\n", "dga_compile.kernels.pipeline", "dga_compile.dispatch",
                 "layer 3 (kernels) imports layer 4 (op)", id="kernel-imports-the-op"),
    pytest.param("def f():\n    from ..blocked import blocked_attention\n", "dga_compile.kernels.pipeline",
                 "dga_compile.blocked", "layer 3 (kernels) imports layer 3 (blocked)", id="sibling-in-a-function"),
    pytest.param("from . import cli\n", "dga_compile.config", "dga_compile.cli", "layer 0 (base) imports layer 11",
                 id="relative-to-the-cli"),
    pytest.param("from dga_compile import DGAConfig\n", "dga_compile.selection", "dga_compile",
                 "layer 1 (selection) imports layer 8 (package)", id="the-package-facade"),
    pytest.param("from ._cxx import REPO\n", "dga_compile._extension", "dga_compile._cxx",
                 "tooling imported at module level", id="tooling-at-module-level"),
])
def test_the_checker_catches(tmp_path, source, importer, target, why):
    """The checker itself: each spelling of a wrong import is found and named."""
    path = tmp_path / "__init__.py" if importer.endswith("__init__") else tmp_path / "m.py"
    path.write_text(source)
    found = [(i.target, _violation(i)) for i in _imports(importer, path)]
    assert len(found) == 1 and found[0][0] == target and found[0][1].startswith(why), found


def test_import_dga_compile_loads_no_tooling_cli_or_rich():
    code = "import sys, dga_compile; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=REPO).stdout.split())
    unwanted = {"dga_compile._cxx", "dga_compile._tools", "dga_compile.cli", "dga_compile.eval.cli", "rich"}
    assert "dga_compile.ops" in loaded and not loaded & unwanted, sorted(loaded & unwanted)
