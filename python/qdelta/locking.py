"""One lock per serving object, so calls from several threads take turns.

The multi-tenant modules keep per-call shortcuts (routing slots, fused plans,
row-slot caches) and restack their tenant tensors on add/remove; a second
thread seeing one half-updated would compute with another tenant's delta. A
re-entrant lock around each public call is far cheaper than those calls, and
batching requests into one call (the point of multi-tenant serving) is the way
to use more cores, not threads on one object.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from qdelta.errors import QDeltaError

F = TypeVar("F", bound=Callable[..., Any])

# Every object with a lock, for the fork hooks below.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_fork_state: dict[str, list] = {"held": [], "busy": []}


def _before_fork() -> None:
    """Hold every free lock across fork(), so no other thread can enter a call in
    that instant; a lock another thread holds marks its object busy (never waited
    for: a fork must not deadlock)."""
    for obj in list(_LIVE):
        lock = obj.__dict__.get("_lock")
        if lock is None:
            continue
        if lock.acquire(blocking=False):
            _fork_state["held"].append(lock)
        else:
            _fork_state["busy"].append(obj)


def _after_fork_in_parent() -> None:
    for lock in _fork_state["held"]:
        lock.release()
    _fork_state["held"].clear()
    _fork_state["busy"].clear()


def _after_fork_in_child() -> None:
    """The child has only the forking thread: a lock copied while another thread
    held it would never be released. Every object gets a fresh lock; one that was
    mid-call in another thread may be half-updated and refuses further calls."""
    busy = {id(obj) for obj in _fork_state["busy"]}
    for obj in list(_LIVE):
        obj._init_lock()
        if id(obj) in busy:
            object.__setattr__(obj, "_busy_at_fork", True)
    _fork_state["held"].clear()
    _fork_state["busy"].clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


class SerializedCalls:
    """Mixin giving ``self._lock`` (an RLock). Copies and unpickled objects get a
    fresh lock of their own: a lock cannot be pickled, and must not be shared."""

    _lock: threading.RLock

    def _init_lock(self) -> None:
        object.__setattr__(self, "_lock", threading.RLock())
        _LIVE.add(self)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_busy_at_fork", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        parent = super()
        if hasattr(parent, "__setstate__"):
            parent.__setstate__(state)  # type: ignore[misc]
        else:
            self.__dict__.update(state)
        self._init_lock()


def serialized(method: F) -> F:
    """Run ``method`` holding its object's lock (see :class:`SerializedCalls`)."""

    @functools.wraps(method)
    def call(self: SerializedCalls, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_busy_at_fork"):
            raise QDeltaError(
                f"{type(self).__name__}: expected an object no other thread was using when "
                "this process forked, found one mid-call in another thread (its state may be "
                "half-updated); build it anew in the child, or fork before serving from threads"
            )
        with self._lock:
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]
