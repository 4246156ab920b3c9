"""Files under HERALD_UPLOAD_DIR: keys, streaming writes, and symlink-safe access.

Every access to a stored file walks down from the upload root with directory file
descriptors opened ``O_NOFOLLOW``, so a symlink anywhere below the root (or swapped in
between a check and the unlink) is refused rather than followed. The temporary area
``.tmp`` holds uploads in progress; the orphan scan leaves it alone.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import AsyncIterable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiofiles

from shared.errors import InsufficientStorage

logger = logging.getLogger(__name__)

TEMP_DIR = ".tmp"
TEMP_SUFFIX = ".part"
# A temporary file untouched this long is a leftover of a crashed upload.
STALE_TEMP_S = 86_400
MAX_KEY_LEN = 1024

# A write refused for want of room or permission: the upload directory's problem, an
# operator's to fix, never the client's (507, see insufficient_storage()).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathRejected(Exception):
    """A stored key that must not be touched: outside the root, a symlink, not a file."""


def insufficient_storage(exc: OSError) -> InsufficientStorage | None:
    """The domain error for a write the upload directory refused, else None."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    logger.error(
        "upload directory refused a write (%s): %s",
        errno.errorcode.get(exc.errno or 0, "?"),
        exc.strerror,
    )
    return InsufficientStorage("the server cannot store this file now; retry later")


class TooLarge(Exception):
    """The stream passed the size limit (the temporary file is already removed)."""


@dataclass(frozen=True, slots=True)
class TempFile:
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class FoundFile:
    """One entry of the upload tree, as the orphan scan sees it."""

    key: str
    size: int
    mtime: float
    regular: bool


def new_key() -> str:
    """A fresh server-chosen key: 128 random bits, sharded by their first byte."""
    token = secrets.token_hex(16)
    return f"{token[:2]}/{token}"


def split_key(key: str) -> list[str]:
    """The key's path components; :class:`PathRejected` unless it is a plain relative
    path (no absolute path, ``..``, ``.``, empty part, NUL or backslash)."""
    if not key or len(key) > MAX_KEY_LEN or "\x00" in key or "\\" in key:
        raise PathRejected("malformed storage key")
    if key.startswith("/"):
        raise PathRejected("absolute storage key")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathRejected("storage key leaves its folder (.. or empty part)")
    if parts[0] == TEMP_DIR:
        raise PathRejected("storage key points into the temporary area")
    return parts


class Storage:
    """The upload directory. Blocking calls are plain methods; callers run them in a
    thread (``asyncio.to_thread``) or use the async helpers."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.temp_dir = self.root / TEMP_DIR

    # -- layout ------------------------------------------------------------------------

    def ensure(self) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def rejection_reason(self, parts: list[str]) -> str:
        """Why a key was refused, in words: only computed once it has been refused."""
        root = os.path.realpath(self.root)
        resolved = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, resolved]) != root:
            return "path resolves outside the upload directory"
        if resolved != os.path.join(root, *parts):
            return "path goes through a symlink"
        return "the stored path is not a regular file"

    @contextmanager
    def _parent_fd(self, parts: list[str]) -> Iterator[int]:
        """A descriptor of the key's folder, reached without following any symlink: a
        symlinked (or swapped-in) folder anywhere below the root is refused. This walk,
        not an earlier path check, is what guards every read and unlink."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise PathRejected(self.rejection_reason(parts)) from None
                    raise
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def _lstat_regular(self, dir_fd: int, parts: list[str]) -> os.stat_result:
        st = os.lstat(parts[-1], dir_fd=dir_fd)
        if not stat.S_ISREG(st.st_mode):  # symlinks included: never followed
            raise PathRejected(self.rejection_reason(parts))
        return st

    # -- stored files ------------------------------------------------------------------

    def validate(self, key: str) -> bool:
        """True if the file is there and safe to touch, False if it is missing;
        :class:`PathRejected` otherwise."""
        parts = split_key(key)
        try:
            with self._parent_fd(parts) as dir_fd:
                self._lstat_regular(dir_fd, parts)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, key: str) -> bool:
        """Remove the stored file: True if removed, False if it was already missing.
        Never follows a symlink; any other failure is raised as OSError."""
        parts = split_key(key)
        try:
            with self._parent_fd(parts) as dir_fd:
                self._lstat_regular(dir_fd, parts)
                os.unlink(parts[-1], dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        return True

    def open_read(self, key: str) -> tuple[int, int]:
        """An open descriptor of the stored file and its size (FileNotFoundError if gone)."""
        parts = split_key(key)
        with self._parent_fd(parts) as dir_fd:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PathRejected(self.rejection_reason(parts)) from None
                raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise PathRejected(self.rejection_reason(parts))
        return fd, st.st_size

    # -- writing -----------------------------------------------------------------------

    async def write_temp(self, chunks: AsyncIterable[bytes], max_bytes: int) -> TempFile:
        """Stream ``chunks`` into a new temporary file, hashing as it goes, and fsync it.
        Over ``max_bytes`` → :class:`TooLarge`; full, read-only or not writable →
        :class:`InsufficientStorage`; on any error no file is left behind."""
        try:
            return await self._write_temp(chunks, max_bytes)
        except OSError as exc:
            mapped = insufficient_storage(exc)
            if mapped is None:
                raise
            raise mapped from None

    async def _write_temp(self, chunks: AsyncIterable[bytes], max_bytes: int) -> TempFile:
        await asyncio.to_thread(self.ensure)
        path = self.temp_dir / f"{secrets.token_hex(16)}{TEMP_SUFFIX}"
        digest = hashlib.sha256()
        size = 0
        try:
            async with aiofiles.open(path, "xb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"upload exceeds {max_bytes} bytes")
                    digest.update(chunk)
                    await f.write(chunk)
                await f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())
        except BaseException:
            await asyncio.to_thread(self.discard_temp, path)
            raise
        return TempFile(path, size, digest.hexdigest())

    def discard_temp(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            logger.exception("could not remove temporary upload %s", path.name)

    def place(self, temp: Path, key: str) -> None:
        """Rename a finished temporary file to its key (same filesystem: atomic); a
        folder that cannot be made → :class:`InsufficientStorage`."""
        try:
            self._place(temp, key)
        except OSError as exc:
            mapped = insufficient_storage(exc)
            if mapped is None:
                raise
            raise mapped from None

    def _place(self, temp: Path, key: str) -> None:
        parts = split_key(key)
        self.root.joinpath(*parts[:-1]).mkdir(parents=True, exist_ok=True)
        with self._parent_fd(parts) as dir_fd:
            try:
                os.lstat(parts[-1], dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            else:
                raise FileExistsError(errno.EEXIST, "storage key already in use", key)
            os.rename(temp, parts[-1], dst_dir_fd=dir_fd)
            # Make the rename itself durable, not only the file's bytes.
            os.fsync(dir_fd)

    # -- the orphan scan's view --------------------------------------------------------

    def walk(self) -> Generator[FoundFile, None, None]:
        """Every non-directory entry below the root except the temporary area, one at a
        time (memory bounded by the tree's depth, not its size). Symlinks are reported,
        never followed."""
        stack: list[tuple[str, str]] = [(os.fspath(self.root), "")]
        while stack:
            path, prefix = stack.pop()
            try:
                it = os.scandir(path)
            except FileNotFoundError:
                continue
            with it:
                for entry in it:
                    rel = prefix + entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if rel != TEMP_DIR:
                                stack.append((entry.path, rel + "/"))
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we looked
                    yield FoundFile(rel, st.st_size, st.st_mtime, stat.S_ISREG(st.st_mode))

    def unlink_orphan(self, key: str, *, older_than: float) -> bool:
        """Remove a file the database does not know, only if it is still a regular file
        last modified before ``older_than`` (epoch seconds). True if removed."""
        parts = split_key(key)
        try:
            with self._parent_fd(parts) as dir_fd:
                st = self._lstat_regular(dir_fd, parts)
                if st.st_mtime >= older_than:
                    return False
                os.unlink(parts[-1], dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        return True

    def remove_stale_temps(self, *, older_than: float, dry_run: bool) -> int:
        """Leftovers of crashed uploads in the temporary area; returns how many."""
        count = 0
        try:
            with self._parent_fd([TEMP_DIR, "x"]) as dir_fd, os.scandir(dir_fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                        if not stat.S_ISREG(st.st_mode) or st.st_mtime >= older_than:
                            continue
                        if not dry_run:
                            os.unlink(entry.name, dir_fd=dir_fd)
                        count += 1
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, PathRejected):
            return 0
        return count


def file_age_cutoff(grace_s: float, now: float | None = None) -> float:
    """Files modified before this epoch time are past the grace window."""
    return (time.time() if now is None else now) - grace_s
