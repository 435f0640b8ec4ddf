"""The qdelta exception family: every error qdelta raises is a QDeltaError.

The classes are defined by the Rust core (so Rust can raise them directly) and
extended here by the errors only Python raises.
"""

from qdelta._core import DTypeError, NonFiniteError, QDeltaError, ShapeError

__all__ = [
    "BaseMismatchError",
    "DTypeError",
    "NonFiniteError",
    "QDeltaError",
    "ShapeError",
    "UnknownTenantError",
]


class BaseMismatchError(QDeltaError):
    """A delta was applied to a base model it was not made against."""


class UnknownTenantError(QDeltaError, KeyError):
    """A tenant name or id that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
