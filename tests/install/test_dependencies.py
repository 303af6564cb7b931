"""Each plugin's declared dependencies match what its code imports: every import is provided by a
declared dependency or by one of theirs (else an install fails at import), and every declared
dependency is imported (else an install pulls a library nobody uses, as kombu once was for the
AMQP plugin)."""

from __future__ import annotations

import ast
import sys
import tomllib
from functools import cache
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from importlib.metadata import files as _files
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.install.venvs import ROOT

PLUGINS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def _workspace_packages() -> dict[str, str]:
    """Top-level package -> distribution, for the workspace's own members: an editable install
    records only a .pth file, so the installed metadata cannot say which distribution provides
    `millpond` (a stale egg-info in a source tree used to, which a clean clone does not have)."""
    out: dict[str, str] = {}
    for member in [ROOT / "core", *PLUGINS]:
        name = tomllib.loads((member / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        for package in (member / "src").iterdir():
            if package.is_dir() and (package / "__init__.py").exists():
                out[package.name] = name["name"]
    return out


WORKSPACE = _workspace_packages()


def imported_modules(source: Path) -> set[str]:
    """Every absolute import in the sources, but those guarded by `except ImportError` (optional:
    the code works without them)."""

    def optional(node: ast.Try) -> bool:
        for handler in node.handlers:
            names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            if any(isinstance(n, ast.Name) and n.id.endswith("ImportError") for n in names):
                return True
            if any(isinstance(n, ast.Name) and n.id == "ModuleNotFoundError" for n in names):
                return True
        return False

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try) and optional(node):
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from opentelemetry import metrics` imports opentelemetry.metrics: keep the names,
            # `providers` finds the longest part that is a module
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for path in source.rglob("*.py"):
        visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


@cache
def files(dist: str) -> list[str]:
    return [str(f) for f in _files(dist) or []]


def providers(module: str) -> set[str]:
    """The installed distributions that provide `module`: for a namespace package shared by
    several (opentelemetry), the ones whose files hold that module."""
    top = module.split(".", maxsplit=1)[0]
    if top in WORKSPACE:
        return {WORKSPACE[top]}
    dists = set(packages_distributions().get(top, []))
    if len(dists) <= 1:
        return dists
    parts = module.split(".")
    for depth in range(len(parts), 1, -1):
        prefix = "/".join(parts[:depth])
        owning = {
            d
            for d in dists
            if any(str(f).startswith((prefix + "/", prefix + ".py")) for f in files(d))
        }
        if owning:
            return owning
    return dists


def with_their_dependencies(names: set[str]) -> set[str]:
    """The distributions and, transitively, what each requires (extras left out)."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return found


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_declared_dependencies_are_what_the_code_imports(plugin: Path) -> None:
    project = tomllib.loads((plugin / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    own = {p.name for p in (plugin / "src").iterdir() if p.is_dir()}
    imported: set[str] = set()
    for module in imported_modules(plugin / "src"):
        if module.split(".")[0] in own or module.split(".")[0] in sys.stdlib_module_names:
            continue
        dists = providers(module)
        assert dists, f"{plugin.name} imports {module!r}, which no installed distribution provides"
        imported.update(canonicalize_name(d) for d in dists)
    # an extra's libraries (millpond-broker-kombu[sqs] brings boto3) are imported only when that
    # transport is used: they count as provided, not as required
    extras = {
        canonicalize_name(Requirement(d).name)
        for group in project.get("optional-dependencies", {}).values()
        for d in group
    }
    provided = with_their_dependencies(declared | extras)
    assert imported - provided == set(), f"{plugin.name} imports undeclared {imported - provided}"
    # a plugin may declare the core range it works with (the loader checks it before loading the
    # plugin) although it reaches the core only through another plugin (eventlet via millpond-green)
    unused = declared - imported - {"millpond"}
    assert unused == set(), f"{plugin.name} declares unused {unused}"
