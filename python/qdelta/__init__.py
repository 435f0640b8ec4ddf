"""qdelta: quantized weight deltas (BitDelta) and their kernels.

The public API; everything else is an implementation module.
"""

from qdelta.bitplane import (
    as_torch,
    pack_residual,
    pack_signs,
    unpack_residual,
    unpack_scaled,
    unpack_signs,
    words_per_row,
)
from qdelta.calibration import prepare_calibration
from qdelta.compress import compress
from qdelta.delta import Delta, PackedLayer
from qdelta.distill import DistillResult, distill
from qdelta.distill import output_loss as distill_loss
from qdelta.errors import (
    BaseMismatchError,
    CalibrationError,
    DTypeError,
    ModelMismatchError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    TargetError,
)
from qdelta.nn import BitDeltaEmbedding, BitDeltaLinear, apply, merge, unapply

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "BitDeltaEmbedding",
    "BitDeltaLinear",
    "CalibrationError",
    "DTypeError",
    "Delta",
    "DistillResult",
    "ModelMismatchError",
    "NonFiniteError",
    "PackedLayer",
    "QDeltaError",
    "ShapeError",
    "TargetError",
    "__version__",
    "apply",
    "as_torch",
    "compress",
    "distill",
    "distill_loss",
    "merge",
    "pack_residual",
    "pack_signs",
    "prepare_calibration",
    "unapply",
    "unpack_residual",
    "unpack_scaled",
    "unpack_signs",
    "words_per_row",
]
