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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from qdelta.errors import QDeltaError

F = TypeVar("F", bound=Callable[..., Any])

# Every object with a lock, for the fork hook below.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """The child has only the forking thread: a lock copied while another thread
    held it would never be released. Every object gets a fresh lock; one that was
    inside a call in another thread (its ``_caller`` is set for the length of a
    call) may be half-updated and refuses further calls. Nothing runs in the
    parent, so a fork neither waits for nor stalls the serving threads."""
    me = threading.get_ident()
    for obj in list(_LIVE):
        caller = obj.__dict__.get("_caller")
        obj._init_lock()
        if caller is not None and caller != me:
            object.__setattr__(obj, "_busy_at_fork", True)
            forget = getattr(obj, "_forget_call_state", None)
            if forget is not None:  # what that call had set must not outlive it here
                forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SerializedCalls:
    """Mixin giving ``self._lock`` (an RLock). Copies and unpickled objects get a
    fresh lock of their own: a lock cannot be pickled, and must not be shared."""

    _lock: threading.RLock

    def _init_lock(self) -> None:
        object.__setattr__(self, "_lock", threading.RLock())
        object.__setattr__(self, "_caller", None)  # the thread inside a call, if any
        _LIVE.add(self)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_lock", "_caller", "_busy_at_fork"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        parent = super()
        if hasattr(parent, "__setstate__"):
            parent.__setstate__(state)  # type: ignore[misc]
        else:
            self.__dict__.update(state)
        self._init_lock()


@contextmanager
def holding(obj: SerializedCalls) -> Iterator[None]:
    """``obj``'s lock for a block, held as a serialized call holds it: the calling
    thread is marked (the fork hook then knows the object is mid-call), and an object
    that was mid-call in another thread when this process forked is refused."""
    if obj.__dict__.get("_busy_at_fork"):
        raise QDeltaError(
            f"{type(obj).__name__}: expected an object no other thread was using when "
            "this process forked, found one mid-call in another thread (its state may be "
            "half-updated); build it anew in the child, or fork before serving from threads"
        )
    with obj._lock:
        outer = obj.__dict__.get("_caller")  # this thread's, when re-entered
        obj.__dict__["_caller"] = threading.get_ident()
        try:
            yield
        finally:
            obj.__dict__["_caller"] = outer


def serialized(method: F) -> F:
    """Run ``method`` holding its object's lock (see :class:`SerializedCalls`)."""

    @functools.wraps(method)
    def call(self: SerializedCalls, *args: Any, **kwargs: Any) -> Any:
        with holding(self):
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]
