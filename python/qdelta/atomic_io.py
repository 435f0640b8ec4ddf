"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A reader sees the old file or the new one, never a torn one; a failed write
leaves the old file and no temporary behind. Each writer gets its own
temporary name, so concurrent writers cannot interleave their bytes. The new
file gets the old file's permissions, or those of a plainly created file
(``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.

:func:`check_output` vets an output path before a command does its work: its
folder exists, it is not a folder, and it is none of the command's inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from qdelta.errors import FileError


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is a
    set-and-return, so the round trip races with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permission bits the replacement of ``path`` should get."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; best effort (the file is already in place)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """A file object to write ``path``'s new content into (its folder must exist);
    ``path`` is replaced when the block exits normally, untouched when it raises."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: expected mode 'w' or 'wb', found {mode!r}")
    path = Path(path)
    perm = _mode_for(path)
    # A short temporary name: any target name up to NAME_MAX can be written.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".qdelta-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            with contextlib.suppress(OSError):  # a filesystem without modes keeps 0o600
                os.fchmod(f.fileno(), perm)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (its folder must exist)."""
    path = Path(path)
    with atomic_open(path, "w") as f:
        f.write(text)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (its folder must exist)."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(data)
    return path


def write_json_atomic(path: str | Path, data, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Replace ``path`` with ``data`` as JSON atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys))


def check_output(path: str | Path, what: str, inputs: Iterable[str | Path] = ()) -> Path:
    """``path``, checked before any work is done: a :class:`FileError` unless its
    folder exists, it is not a folder itself, and it is neither one of ``inputs``
    nor an existing file inside an input folder (writing it would destroy an input)."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise FileError(f"{what} {path}: expected a file path, found a directory")
    if not parent.is_dir():
        found = "a file" if parent.exists() else "nothing there"
        raise FileError(f"{what} {path}: expected an existing directory {parent}, found {found}")
    if not path.exists():
        return path
    if not path.is_file():  # a FIFO or a device: renaming over it would replace it
        raise FileError(f"{what} {path}: expected a regular file path, found a special file")
    target = path.resolve()
    for src in inputs:
        src_path = Path(src)
        if not src_path.exists():
            continue
        if src_path.is_dir() and target.is_relative_to(src_path.resolve()):
            raise FileError(
                f"{what} {path}: expected a path outside the input directory {src}, "
                f"found its existing file {target.relative_to(src_path.resolve())}"
            )
        if os.path.samefile(target, src_path):
            raise FileError(f"{what} {path}: expected a new file, found the input file {src}")
    return path


def ensure_dir(path: str | Path, what: str) -> Path:
    """``path`` as an existing directory (made with its parents if missing); a
    :class:`FileError` when it, or a folder above it, is a file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        where = "" if blocker == path else f" ({blocker})"
        raise FileError(f"{what} {path}: expected a directory, found a file{where}") from e
    except OSError as e:
        raise FileError(
            f"{what} {path}: expected a directory that can be created, found {e}"
        ) from e
    return path
