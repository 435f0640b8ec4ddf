"""The qdelta exception family: every error qdelta raises is a QDeltaError.

The classes are defined by the Rust core (so Rust can raise them directly) and
extended here by the errors only Python raises.
"""

from qdelta._core import DTypeError, NonFiniteError, QDeltaError, ShapeError

__all__ = [
    "BaseMismatchError",
    "DTypeError",
    "EvalError",
    "NonFiniteError",
    "QDeltaError",
    "ShapeError",
    "ZooError",
]


class BaseMismatchError(QDeltaError):
    """A delta was applied to a base model it was not made against."""


class ZooError(QDeltaError):
    """The model zoo could not be built or loaded (missing corpus, bad cache)."""


class EvalError(QDeltaError):
    """An evaluation was asked for something undefined (empty text, ppl_ft == ppl_base)."""
