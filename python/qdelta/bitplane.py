"""Sign bit-planes: numpy / torch in, numpy out; all work happens in Rust.

Inputs may be numpy arrays (float32, float16, or uint16 holding bfloat16
bits) or torch tensors (float32, float16, bfloat16; moved to CPU). Outputs are
numpy arrays; a bfloat16 result is returned as uint16 bits (numpy has no
bfloat16): see :func:`qdelta.bitplane.as_torch`.
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Literal, get_args

import numpy as np

from qdelta import _core
from qdelta.errors import DTypeError, QDeltaError, ShapeError

FloatName = Literal["float32", "float16", "bfloat16"]
ScaleMode = Literal["matrix", "row"]

WORD_BITS: int = _core.WORD_BITS
MAX_PLANES: int = _core.MAX_PLANES


def words_per_row(cols: int) -> int:
    """u32 words a packed row of ``cols`` columns takes."""
    n = _int(cols)
    if n is None or n < 0:
        raise ShapeError(f"cols: expected an int >= 0, found {cols!r}")
    return -(-n // WORD_BITS)


def _storage(delta: Any) -> tuple[np.ndarray, FloatName]:
    """The array as the core takes it: float32, or uint16 bits for halves."""
    if isinstance(delta, np.ndarray):
        if delta.dtype == np.float32:
            return delta, "float32"
        if delta.dtype == np.float16:
            if not delta.flags.c_contiguous:
                raise ShapeError(
                    f"delta: expected a C-contiguous array, found strides {delta.strides} "
                    "(pass np.ascontiguousarray(x))"
                )
            return delta.view(np.uint16), "float16"
        if delta.dtype == np.uint16:
            return delta, "bfloat16"
        raise DTypeError(
            f"delta: expected float32, float16 or uint16 (bfloat16 bits), found {delta.dtype}"
        )
    import torch

    if isinstance(delta, torch.Tensor):
        t = delta.detach().cpu()
        if not t.is_contiguous():
            raise ShapeError(
                f"delta: expected a contiguous tensor, found strides {tuple(t.stride())} "
                "(pass tensor.contiguous())"
            )
        if t.dtype == torch.float32:
            return t.numpy(), "float32"
        if t.dtype in (torch.float16, torch.bfloat16):
            name: FloatName = "float16" if t.dtype == torch.float16 else "bfloat16"
            return t.view(torch.int16).numpy().view(np.uint16), name
        raise DTypeError(f"delta: expected float32, float16 or bfloat16, found {t.dtype}")
    raise DTypeError(f"delta: expected a numpy array or torch tensor, found {type(delta).__name__}")


# The largest rows * cols a dense result may have: its float32 bytes must fit an isize.
MAX_ELEMENTS: int = sys.maxsize // 4


def _int(value: Any) -> int | None:
    """``value`` as an int if it is one (Python or numpy integer, not bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _shape2(shape: Any) -> tuple[int, int]:
    """``(rows, cols)``: two positive ints whose product a dense result can hold."""
    try:
        items = tuple(shape)
    except TypeError:
        items = None
    dims = None if items is None or len(items) != 2 else [_int(s) for s in items]
    if dims is None or None in dims:
        raise ShapeError(f"shape: expected (rows, cols), two ints, found {shape!r}")
    rows, cols = dims
    if rows <= 0 or cols <= 0:
        raise ShapeError(f"shape: expected positive (rows, cols), found {(rows, cols)}")
    if rows * cols > MAX_ELEMENTS:
        raise ShapeError(
            f"shape: expected rows * cols <= {MAX_ELEMENTS}, found {rows} * {cols} = {rows * cols}"
        )
    return rows, cols


def _bits(bits: Any, most: int, what: str) -> int:
    """``bits`` as an int in ``1..=most``."""
    n = _int(bits)
    if n is None:
        raise ShapeError(f"bits: expected an int in 1..={most}{what}, found {bits!r}")
    if not 1 <= n <= most:
        raise ShapeError(f"bits: expected 1..={most}{what}, found {n}")
    return n


def _result(arr: np.ndarray, dtype: FloatName) -> np.ndarray:
    return arr.view(np.float16) if dtype == "float16" else arr


def pack_signs(delta: Any) -> np.ndarray:
    """Pack the signs of a 2-D ``[out, in]`` delta into uint32 ``[out, ceil(in/32)]``.

    Bit ``j`` of word ``w`` is column ``32*w + j``; the bit is the IEEE sign bit
    (1 = negative, so ``-0.0`` packs as 1, ``+0.0`` as 0); tail padding is 0.
    NaN or Inf raises :class:`NonFiniteError` naming the position.
    """
    arr, dtype = _storage(delta)
    return _core.pack_signs(arr, dtype)


def unpack_signs(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Decode one packed plane to an int8 matrix of +1 / -1."""
    rows, cols = _shape2(shape)
    return _core.unpack_signs(packed, rows, cols)


def unpack_scaled(
    packed: np.ndarray,
    scales: Any,
    shape: tuple[int, int],
    dtype: FloatName = "float32",
) -> np.ndarray:
    """Dense ``alpha * sign`` matrix. ``scales``: one value (per matrix) or ``out`` values (per row)."""
    rows, cols = _shape2(shape)
    _check_dtype_name(dtype)
    s = _scales_array(scales)
    if s.size == 1:
        s = s.reshape(1)
    elif s.shape == (rows,):
        s = s.reshape(1, rows)
    else:
        raise ShapeError(
            f"scales: expected 1 value (per matrix) or {rows} (per row), found shape {s.shape}"
        )
    if not isinstance(packed, np.ndarray):
        raise DTypeError(f"packed: expected a uint32 numpy array, found {type(packed).__name__}")
    planes = packed.reshape((1, *packed.shape)) if packed.ndim == 2 else packed
    return _result(_core.unpack_planes(planes, s, rows, cols, dtype, None), dtype)


def _scales_array(scales: Any) -> np.ndarray:
    """Real scales (numbers, a numpy array or a torch tensor) as contiguous float32."""
    if hasattr(scales, "detach"):  # a torch tensor, maybe one that requires grad
        scales = scales.detach().cpu()
        if scales.is_floating_point() and scales.element_size() == 2:
            scales = scales.float()  # bfloat16 has no numpy dtype; fp16 widens exactly too
        scales = scales.numpy()
    try:
        arr = np.asarray(scales)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.dtype.kind not in "fiu":
        found = type(scales).__name__ if arr is None else f"{type(scales).__name__} of {arr.dtype}"
        raise DTypeError(f"scales: expected real numbers (float or int), found {found}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_scale_mode(scale: Any) -> None:
    """QDeltaError unless ``scale`` is ``"matrix"`` or ``"row"`` (as the core says it)."""
    if not isinstance(scale, str) or scale not in get_args(ScaleMode):
        raise QDeltaError(f'scale granularity: expected "matrix" or "row", found {scale!r}')


def pack_residual(
    delta: Any, bits: int = 1, scale: ScaleMode = "matrix"
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy residual binarisation into ``bits`` sign planes.

    Returns ``(planes [bits, out, words] uint32, scales [bits] or [bits, out] float32)``.
    """
    check_scale_mode(scale)
    n = _bits(bits, MAX_PLANES, "")
    arr, dtype = _storage(delta)
    return _core.pack_residual(arr, dtype, n, scale)


def unpack_residual(
    planes: np.ndarray,
    scales: np.ndarray,
    shape: tuple[int, int],
    dtype: FloatName = "float32",
    bits: int | None = None,
) -> np.ndarray:
    """Dense reconstruction from the first ``bits`` planes (all when None)."""
    rows, cols = _shape2(shape)
    _check_dtype_name(dtype)
    if bits is not None:
        stored = planes.shape[0] if isinstance(planes, np.ndarray) and planes.ndim == 3 else None
        if stored is None:
            bits = _bits(bits, MAX_PLANES, "")
        else:
            bits = _bits(bits, stored, " (the planes stored)")
    s = _scales_array(scales)
    return _result(_core.unpack_planes(planes, s, rows, cols, dtype, bits), dtype)


def _check_dtype_name(dtype: object) -> None:
    if not isinstance(dtype, str) or dtype not in get_args(FloatName):
        raise DTypeError(f"dtype: expected one of {list(get_args(FloatName))}, found {dtype!r}")


def as_torch(arr: np.ndarray, dtype: FloatName = "float32") -> Any:
    """Wrap a core result as a torch tensor without copying (uint16 bits -> bfloat16).

    ``dtype`` names what ``arr`` holds, as the core returned it: float32 and
    float16 arrays, or uint16 bits for bfloat16; anything else is a DTypeError.
    """
    import torch

    storage = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
    if dtype not in storage:
        raise DTypeError(f"dtype: expected one of {sorted(storage)}, found {dtype!r}")
    if not isinstance(arr, np.ndarray) or arr.dtype != storage[dtype]:
        found = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise DTypeError(
            f"as_torch({dtype}): expected a {np.dtype(storage[dtype]).name} array, found {found}"
        )
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
