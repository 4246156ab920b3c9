"""``herald --version`` and the help texts: every command says what it does, every
argument what it means, and no raw reStructuredText markup reaches the terminal."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

from herald.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (path, parser) below ``parser``, itself included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, (*path, name))


def test_version_prints_the_package_version():
    done = subprocess.run(
        [sys.executable, "-m", "herald", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HERALD_PORT": "not-a-port"},  # needs no settings
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"herald {importlib.metadata.version('herald')}"


def test_every_command_has_a_description_and_every_argument_help():
    seen = set()
    for path, parser in commands(build_parser()):
        seen.add(" ".join(path))
        assert parser.description, f"herald {' '.join(path)} has no description"
        help_text = parser.format_help()
        assert "``" not in help_text, help_text
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, (path, choice.dest)
            else:
                assert action.help, f"herald {' '.join(path)}: {action.dest} has no help"
    assert {
        "serve",
        "worker",
        "migrate",
        "users create",
        "tokens create",
        "tokens list",
        "tokens revoke",
        "jobs enqueue",
        "jobs status",
        "audit verify",
    } <= seen


def test_top_level_help_names_every_command():
    text = build_parser().format_help()
    for name in ("serve", "worker", "migrate", "users", "tokens", "jobs", "audit", "--version"):
        assert name in text
