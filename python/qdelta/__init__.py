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
    DTypeError,
    NonFiniteError,
    QDeltaError,
    ShapeError,
    UnknownTenantError,
)
from qdelta.multitenant import MultiTenantLinear

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "DTypeError",
    "Delta",
    "MultiTenantLinear",
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
