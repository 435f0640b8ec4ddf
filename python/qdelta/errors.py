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


class UnknownTenantError(QDeltaError):
    """A delta store has no tenant of that name (or the name is not a valid one)."""


class BudgetError(QDeltaError):
    """Loaded tenant tensors would not fit the configured memory budget."""
