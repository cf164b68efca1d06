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


def _private_uses(name: str, source: str, package: str) -> list[str]:
    """Private names of other layerexit modules that module ``name`` uses: ``from m import _x`` and ``m._x``
    where ``m`` is a layerexit module it imported (``import layerexit.m as m``, ``from layerexit import m``)."""
    found, aliases = [], {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("layerexit")})
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("layerexit") or target == name:
                continue
            found += [f"{name}: from {target} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
            aliases.update({a.asname or a.name: f"{target}.{a.name}" for a in node.names
                            if f"{target}.{a.name}" in MODULES})
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and aliases[node.value.id] != name and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        offenders += _private_uses(name, path.read_text(encoding="utf-8"), package)
    assert not offenders, offenders


def test_the_private_name_check_sees_both_forms():
    source = "from .metrics import _hidden\nfrom . import metrics\nimport layerexit.io as io\nmetrics._x\nio._y\n"
    assert _private_uses("layerexit.evaluation.report", source, "layerexit.evaluation") == [
        "layerexit.evaluation.report: from layerexit.evaluation.metrics import _hidden",
        "layerexit.evaluation.report: layerexit.evaluation.metrics._x", "layerexit.evaluation.report: layerexit.io._y"]


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


def test_the_generation_package_reuses_the_encoder_rules_and_config():
    """Decoders have no rule or exits configuration of their own that the encoder side also has: a token rule
    named like an encoder rule is that very class, no generation class redefines a registered rule, and the
    decoder's saved configuration is a kind of config.BackboneExits."""
    import importlib
    import inspect
    import pkgutil

    import layerexit.generation as generation
    from layerexit.config import BackboneExits
    from layerexit.generation import EarlyExitLM, make_token_rule
    from layerexit.generation.rules import TOKEN_RULES
    from layerexit.rules import RULES, ExitRule

    modules = [importlib.import_module(f"layerexit.generation.{m.name}") for m in pkgutil.iter_modules(generation.__path__)]
    classes = [c for mod in modules for c in vars(mod).values() if inspect.isclass(c) and c.__module__ == mod.__name__]
    rules = [c for c in classes if issubclass(c, ExitRule)]
    assert rules and not {c.name for c in rules} & set(RULES.names()), [c.name for c in rules]
    shared = [n for n in TOKEN_RULES.names() if n in RULES]
    assert shared and all(type(make_token_rule(n).rule) is RULES.get(n) for n in shared)
    configs = [c for c in classes if {"backbone", "num_layers"} <= set(getattr(c, "__dataclass_fields__", ()))]
    assert not configs, configs
    from tiny_decoder import make_lm

    assert isinstance(EarlyExitLM(make_lm("llama")).config, BackboneExits)
