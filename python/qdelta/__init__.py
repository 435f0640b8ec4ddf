"""qdelta: quantized weight deltas (BitDelta) and their kernels.

The public API; everything else is an implementation module.
"""

from qdelta.algebra import DenseDelta, GreedySoup, combine, dense_delta, greedy_soup, soup
from qdelta.analysis import analyze
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
    AlgebraError,
    BaseMismatchError,
    BudgetError,
    CalibrationError,
    ChecksumError,
    DTypeError,
    FileError,
    FormatError,
    MissingDependencyError,
    ModelMismatchError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    TargetError,
    TenantNameError,
    UnknownTenantError,
    UnsupportedVersionError,
)
from qdelta.multitenant import MultiTenantLinear
from qdelta.nn import BitDeltaEmbedding, BitDeltaLinear, apply, merge, unapply
from qdelta.peft_import import from_peft, memory_report
from qdelta.runtime import Generation, MultiTenantModel
from qdelta.store import DeltaFile, DeltaStore, check_base, fingerprint, load

__version__ = "0.1.0"

__all__ = [
    "AlgebraError",
    "BaseMismatchError",
    "BitDeltaEmbedding",
    "BitDeltaLinear",
    "BudgetError",
    "CalibrationError",
    "ChecksumError",
    "DTypeError",
    "Delta",
    "DeltaFile",
    "DeltaStore",
    "DenseDelta",
    "DistillResult",
    "FileError",
    "FormatError",
    "Generation",
    "GreedySoup",
    "MissingDependencyError",
    "ModelMismatchError",
    "MultiTenantLinear",
    "MultiTenantModel",
    "NonFiniteError",
    "PackedLayer",
    "QDeltaError",
    "ShapeError",
    "TargetError",
    "TenantNameError",
    "UnknownTenantError",
    "UnsupportedVersionError",
    "__version__",
    "analyze",
    "apply",
    "as_torch",
    "check_base",
    "combine",
    "compress",
    "dense_delta",
    "distill",
    "distill_loss",
    "fingerprint",
    "from_peft",
    "greedy_soup",
    "load",
    "memory_report",
    "merge",
    "pack_residual",
    "pack_signs",
    "prepare_calibration",
    "soup",
    "unapply",
    "unpack_residual",
    "unpack_scaled",
    "unpack_signs",
    "words_per_row",
]
