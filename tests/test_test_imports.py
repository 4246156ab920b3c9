"""No test module imports another (read from the source, so it cannot regress): what
tests share lives in tests/helpers.py, the other helper modules or a conftest."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def is_test_module(dotted: str) -> bool:
    """A module of ours named ``test_*`` (``tests.server.test_x``, or ``test_x`` as a
    top-level name when the tests folder itself is on sys.path)."""
    package, _, name = dotted.rpartition(".")
    ours = package == "tests" or package.startswith("tests.") or package == ""
    return ours and name.startswith("test_")


def imported_modules(source: str, importer: str) -> list[str]:
    """Every module ``source`` (the module ``importer``) imports, as dotted names; a
    ``from package import name`` counts ``package.name`` too (it may be a module)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".")[: -node.level]
                base = ".".join([*package, base] if base else package)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        name = module_name(path)
        for dotted in imported_modules(path.read_text(encoding="utf-8"), name):
            if is_test_module(dotted):
                offenders.append(f"{path.relative_to(ROOT)} imports {dotted}")
    assert offenders == [], "move what they share into tests/helpers.py:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("from tests.server.test_sse_stream import make_channel", True),
        ("import tests.integration.test_sse_network", True),
        ("import tests.integration.test_sse_network as net", True),
        ("from tests.server import test_channels", True),
        ("from .test_sse_stream import make_channel", True),
        ("from . import test_sse_stream", True),
        ("def f():\n    from tests.server.test_auth import BAD_AUTH", True),
        ("from tests.helpers import API, make_channel", False),
        ("from tests.conftest import AuthUser", False),
        ("from tests.sse_helpers import SSEReader", False),
        ("import test_sse_stream", True),
        ("import pytest\nfrom server.keys import STREAMS", False),
        ("from aiohttp.test_utils import TestClient", False),
        ("from aiohttp import test_utils", False),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, caught: bool) -> None:
    found = imported_modules(source, "tests.server.test_example")
    assert any(is_test_module(m) for m in found) is caught, found
