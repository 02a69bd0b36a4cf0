"""Atomic file writes: temp file in the target's directory, fsync, rename, fsync the directory.

A failure at any point leaves the target untouched (either the old file or none) and no temp file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(AttributeError, OSError):  # mkstemp makes 0600; give the usual 0666 & ~umask
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def iter_jsonl(
    path: str | os.PathLike, error: type[Exception] = ValueError, hint: str = ""
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a UTF-8 JSONL file.

    Raises:
        error: naming `path:line` for a line that is not JSON (followed by `hint`, e.g. an example record), or
            the file for text that is not UTF-8.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
                yield n, rec
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from None
