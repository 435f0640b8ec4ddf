"""The qdelta exception family: every error qdelta raises is a QDeltaError.

The classes are defined by the Rust core (so Rust can raise them directly) and
extended here by the errors only Python raises.
"""

from qdelta._core import DTypeError, NonFiniteError, QDeltaError, ShapeError

__all__ = [
    "BaseMismatchError",
    "CalibrationError",
    "DTypeError",
    "ModelMismatchError",
    "NonFiniteError",
    "QDeltaError",
    "ShapeError",
    "TargetError",
]


class BaseMismatchError(QDeltaError):
    """A delta was applied to a base model it was not made against."""


class ModelMismatchError(QDeltaError):
    """Base and fine-tune (or a delta and a model) do not have the same architecture."""


class TargetError(QDeltaError):
    """A target / exclude pattern selects no layer, or selects one that cannot be compressed."""


class CalibrationError(QDeltaError):
    """Calibration data for scale distillation is missing, malformed or too short."""
