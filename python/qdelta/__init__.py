"""qdelta: quantized weight deltas (BitDelta) and their kernels.

The public API; everything else is an implementation module. Names load on
first use (PEP 562): ``import qdelta`` and the command's ``--help`` and
``--version`` need not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time _LAZY loads them
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
    from qdelta.multitenant import MultiTenantLinear
    from qdelta.nn import BitDeltaEmbedding, BitDeltaLinear, apply, merge, unapply
    from qdelta.peft_import import from_peft, memory_report
    from qdelta.runtime import Generation, MultiTenantModel
    from qdelta.store import DeltaFile, DeltaStore, check_base, fingerprint, load

#: public name -> (module, attribute): imported when first asked for.
_LAZY: dict[str, tuple[str, str]] = {
    "DenseDelta": ("qdelta.algebra", "DenseDelta"),
    "GreedySoup": ("qdelta.algebra", "GreedySoup"),
    "combine": ("qdelta.algebra", "combine"),
    "dense_delta": ("qdelta.algebra", "dense_delta"),
    "greedy_soup": ("qdelta.algebra", "greedy_soup"),
    "soup": ("qdelta.algebra", "soup"),
    "analyze": ("qdelta.analysis", "analyze"),
    "as_torch": ("qdelta.bitplane", "as_torch"),
    "pack_residual": ("qdelta.bitplane", "pack_residual"),
    "pack_signs": ("qdelta.bitplane", "pack_signs"),
    "unpack_residual": ("qdelta.bitplane", "unpack_residual"),
    "unpack_scaled": ("qdelta.bitplane", "unpack_scaled"),
    "unpack_signs": ("qdelta.bitplane", "unpack_signs"),
    "words_per_row": ("qdelta.bitplane", "words_per_row"),
    "prepare_calibration": ("qdelta.calibration", "prepare_calibration"),
    "compress": ("qdelta.compress", "compress"),
    "Delta": ("qdelta.delta", "Delta"),
    "PackedLayer": ("qdelta.delta", "PackedLayer"),
    "DistillResult": ("qdelta.distill", "DistillResult"),
    "distill": ("qdelta.distill", "distill"),
    "distill_loss": ("qdelta.distill", "output_loss"),
    "MultiTenantLinear": ("qdelta.multitenant", "MultiTenantLinear"),
    "BitDeltaEmbedding": ("qdelta.nn", "BitDeltaEmbedding"),
    "BitDeltaLinear": ("qdelta.nn", "BitDeltaLinear"),
    "apply": ("qdelta.nn", "apply"),
    "merge": ("qdelta.nn", "merge"),
    "unapply": ("qdelta.nn", "unapply"),
    "from_peft": ("qdelta.peft_import", "from_peft"),
    "memory_report": ("qdelta.peft_import", "memory_report"),
    "Generation": ("qdelta.runtime", "Generation"),
    "MultiTenantModel": ("qdelta.runtime", "MultiTenantModel"),
    "DeltaFile": ("qdelta.store", "DeltaFile"),
    "DeltaStore": ("qdelta.store", "DeltaStore"),
    "check_base": ("qdelta.store", "check_base"),
    "fingerprint": ("qdelta.store", "fingerprint"),
    "load": ("qdelta.store", "load"),
}

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


def __getattr__(name: str) -> Any:
    """A public name's object, or a submodule (``qdelta.store``), imported on first use."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip this function
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but something it imports does not
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps a public name over the submodule of the same name (``qdelta.compress``
    is the function; the import system would set the module there once it loads)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            name in _LAZY
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
        ):
            return  # reachable as sys.modules["qdelta.<name>"] and by ``from ... import``
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
