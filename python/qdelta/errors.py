"""The qdelta exception family: every error qdelta raises is a QDeltaError.

The classes are defined by the Rust core (so Rust can raise them directly) and
extended here by the errors only Python raises.
"""

from qdelta._core import (
    ChecksumError,
    DTypeError,
    FileError,
    FormatError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    UnsupportedVersionError,
)

__all__ = [
    "BaseMismatchError",
    "BudgetError",
    "ChecksumError",
    "DTypeError",
    "FileError",
    "FormatError",
    "NonFiniteError",
    "QDeltaError",
    "ShapeError",
    "UnknownTenantError",
    "UnsupportedVersionError",
]


class BaseMismatchError(QDeltaError):
    """A delta was applied to a base model it was not made against."""


class UnknownTenantError(QDeltaError, KeyError):
    """A tenant name or id that the store, a layer or the runtime does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BudgetError(QDeltaError):
    """Loaded tenant tensors would not fit the configured memory budget."""
