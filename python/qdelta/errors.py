"""The qdelta exception family: every error qdelta raises is a QDeltaError.

The classes are defined by the Rust core (so Rust can raise them directly) and
extended here by the errors only Python raises.
"""

from qdelta._core import DTypeError, NonFiniteError, QDeltaError, ShapeError

__all__ = [
    "BaseMismatchError",
    "BudgetError",
    "DTypeError",
    "NonFiniteError",
    "QDeltaError",
    "ShapeError",
    "UnknownTenantError",
]


class BaseMismatchError(QDeltaError):
    """A delta was applied to a base model it was not made against."""


class UnknownTenantError(QDeltaError):
    """A request named a tenant (or tenant id) that is not registered."""


class BudgetError(QDeltaError):
    """Loaded tenant tensors would not fit the configured memory budget."""
