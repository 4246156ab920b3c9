"""The wheel's package list (pyproject.toml lists it by hand, see there) is every
package of the source trees, plus the web client mapped to ``server.web``."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("herald", "server", "shared", "worker")


def test_listed_packages_are_every_package_plus_the_web_client() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for tree in TREES
        for init in (ROOT / tree).rglob("__init__.py")
    }
    assert sorted(config["packages"]) == sorted({*found, "server.web"})
    assert config["package-dir"] == {"server.web": "web"}
    assert (ROOT / "web" / "index.html").is_file()
