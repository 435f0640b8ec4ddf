"""Type stub of the Rust extension module ``qdelta._core`` (src/python/*.rs)."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, SupportsIndex, final, overload

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "BIT_LAYOUT",
    "FORMAT_VERSION",
    "MAX_PLANES",
    "WORD_BITS",
    "ChecksumError",
    "DTypeError",
    "DeltaFile",
    "FileError",
    "FormatError",
    "NonFiniteError",
    "QDeltaError",
    "ShapeError",
    "UnsupportedVersionError",
    "delta_matmul",
    "fingerprint",
    "fused_linear",
    "gather_embedding",
    "gemv_isa",
    "pack_residual",
    "pack_signs",
    "packed_embedding",
    "read_file",
    "rms_norm_rows",
    "rowwise_linear",
    "unpack_planes",
    "unpack_signs",
    "write_delta",
    "write_file",
]

_Path = str | os.PathLike[str]
_Layer = tuple[str, tuple[int, int], int, str, bool, str, str]

WORD_BITS: int
MAX_PLANES: int
FORMAT_VERSION: int
BIT_LAYOUT: str

class QDeltaError(Exception): ...
class ShapeError(QDeltaError): ...
class DTypeError(QDeltaError): ...
class NonFiniteError(QDeltaError): ...
class FormatError(QDeltaError): ...
class UnsupportedVersionError(FormatError): ...
class ChecksumError(QDeltaError): ...
class FileError(QDeltaError): ...

# bitplane.rs: `delta` is float32, or the uint16 bits of float16 / bfloat16 (`dtype` says which).
def pack_signs(
    delta: NDArray[np.float32] | NDArray[np.uint16], dtype: str
) -> NDArray[np.uint32]: ...
def unpack_signs(
    packed: NDArray[np.uint32], rows: SupportsIndex, cols: SupportsIndex
) -> NDArray[np.int8]: ...
@overload
def unpack_planes(
    planes: NDArray[np.uint32],
    scales: NDArray[np.float32],
    rows: SupportsIndex,
    cols: SupportsIndex,
    dtype: Literal["float32"],
    bits: SupportsIndex | None = None,
) -> NDArray[np.float32]: ...
@overload
def unpack_planes(
    planes: NDArray[np.uint32],
    scales: NDArray[np.float32],
    rows: SupportsIndex,
    cols: SupportsIndex,
    dtype: Literal["float16", "bfloat16"],
    bits: SupportsIndex | None = None,
) -> NDArray[np.uint16]: ...
@overload
def unpack_planes(
    planes: NDArray[np.uint32],
    scales: NDArray[np.float32],
    rows: SupportsIndex,
    cols: SupportsIndex,
    dtype: str,
    bits: SupportsIndex | None = None,
) -> NDArray[np.float32] | NDArray[np.uint16]: ...
def pack_residual(
    delta: NDArray[np.float32] | NDArray[np.uint16],
    dtype: str,
    bits: SupportsIndex,
    scale: str = "matrix",
) -> tuple[NDArray[np.uint32], NDArray[np.float32]]: ...

# gemv.rs
def delta_matmul(
    x: NDArray[np.float32] | NDArray[np.uint16],
    dtype: str,
    planes: NDArray[np.uint32],
    scales: NDArray[np.float32],
    tenant_ids: NDArray[np.int64],
    bits: SupportsIndex | None = None,
    out: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]: ...
def gemv_isa() -> str: ...

# fused.rs: `out` is written in place.
def fused_linear(
    x: NDArray[np.float32],
    weight: NDArray[np.float32],
    bias: NDArray[np.float32] | None,
    planes: NDArray[np.uint32],
    scales: NDArray[np.float32],
    tenant_ids: NDArray[np.int64],
    out: NDArray[np.float32],
) -> None: ...
def rowwise_linear(
    x: NDArray[np.float32],
    weights: Sequence[NDArray[np.float32]],
    biases: Sequence[NDArray[np.float32] | None],
    index: NDArray[np.int64],
    out: NDArray[np.float32],
) -> None: ...

# embedding.rs: `out` is written in place.
def packed_embedding(
    base: NDArray[np.float32],
    planes: NDArray[np.uint32],
    scales: NDArray[np.float32],
    tokens: NDArray[np.int64],
    tenants: NDArray[np.int64],
    out: NDArray[np.float32],
) -> None: ...
def gather_embedding(
    tables: Sequence[NDArray[np.float32]],
    tokens: NDArray[np.int64],
    table: NDArray[np.int64],
    out: NDArray[np.float32],
) -> None: ...

# rmsnorm.rs: `out` is written in place.
def rms_norm_rows(
    x: NDArray[np.float32], weights: NDArray[np.float32], eps: float, out: NDArray[np.float32]
) -> None: ...

# store.rs: tuples must be tuples (not lists); dtype names are safetensors' ("F32", "BF16", ...).
@final
class DeltaFile:
    def __new__(cls, path: _Path) -> DeltaFile: ...
    @property
    def path(self) -> Path: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    @property
    def format_version(self) -> int: ...
    @property
    def tenant(self) -> str: ...
    @property
    def creator(self) -> str: ...
    @property
    def base_fingerprint(self) -> str: ...
    @property
    def user_metadata(self) -> dict[str, str]: ...
    @property
    def layers(self) -> list[_Layer]: ...
    @property
    def params(self) -> list[str]: ...
    @property
    def tensors(self) -> list[tuple[str, str, list[int], int]]: ...
    @property
    def header_covered(self) -> bool: ...
    def check_unchanged(self) -> None: ...
    def layer(self, name: str) -> _Layer: ...
    def tensor(self, name: str) -> tuple[str, list[int], NDArray[np.uint8]]: ...
    def verify(self) -> int: ...

def write_delta(
    path: _Path,
    layers: Sequence[
        tuple[
            str,
            tuple[SupportsIndex, SupportsIndex],
            SupportsIndex,
            str,
            bool,
            NDArray[np.uint8],
            NDArray[np.uint8],
        ]
    ],
    params: Sequence[tuple[str, str, Sequence[SupportsIndex], NDArray[np.uint8]]],
    tenant: str,
    base_fingerprint: str,
    user_metadata: dict[str, str],
) -> None: ...
def write_file(path: _Path, data: bytes) -> None: ...
def read_file(path: _Path) -> bytes: ...

# A list of tuples (what the core takes); shapes typed list[int] as `list` is invariant.
def fingerprint(weights: list[tuple[str, str, list[int], NDArray[np.uint8]]]) -> str: ...
