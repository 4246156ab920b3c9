"""The reference web client's files (``web/``) and the headers they are served with.

The client's files are read once at start into a name → bytes table, and a request is
answered only by looking its name up there: no path is ever built from the URL, so no
``..``, encoded slash or absolute path can reach a file outside the client's folder.
Only plain files directly in that folder with a known extension are served (no
symlinks, no subfolders, no dot files)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONTENT_TYPES = {
    "html": "text/html",
    "css": "text/css",
    "js": "text/javascript",
    "svg": "image/svg+xml",
    "png": "image/png",
}
SERVABLE = re.compile(r"[a-z0-9][a-z0-9-]*\.(html|css|js|svg|png)")
# The page runs only its own files: no inline script or style, no eval, no plugins, no
# framing; it talks only to this origin (the API and the stream).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Small files, changed with each release: always revalidate rather than run stale code.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class WebFile:
    body: bytes
    content_type: str


def web_root() -> Path | None:
    """The client's folder: ``server/web`` in an installed wheel (pyproject maps the
    repository's ``web/`` there), else ``web/`` beside ``server/`` in a checkout."""
    server_dir = Path(__file__).resolve().parent
    for candidate in (server_dir / "web", server_dir.parent / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    return None


def load_files(root: Path) -> dict[str, WebFile]:
    files: dict[str, WebFile] = {}
    for path in sorted(root.iterdir()):
        found = SERVABLE.fullmatch(path.name)
        if found is None or path.is_symlink() or not path.is_file():
            continue
        files[path.name] = WebFile(path.read_bytes(), CONTENT_TYPES[found.group(1)])
    return files
