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
from qdelta.delta import Delta, PackedLayer
from qdelta.errors import (
    BaseMismatchError,
    BudgetError,
    ChecksumError,
    DTypeError,
    FileError,
    FormatError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    UnknownTenantError,
    UnsupportedVersionError,
)
from qdelta.multitenant import MultiTenantLinear
from qdelta.runtime import Generation, MultiTenantModel
from qdelta.store import DeltaFile, DeltaStore, check_base, fingerprint, load

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "BudgetError",
    "ChecksumError",
    "DTypeError",
    "Delta",
    "DeltaFile",
    "DeltaStore",
    "FileError",
    "FormatError",
    "Generation",
    "MultiTenantLinear",
    "MultiTenantModel",
    "NonFiniteError",
    "PackedLayer",
    "QDeltaError",
    "ShapeError",
    "UnknownTenantError",
    "UnsupportedVersionError",
    "__version__",
    "as_torch",
    "check_base",
    "fingerprint",
    "load",
    "pack_residual",
    "pack_signs",
    "unpack_residual",
    "unpack_scaled",
    "unpack_signs",
    "words_per_row",
]
