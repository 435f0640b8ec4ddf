"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A reader sees the old file or the new one, never a torn one; a failed write
leaves the old file and no temporary behind. Each writer gets its own
temporary name, so concurrent writers cannot interleave their bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (its folder must exist)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Replace ``path`` with ``data`` as JSON atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys))
