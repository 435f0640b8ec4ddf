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
an unreadable file is reported once and replaced.

Off by default: ``QDELTA_AUTOTUNE=1`` or ``qdelta.kernels.autotune.ENABLED = True``.
While a CUDA graph is being captured nothing is timed: a shape class without a
decision then runs the fixed rule (:func:`qdelta.kernels.cuda.auto_path`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from qdelta.atomic_io import write_json_atomic

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
        return Path(explicit)
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qdelta" / "autotune.json"
    )


class DecisionCache:
    """Decisions in memory, backed by one JSON file (``{"entries": {key: {...}}}``)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._memory: dict[str, str] = {}
        self._loaded = False

    def _file_path(self) -> Path:
        return self.path if self.path is not None else cache_path()

    def _read_file(self) -> dict[str, dict]:
        path = self._file_path()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"autotune cache {path}: expected a {FORMAT} JSON file, found unreadable "
                f"content ({exc}); it will be replaced",
                AutotuneWarning,
                stacklevel=4,
            )
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            warnings.warn(
                f"autotune cache {path}: expected format {FORMAT!r}, found "
                f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}; "
                "it will be replaced",
                AutotuneWarning,
                stacklevel=4,
            )
            return {}
        if data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
            return {}  # another version's decisions: measure again
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

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
        entries = self._read_file()  # merge with what other processes wrote meanwhile
        entries[key] = {
            "choice": choice,
            "us": {c: (t if math.isfinite(t) else None) for c, t in times_us.items()},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {"format": FORMAT, "version": VERSION, "entries": entries}
            write_json_atomic(path, data, indent=1, sort_keys=True)
        except OSError as exc:
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


def recorded(cache: DecisionCache | None = None) -> dict[str, dict]:
    """Every decision in the decision file: key -> ``{"choice", "us"}`` (nothing is timed)."""
    return (CACHE if cache is None else cache)._read_file()


def forget(cache: DecisionCache | None = None) -> int:
    """Delete the decision file and the in-memory decisions; the number of entries dropped."""
    cache = CACHE if cache is None else cache
    count = len(cache._read_file())
    cache._file_path().unlink(missing_ok=True)
    cache.clear()
    return count


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
