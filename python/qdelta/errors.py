"""The qdelta exception family: every error qdelta raises is a QDeltaError.

The classes are defined by the Rust core (so Rust can raise them directly) and
extended here by the errors only Python raises.
"""

from qdelta import _core
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

# Named where users import them: pickle finds a class by its module, and "_core"
# is not importable under that name (a worker process's error must reach its parent).
for _cls in vars(_core).values():
    if isinstance(_cls, type) and issubclass(_cls, BaseException):
        _cls.__module__ = __name__

__all__ = [
    "AlgebraError",
    "BaseMismatchError",
    "BudgetError",
    "CalibrationError",
    "ChecksumError",
    "DTypeError",
    "EvalError",
    "FileError",
    "FormatError",
    "MissingDependencyError",
    "ModelMismatchError",
    "NonFiniteError",
    "QDeltaError",
    "ShapeError",
    "TargetError",
    "TenantNameError",
    "UnknownTenantError",
    "UnsupportedVersionError",
    "ZooError",
]


class BaseMismatchError(QDeltaError):
    """A delta was applied to a base model it was not made against."""


class ModelMismatchError(QDeltaError):
    """Base and fine-tune (or a delta and a model) do not have the same architecture."""


class TargetError(QDeltaError):
    """A target / exclude pattern selects no layer, or selects one that cannot be compressed."""


class CalibrationError(QDeltaError):
    """Calibration data for scale distillation is missing, malformed or too short."""


class UnknownTenantError(QDeltaError, KeyError):
    """A tenant name or id that is not loaded, or not in the delta store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TenantNameError(UnknownTenantError):
    """A tenant name a delta store cannot hold (its characters or length); an
    :class:`UnknownTenantError` too, as no store can have that tenant."""


class BudgetError(QDeltaError):
    """Loaded tenant tensors would not fit the configured memory budget."""


class ZooError(QDeltaError):
    """The model zoo could not be built or loaded (missing corpus, bad cache)."""


class EvalError(QDeltaError):
    """An evaluation was asked for something undefined (empty text, ppl_ft == ppl_base)."""


class AlgebraError(QDeltaError):
    """Deltas cannot be combined as asked (no inputs, bad weights, base weights needed)."""


class MissingDependencyError(QDeltaError):
    """A feature needs an optional package that is not installed (names the pip extra)."""
