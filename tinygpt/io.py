"""Atomic file writes (temp file in the target's directory, fsync, rename, fsync the directory) and the checks a
command makes on its output before it starts.

A failure at any point leaves the target untouched (either the old file or none) and no temp file. A process
killed mid-write (kill -9, power loss) can leave its hidden temp file `.NAME.XXXXXXXX.tmp` beside the target:
the next write of the same target removes it.

    check_output(out, overwrite=False, inputs=[corpus])   # before a long run: writable, not an input, not there
    with atomic_writer(out) as f: ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def temp_pattern(path: str | os.PathLike, suffix: str = TEMP_SUFFIX) -> re.Pattern:
    """The names of the temp files (or directories) `atomic_writer` / `atomic_directory` make for `path`."""
    return re.compile(rf"\.{re.escape(Path(path).name)}\.[A-Za-z0-9_]{{8}}{re.escape(suffix)}")


def remove_stale_temps(path: str | os.PathLike, suffix: str = TEMP_SUFFIX, keep: str | None = None) -> list[Path]:
    """Remove the temp files left beside `path` by a write that was killed (their names only; `keep` spared).

    Returns:
        The paths removed.
    """
    path = Path(path)
    pattern = temp_pattern(path, suffix)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for e in entries:
        if e.name != keep and pattern.fullmatch(e.name):
            with contextlib.suppress(OSError):
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


def _named(e: OSError, path: Path) -> OSError:
    """`e` again, its message naming the user's `path` (not the temp file): e.g. a full disk."""
    if str(path) in str(e):
        return e
    if e.errno:
        return type(e)(e.errno, f"cannot write {path}: {e.strerror or e}")
    return OSError(f"cannot write {path}: {e}")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit it replaces `path` atomically.

    Stale temp files of the same target (left by a killed write) are removed first. An `OSError` while writing
    (a full disk: errno 28) is raised again naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _named(e, path) from e
    remove_stale_temps(path, keep=Path(tmp).name)
    try:
        with contextlib.suppress(AttributeError, OSError):  # mkstemp makes 0600; give the usual 0666 & ~umask
            os.fchmod(fd, 0o666 & ~_umask())
        try:  # around the `with`: closing a file whose buffer could not be written raises again, unnamed
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _named(e, path) from e
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _named(e, path) from e
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temp directory beside `path` to fill; on clean exit it replaces `path` (an old directory there is moved
    aside and removed only once the new one is in place). On failure `path` is untouched and the temp is gone."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent))
    except OSError as e:
        raise _named(e, path) from e
    remove_stale_temps(path, ".tmpdir", keep=tmp.name)
    old = None
    try:
        try:
            yield tmp
        except OSError as e:
            raise _named(e, path) from e
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the old export back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------ preflight
def check_writable(path: str | os.PathLike, *, directory: bool = False, error: type[Exception] = OSError) -> Path:
    """Fail now, not after a long run, when `path` cannot be written: create and remove a temp file beside it.

    Parent directories that do not exist yet are created for the probe and removed again.

    Args:
        path: the file to write (or, with `directory=True`, the directory a command fills).
        directory: `path` is a directory output (an existing file there is the error).
        error: the exception class to raise.
    Raises:
        error: naming `path`: it is a directory (a file output), a file (a directory output), or its location
            cannot be written (read-only, permission, a file where a directory should be).
    """
    path = Path(path)
    if not directory and path.is_dir():
        raise error(f"{path} is a directory; give a file path such as {path / ('x' + (path.suffix or '.tinygpt'))}")
    if directory and path.exists() and not path.is_dir():
        raise error(f"{path} is a file; give a directory to write into")
    created = []
    parent = path.parent
    try:
        missing = []
        d = parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        if not d.is_dir():
            raise error(f"cannot write {path}: {d} is not a directory")
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += f" ({parent if not created else created[0]} is not writable)"
        raise error(f"cannot write {path}: {reason}") from None
    finally:
        for m in reversed(created):
            with contextlib.suppress(OSError):
                m.rmdir()
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same existing file (or, when either is missing, the same resolved path)."""
    a, b = Path(a), Path(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: tuple | list = (),
    directory: bool = False,
    error: type[Exception] = OSError,
    hint: str = "pass overwrite=True to replace it",
) -> Path:
    """The checks before a command that writes `path` starts: never an input, not there unless `overwrite`,
    writable (`check_writable`).

    Args:
        path: the output.
        overwrite: an existing file (or, with `directory`, a non-empty directory) may be replaced.
        inputs: paths the same command reads (a corpus, a model): `path` must be none of them.
        directory: `path` is a directory output.
        error: the exception class to raise.
        hint: how the message tells the user to allow replacing (e.g. "pass --overwrite ... or --resume").
    """
    path = Path(path)
    for inp in inputs:
        if inp is not None and isinstance(inp, (str, os.PathLike)) and Path(inp).exists() and same_file(path, inp):
            raise error(f"{path} is also an input of this command ({inp}); write the output to another file")
    exists = path.is_dir() and any(path.iterdir()) if directory else path.exists() and not path.is_dir()
    if exists and not overwrite:
        raise error(f"{path} already exists; {hint}")
    return check_writable(path, directory=directory, error=error)


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
