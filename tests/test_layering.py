"""The package layering, read from the source (so it cannot regress):
server/ -> shared/ <- worker/; shared/ imports neither, nor aiohttp; herald/ (the CLI)
is the only place that may reach both, and nothing under server/ or worker/ imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "worker", "shared", "herald")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path) if m in modules}
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def top(name: str) -> str:
    return name.split(".", 1)[0]


EDGES = graph()


@pytest.mark.parametrize(("package", "forbidden"), [("server", "worker"), ("worker", "server")])
def test_server_and_worker_never_reach_each_other(package: str, forbidden: str) -> None:
    bad = {
        (mod, dep)
        for mod in EDGES
        if top(mod) == package
        for dep in reachable(EDGES, mod)
        if top(dep) in (forbidden, "herald")
    }
    assert not bad, f"{package}/ reaches {forbidden}/ or herald/: {sorted(bad)[:5]}"


def test_shared_imports_neither_process_nor_aiohttp() -> None:
    bad = []
    for pkg_file in (ROOT / "shared").rglob("*.py"):
        for imported in imports_of(pkg_file):
            if top(imported) in ("server", "worker", "herald", "aiohttp", "aiohttp_sse"):
                bad.append((module_name(pkg_file), imported))
    assert not bad, bad


def test_the_check_sees_the_imports() -> None:
    # Guard against a check that passes because it reads nothing.
    assert "shared.settings" in EDGES["server.app"] or "shared.settings" in reachable(
        EDGES, "server.app"
    )
    assert "herald.cli" in EDGES and "server.runner" in reachable(EDGES, "herald.cli")
