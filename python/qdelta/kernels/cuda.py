"""CUDA backend: cuda/delta_matmul.cu compiled at run time by cupy.RawModule.

Torch tensors are passed by pointer (no copies) and every kernel runs on
torch's current stream. Set ``QDELTA_CUDA_SYNC=1`` to synchronize after each
launch, so an asynchronous fault is reported at the launch that caused it.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Literal

import torch

from qdelta.errors import DTypeError, QDeltaError, ShapeError

CUDA_DIR = Path(__file__).resolve().parents[3] / "cuda"
SOURCE = CUDA_DIR / "delta_matmul.cu"

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
SPLITS = {0: 1, 1: 1, 2: 3}  # fp32 runs as three exact bf16 parts
# (FT, NT, WF, WM, KS): warp tile 16*FT features x 8*NT rows; WF x WM warp tiles; KS-way split K.
TILES = {"decode": (2, 1, 1, 1, 8), "prefill": (2, 4, 2, 2, 1)}
DECODE_MAX_ROWS = 64
PREP_THREADS = 256

Path_ = Literal["auto", "decode", "prefill"]


class KernelLaunchError(QDeltaError):
    """A CUDA kernel could not be compiled, launched or failed while running."""


def name_expressions() -> list[str]:
    """Every template instantiation this module launches (the .cu file lists the same)."""
    names = [f"qd_prep_x<{dt}>" for dt in DTYPE_CODES.values()]
    for tile in TILES.values():
        names += [f"qd_delta_mm<{dt}, {', '.join(map(str, tile))}>" for dt in DTYPE_CODES.values()]
    return names


def declared_instantiations(source: str) -> list[str]:
    """The ``// qdelta-instantiate: name<...>`` lines of a .cu file."""
    return [m.strip() for m in re.findall(r"//\s*qdelta-instantiate:\s*(.+)", source)]


@functools.cache
def _cupy():
    import cupy

    return cupy


def available() -> bool:
    """True when torch sees a CUDA device and cupy imports."""
    if not torch.cuda.is_available():
        return False
    try:
        _cupy()
    except Exception:
        return False
    return True


@functools.cache
def _module(device_index: int, options: tuple[str, ...]):
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        try:
            module = cupy.RawModule(
                code=SOURCE.read_text(), options=options, name_expressions=name_expressions()
            )
            module.compile()
        except Exception as exc:
            raise KernelLaunchError(f"compiling {SOURCE.name} failed: {exc}") from exc
    return module


def _kernel(device: torch.device, name: str):
    index = device.index if device.index is not None else torch.cuda.current_device()
    module = _module(index, ("-std=c++17",))
    try:
        return module.get_function(name)
    except Exception as exc:
        raise KernelLaunchError(f"kernel {name} not found in {SOURCE.name}: {exc}") from exc


def _launch(device: torch.device, name: str, grid, block, args) -> None:
    cupy = _cupy()
    kernel = _kernel(device, name)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
    try:
        with cupy.cuda.Device(device.index), stream:
            kernel(grid, block, args)
        if os.environ.get("QDELTA_CUDA_SYNC") == "1":
            torch.cuda.synchronize(device)
    except Exception as exc:
        raise KernelLaunchError(
            f"{name} grid={grid} block={block}: expected a clean launch, found {exc}"
        ) from exc


def _ptr(t: torch.Tensor | None):
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def _check_cuda(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    if t.device != device:
        raise DTypeError(f"{name}: expected a tensor on {device} (like x), found {t.device}")


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ShapeError(f"{name}: expected {dtype} {list(shape)}, found {t.dtype} {list(t.shape)}")
    if shape[0] and shape[1] and t.stride(1) != 1:
        raise ShapeError(f"{name}: expected unit stride along the last axis, found {t.stride()}")


def multi_tenant_delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    tenant_ids: torch.Tensor | None,
    *,
    bits: int | None = None,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    check_ids: bool = True,
    path: Path_ = "auto",
) -> torch.Tensor:
    """``y[m] = base[m] + sum_p alpha[t_m, p] * x[m] @ S[t_m, p]^T`` on the GPU.

    ``planes`` int32 ``[T, P, N, W]``, ``scales`` float32 ``[T, P]`` or ``[T, P, N]``,
    ``tenant_ids`` int64 ``[M]`` (``-1`` = no delta; ``None`` = every row tenant 0).
    ``base`` (optional, ``[M, N]``, x's dtype) is added in fp32 before the cast;
    ``out`` may be ``base`` itself (in-place ``y += delta``). With ``check_ids=False``
    the ids are not read back to the host (no sync); an out-of-range id then
    turns its output row into NaN instead of raising.
    """
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise DTypeError("x: expected a CUDA torch.Tensor")
    device = x.device
    if x.dtype not in DTYPE_CODES:
        raise DTypeError(f"x: expected float16, bfloat16 or float32, found {x.dtype}")
    if x.dim() != 2:
        raise ShapeError(f"x: expected [M, K], found {list(x.shape)}")
    m_rows, k = x.shape
    for name, t in (("planes", planes), ("scales", scales)):
        _check_cuda(name, t, device)
    if planes.dtype != torch.int32 or planes.dim() != 4:
        raise DTypeError(
            f"planes: expected int32 [T, P, N, W], found {planes.dtype} {list(planes.shape)}"
        )
    tenants, n_planes, n, w = planes.shape
    if w != -(-k // 32):
        raise ShapeError(f"planes: expected W = ceil(K/32) = {-(-k // 32)} words, found {w}")
    if not planes.is_contiguous():
        raise ShapeError("planes: expected a contiguous tensor")
    row_scales = scales.dim() == 3
    if scales.dtype != torch.float32 or tuple(scales.shape) not in (
        (tenants, n_planes),
        (tenants, n_planes, n),
    ):
        raise ShapeError(
            f"scales: expected float32 [{tenants}, {n_planes}] or [{tenants}, {n_planes}, {n}], "
            f"found {scales.dtype} {list(scales.shape)}"
        )
    scales = scales.contiguous()
    use = n_planes if bits is None else bits
    if not 0 <= use <= n_planes:
        raise ShapeError(f"bits: expected 0..{n_planes}, found {bits}")
    if tenant_ids is not None:
        _check_cuda("tenant_ids", tenant_ids, device)
        if tenant_ids.dtype != torch.int64 or tuple(tenant_ids.shape) != (m_rows,):
            raise ShapeError(
                f"tenant_ids: expected int64 [{m_rows}], found {tenant_ids.dtype} "
                f"{list(tenant_ids.shape)}"
            )
        tenant_ids = tenant_ids.contiguous()
        if check_ids and m_rows:
            bad = (tenant_ids < -1) | (tenant_ids >= tenants)
            if bool(bad.any()):
                first = int(bad.nonzero()[0, 0])
                raise ShapeError(
                    f"tenant_ids: expected -1..{tenants - 1}, found {int(tenant_ids[first])} "
                    f"at row {first}"
                )
    if base is not None:
        _check_cuda("base", base, device)
        _check_rows("base", base, (m_rows, n), x.dtype)
    if out is None:
        out = torch.empty(m_rows, n, dtype=x.dtype, device=device)
    else:
        _check_cuda("out", out, device)
        _check_rows("out", out, (m_rows, n), x.dtype)
    if m_rows == 0 or n == 0:
        return out
    if k == 0 or use == 0 or tenants == 0:
        if base is None:
            out.zero_()
        elif out.data_ptr() != base.data_ptr():
            out.copy_(base)
        return out
    if x.stride(1) != 1:
        raise ShapeError(f"x: expected unit stride along K, found strides {x.stride()}")

    import numpy as np

    dt = DTYPE_CODES[x.dtype]
    xp = torch.empty(SPLITS[dt] * m_rows * w * 16, dtype=torch.int32, device=device)
    total = m_rows * w * 16
    prep_blocks = min(-(-total // PREP_THREADS), 65535)
    _launch(
        device,
        f"qd_prep_x<{dt}>",
        (prep_blocks,),
        (PREP_THREADS,),
        (_ptr(x), np.int64(x.stride(0)), np.int32(m_rows), np.int32(k), np.int32(w), _ptr(xp)),
    )
    if path == "auto":
        path = "decode" if m_rows <= DECODE_MAX_ROWS else "prefill"
    if path not in TILES:
        raise ShapeError(f"path: expected 'auto', 'decode' or 'prefill', found {path!r}")
    ft, nt, wf, wm, ks = TILES[path]
    grid = (-(-m_rows // (8 * nt * wm)), -(-n // (16 * ft * wf)))
    if grid[1] > 65535:
        raise ShapeError(f"N = {n} output features is more than this kernel's grid supports")
    vec_ok = w % 4 == 0 and planes.data_ptr() % 16 == 0
    _launch(
        device,
        f"qd_delta_mm<{dt}, {ft}, {nt}, {wf}, {wm}, {ks}>",
        grid,
        (32 * wf * wm * ks,),
        (
            _ptr(xp),
            _ptr(planes),
            _ptr(scales),
            _ptr(tenant_ids),
            _ptr(base),
            np.int64(base.stride(0) if base is not None else 0),
            _ptr(out),
            np.int64(out.stride(0)),
            np.int32(m_rows),
            np.int32(n),
            np.int32(w),
            np.int32(tenants),
            np.int32(n_planes),
            np.int32(use),
            np.int32(1 if row_scales else 0),
            np.int32(1 if vec_ok else 0),
        ),
    )
    return out


def delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int | None = None,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    path: Path_ = "auto",
) -> torch.Tensor:
    """One tenant: ``planes [P, N, W]``, ``scales [P]`` or ``[P, N]``; see the multi-tenant form."""
    if not isinstance(planes, torch.Tensor) or planes.dim() != 3:
        raise ShapeError("planes: expected a [P, N, W] tensor")
    if not isinstance(scales, torch.Tensor) or scales.dim() not in (1, 2):
        raise ShapeError("scales: expected a [P] or [P, N] tensor")
    return multi_tenant_delta_matmul(
        x, planes[None], scales[None], None, bits=bits, base=base, out=out, path=path
    )
