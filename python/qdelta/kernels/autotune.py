"""Per-shape kernel choice, measured once on the GPU at hand and remembered on disk.

Several kernels compute the same delta matmul (docs/CUDA.md); which is fastest
depends on the card, the shape and the batch. With autotuning on, the first
``path="auto"`` call of a shape class times every candidate (into a scratch
output: the caller's tensors are never written twice) and every later call of
that class runs the winner. Decisions are kept in memory and in a JSON file
(``~/.cache/qdelta/autotune.json``; ``QDELTA_AUTOTUNE_CACHE`` overrides), keyed
by the device name and a hash of the kernel source, so a new card or an edited
kernel is measured afresh. The file is written atomically and re-read before
each write (two processes tuning at once lose nothing but a duplicate timing);
anything at that path that is not a decision file of this or an older version
(unreadable, another format, a newer version, a directory, a FIFO) is reported and
left alone: decisions then stay in memory. An older version's file is replaced.
Malformed entries are skipped.

Off by default: ``QDELTA_AUTOTUNE=1`` or ``qdelta.kernels.autotune.ENABLED = True``.
While a CUDA graph is being captured nothing is timed: a shape class without a
decision then runs the fixed rule (:func:`qdelta.kernels.cuda.auto_path`).
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from qdelta.atomic_io import write_json_atomic
from qdelta.errors import FileError, FormatError, QDeltaError

FORMAT = "qdelta-autotune"
VERSION = 1
ENV = "QDELTA_AUTOTUNE"
CACHE_ENV = "QDELTA_AUTOTUNE_CACHE"
ENABLED: bool | None = None  # None: follow $QDELTA_AUTOTUNE
REPEATS = 5  # timed runs per candidate (after one warm-up run); the median counts


class AutotuneWarning(UserWarning):
    """The decision file could not be read or written; tuning goes on in memory."""


def enabled() -> bool:
    """Whether ``path="auto"`` tunes (ENABLED, else ``$QDELTA_AUTOTUNE == "1"``)."""
    return ENABLED if ENABLED is not None else os.environ.get(ENV) == "1"


def cache_path() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return (
        # An empty XDG_CACHE_HOME counts as unset (the XDG spec), not as the working directory.
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "qdelta"
        / "autotune.json"
    )


def _well_formed(entry: object) -> bool:
    """``{"choice": str, "us": {candidate: number or None}}``, as ``put`` writes it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("choice"), str):
        return False
    times = entry.get("us", {})
    return isinstance(times, dict) and all(
        isinstance(c, str)
        and (t is None or (isinstance(t, (int, float)) and not isinstance(t, bool)))
        for c, t in times.items()
    )


class DecisionCache:
    """Decisions in memory, backed by one JSON file (``{"entries": {key: {...}}}``)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._memory: dict[str, str] = {}
        self._loaded = False

    def _file_path(self) -> Path:
        return self.path if self.path is not None else cache_path()

    def _load(self) -> tuple[dict[str, dict], type[QDeltaError] | None, str, list[str]]:
        """``(entries, error, problem, malformed)``: the well-formed decisions; when the
        file is not a decision file, the error class and what is wrong (else None, "");
        the keys of malformed entries. A missing file is an empty, valid one."""
        path = self._file_path()
        try:
            # O_NONBLOCK: opening a FIFO must not hang; fstat then refuses it.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except (FileNotFoundError, NotADirectoryError):
            return {}, None, "", []
        except OSError as exc:
            return {}, FileError, f"expected a readable {FORMAT} JSON file, found {exc}", []
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            found = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            return {}, FileError, f"expected a regular {FORMAT} JSON file, found {found}", []
        with os.fdopen(fd, "rb") as f:
            try:
                data = json.loads(f.read())
            except (OSError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
                problem = f"expected a {FORMAT} JSON file, found unreadable content ({exc})"
                return {}, FormatError, problem, []
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            return {}, FormatError, f"expected format {FORMAT!r}, found {found!r}", []
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version > VERSION:
            # A newer qdelta's decisions (or no version): theirs, not ours to replace.
            problem = f"expected version {VERSION} or older, found {version!r}"
            return {}, FormatError, problem, []
        if not isinstance(data.get("entries"), dict):
            found = type(data.get("entries")).__name__
            return {}, FormatError, f"expected 'entries' to be an object, found {found}", []
        if version != VERSION:
            return {}, None, "", []  # an older version's decisions: measured again, replaced
        entries: dict[str, dict] = {}
        malformed: list[str] = []
        for key, entry in data["entries"].items():
            if _well_formed(entry):
                entries[key] = entry
            else:
                malformed.append(key)
        return entries, None, "", malformed

    def _warn(self, error, problem: str, malformed: list[str], stacklevel: int) -> None:
        path = self._file_path()
        if error is not None:
            fate = "it is left alone and decisions stay in memory (delete it to keep them)"
            warnings.warn(
                f"autotune cache {path}: {problem}; {fate}", AutotuneWarning, stacklevel=stacklevel
            )
        if malformed:
            warnings.warn(
                f"autotune cache {path}: expected entries {{'choice': str, 'us': {{name: "
                f"float | null}}}}, found {len(malformed)} malformed ({', '.join(malformed)}); "
                "skipped them",
                AutotuneWarning,
                stacklevel=stacklevel,
            )

    def _read_file(self, strict: bool = False) -> dict[str, dict]:
        """The well-formed decisions; a file that is not a decision file warns (or with
        ``strict`` raises), malformed entries warn and are skipped."""
        entries, error, problem, malformed = self._load()
        if error is not None and strict:
            raise error(f"autotune cache {self._file_path()}: {problem}")
        self._warn(error, problem, malformed, stacklevel=5)
        return entries

    def get(self, key: str) -> str | None:
        if not self._loaded:
            self._loaded = True
            for k, entry in self._read_file().items():
                choice = entry.get("choice")
                if isinstance(choice, str):
                    self._memory.setdefault(k, choice)
        return self._memory.get(key)

    def put(self, key: str, choice: str, times_us: dict[str, float]) -> None:
        self._memory[key] = choice
        path = self._file_path()
        # Merge with what other processes wrote meanwhile.
        entries, error, problem, malformed = self._load()
        self._warn(error, problem, malformed, stacklevel=4)
        if error is not None:  # never replace what is not a decision file: it may be the user's
            return
        entries[key] = {
            "choice": choice,
            "us": {c: (t if math.isfinite(t) else None) for c, t in times_us.items()},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {"format": FORMAT, "version": VERSION, "entries": entries}
            write_json_atomic(path, data, indent=1, sort_keys=True)
        except (OSError, FileError) as exc:  # the writer's errors are FileErrors
            warnings.warn(
                f"autotune cache {path}: expected a writable file, found {exc}; "
                "decisions stay in memory",
                AutotuneWarning,
                stacklevel=3,
            )

    def clear(self) -> None:
        """Forget the in-memory decisions (the file is read again on next use)."""
        self._memory.clear()
        self._loaded = False


CACHE = DecisionCache()


def recorded(cache: DecisionCache | None = None, *, strict: bool = False) -> dict[str, dict]:
    """Every decision in the decision file: key -> ``{"choice", "us"}`` (nothing is timed).

    Malformed entries are skipped with an :class:`AutotuneWarning`; a file that is not
    a decision file warns too, or with ``strict`` raises FileError / FormatError."""
    return (CACHE if cache is None else cache)._read_file(strict=strict)


def forget(cache: DecisionCache | None = None) -> int:
    """Delete the decision file and the in-memory decisions; the number of entries dropped.

    Only a decision file is deleted: anything else (another file at that path, a
    directory, a FIFO) is left alone with a FileError / FormatError."""
    cache = CACHE if cache is None else cache
    path = cache._file_path()
    entries, error, problem, malformed = cache._load()
    if error is not None:
        raise error(f"autotune cache {path}: {problem}; not removing it")
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise FileError(f"autotune cache {path}: expected a removable file, found {exc}") from exc
    cache.clear()
    return len(entries) + len(malformed)


def choose(
    key: str,
    candidates: Sequence[str],
    run: Callable[[str], None],
    time_us: Callable[[Callable[[], None]], float],
    *,
    cache: DecisionCache | None = None,
) -> str:
    """The candidate ``run`` is fastest with, timed once per ``key``.

    ``time_us(fn)`` returns the time of one call of ``fn`` in microseconds. A
    candidate that raises is left out (timed as infinite); when every one raises,
    the first error propagates.
    """
    cache = CACHE if cache is None else cache
    known = cache.get(key)
    if known is not None and known in candidates:
        return known
    if not candidates:
        raise ValueError("autotune: expected at least one candidate, found none")
    times: dict[str, float] = {}
    first_error: BaseException | None = None
    for candidate in candidates:
        try:
            times[candidate] = float(time_us(lambda c=candidate: run(c)))
        except Exception as exc:  # e.g. too little shared memory on this card
            first_error = first_error or exc
            times[candidate] = math.inf
    best = min(candidates, key=lambda c: times[c])
    if not math.isfinite(times[best]):
        assert first_error is not None
        raise first_error
    cache.put(key, best, times)
    return best


def decided(key: str, cache: DecisionCache | None = None) -> str | None:
    """The decision recorded for ``key``, if any (nothing is timed)."""
    return (CACHE if cache is None else cache).get(key)
