"""Errors raised by the ring attention package."""

from qdelta.errors import QDeltaError


class RingError(QDeltaError):
    """Ring attention was misused, or a peer failed or hung past the timeout."""


class RingBackendWarning(UserWarning):
    """A requested block backend cannot run this case and a slower one is used instead."""
