"""Atomic file writes, through the Rust core's writer of .qdelta files.

A temporary file in the same folder, fsync, then rename: a reader sees the old
file or the new one, never a torn one; a failed write leaves the old file and
no temporary behind, and the temporaries of writers that were killed are swept
by the next write into that folder. Each writer gets its own temporary name,
so concurrent writers cannot interleave their bytes. The new file gets the old
file's permissions, or those of a plainly created file (``0o666`` less the
umask). A directory, a FIFO, a device node or a link to one at the path is
refused (the rename would replace it), and a symbolic link to a regular file
is replaced by the new file (the file it pointed to is left as it was). Every
failure is a :class:`FileError` naming the path (docs/FORMAT.md, "Writing").

:func:`check_output` vets an output path before a command does its work: its
folder exists, it is not a folder, and it is none of the command's inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from qdelta import _core
from qdelta.errors import FileError


def file_kind(path: str | os.PathLike) -> str:
    """What ``path`` names, for messages: "a regular file", "a directory", "a FIFO",
    "a character device", "a block device", "a socket" or "nothing"."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "nothing"
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_regular_bytes(path: str | bytes | os.PathLike) -> bytes:
    """The bytes of the regular file ``path``, read by the Rust core with the rules
    of the delta reader: a FIFO, device or directory is a :class:`FileError` at
    once (never a hang, nor an endless read of ``/dev/zero``)."""
    return _core.read_file(_path_str(path, "read"))


def read_regular_text(path: str | bytes | os.PathLike) -> str:
    """:func:`read_regular_bytes` decoded as UTF-8 (``UnicodeDecodeError`` otherwise)."""
    return read_regular_bytes(path).decode("utf-8")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is a
    set-and-return, so the round trip races with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _path_str(path: Any, verb: str) -> str:
    try:
        return os.fsdecode(path)
    except TypeError:
        raise FileError(
            f"expected a str, bytes or os.PathLike path to {verb}, found {type(path).__name__}"
        ) from None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """A file object to write ``path``'s new content into (its folder must exist);
    ``path`` is replaced when the block exits normally, untouched when it raises.
    It is an in-memory buffer (no ``fileno``; outputs here are JSON and images)
    whose bytes go to the atomic writer at the end of the block."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: expected mode 'w' or 'wb', found {mode!r}")
    allowed = {"encoding", "errors", "newline"} if mode == "w" else set()
    if set(kwargs) - allowed:
        raise TypeError(
            f"atomic_open: expected options among {sorted(allowed)} for mode {mode!r}, "
            f"found {sorted(set(kwargs) - allowed)}"
        )
    buffer = io.BytesIO()
    if mode == "wb":
        yield buffer
        data = buffer.getvalue()
    else:
        text = io.TextIOWrapper(buffer, **{"encoding": "utf-8", **kwargs})
        yield text
        text.flush()
        data = buffer.getvalue()
        text.detach()
    write_bytes_atomic(path, data)


def write_text_atomic(path: str | bytes | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically (its folder must exist)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | bytes | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (its folder must exist)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data: expected bytes, found {type(data).__name__}")
    text = _path_str(path, "write")
    _core.write_file(text, bytes(data))
    return Path(text)


def write_json_atomic(path: str | Path, data, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Replace ``path`` with ``data`` as JSON atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys))


def user_path(text: str) -> str:
    """A command-line path with ``~`` expanded (argparse ``type``: the shell leaves
    ``--out=~/x`` and quoted paths alone)."""
    return os.path.expanduser(text)


def check_output(path: str | Path, what: str, inputs: Iterable[str | Path] = ()) -> Path:
    """``path``, checked before any work is done: a :class:`FileError` unless its
    folder exists and this process may create files in it, it is not a folder
    itself, and it is neither one of ``inputs`` nor an existing file inside an input
    folder (writing it would destroy an input)."""
    raw = os.fsdecode(path)
    if raw.endswith(os.sep) or (os.altsep and raw.endswith(os.altsep)):  # Path() drops it
        raise FileError(f"{what} {raw}: expected a file path, found a directory path")
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise FileError(f"{what} {path}: expected a file path, found a directory")
    if not parent.is_dir():
        found = "a file" if parent.exists() else "nothing there"
        raise FileError(f"{what} {path}: expected an existing directory {parent}, found {found}")
    # The atomic write creates a temporary beside the path and renames it: that needs
    # write and search permission on the folder, not on the file (root has both).
    effective = os.access in os.supports_effective_ids  # the ids that will write
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise FileError(
            f"{what} {path}: expected a directory this user can create files in, found "
            f"{parent} is not writable (its permissions, or a read-only file system)"
        )
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
