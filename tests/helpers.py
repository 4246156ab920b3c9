"""The shared test toolkit (not fixtures; those live in the conftest files).

Test modules import what they share from here or from the other helper modules
(tests/attachment_helpers.py, tests/health_fields.py, ...), never from each other:
tests/test_test_imports.py keeps it so."""

from __future__ import annotations

API = "/api/v1"
