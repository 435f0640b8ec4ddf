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
    DTypeError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    UnknownTenantError,
)
from qdelta.runtime import Generation, MultiTenantModel

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "BudgetError",
    "DTypeError",
    "Delta",
    "Generation",
    "MultiTenantModel",
    "NonFiniteError",
    "PackedLayer",
    "QDeltaError",
    "ShapeError",
    "UnknownTenantError",
    "__version__",
    "as_torch",
    "pack_residual",
    "pack_signs",
    "unpack_residual",
    "unpack_scaled",
    "unpack_signs",
    "words_per_row",
]
