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
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class SerializedCalls:
    """Mixin giving ``self._lock`` (an RLock). Copies and unpickled objects get a
    fresh lock of their own: a lock cannot be pickled, and must not be shared."""

    _lock: threading.RLock

    def _init_lock(self) -> None:
        object.__setattr__(self, "_lock", threading.RLock())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
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
        with self._lock:
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]
