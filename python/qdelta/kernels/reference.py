"""Torch reference kernels: dense unpack + matmul in float32 (float64 for
float64 inputs). The oracle."""

from __future__ import annotations

import torch

from qdelta import reference
from qdelta.errors import DTypeError, NonFiniteError, QDeltaError, ShapeError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dense_delta(
    planes: torch.Tensor,
    scales: torch.Tensor,
    cols: int,
    bits: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """``[P, N, W]`` planes -> ``[N, cols]`` of ``dtype`` (float32 unless asked)."""
    return reference.unpack_planes(planes, scales, cols, bits=bits, dtype=dtype)


def delta_matmul(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, *, bits: int | None = None
) -> torch.Tensor:
    """One tenant's ``planes [P, N, W]`` and ``scales [P]`` / ``[P, N]``, checked as
    the Rust kernel checks them."""
    if not isinstance(planes, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise DTypeError(
            f"planes, scales: expected torch tensors, found {type(planes).__name__}, "
            f"{type(scales).__name__}"
        )
    if planes.dim() != 3:
        raise ShapeError(f"planes: expected [P, N, W], found {list(planes.shape)}")
    _check_stack(x, planes[None], scales[None])
    _check_finite(scales[None], [0])
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    dense = dense_delta(planes, scales, x.shape[-1], bits, dtype=ct).to(x.device)
    return (x.to(ct) @ dense.T).to(x.dtype)


def multi_tenant_delta_matmul(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, tenant_ids: torch.Tensor
) -> torch.Tensor:
    """``x`` ``[..., K]``, one tenant id per row of ``x.reshape(-1, K)``; ``[..., N]``
    out. Checked as the Rust kernel checks (the same inputs fail the same way)."""
    if x.dim() < 1 or x.shape[-1] == 0 or planes.dim() != 4:
        raise ShapeError(
            f"expected x [..., K] and planes [T, P, N, W], found x {list(x.shape)} "
            f"and planes {list(planes.shape)}"
        )
    _check_stack(x, planes, scales)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    ids = _checked_ids(tenant_ids, x2.shape[0], planes.shape[0])
    used = [t for t in torch.unique(ids).tolist() if t >= 0]
    _check_finite(scales, used)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x2.shape[0], planes.shape[2], dtype=ct, device=x.device)
    for t in used:
        rows = ids == t
        dense = dense_delta(planes[t], scales[t], k, dtype=ct)
        out[rows] = x2[rows].to(ct) @ dense.T
    return out.to(x.dtype).reshape(*lead, planes.shape[2])


def _check_stack(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor) -> None:
    """x, ``planes [T, P, N, W]`` and ``scales [T, P]`` / ``[T, P, N]`` as the Rust
    kernel takes them (the same call fails the same way whichever backend runs it;
    :func:`_check_finite` checks the values)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        found = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DTypeError(
            f"x: expected a float16, bfloat16, float32 or float64 tensor, found {found}"
        )
    if x.dim() < 1:
        raise ShapeError(f"x: expected [..., K], found {list(x.shape)}")
    if planes.dtype not in (torch.int32, torch.uint32):
        raise DTypeError(f"planes: expected int32 (the uint32 bits), found {planes.dtype}")
    tenants, n_planes, n, w = planes.shape
    check_stack_sizes(planes, x.shape[-1])
    if w != -(-x.shape[-1] // 32):
        raise ShapeError(
            f"planes: x has {x.shape[-1]} input features, so planes need "
            f"{-(-x.shape[-1] // 32)} u32 words per row, found shape {list(planes.shape)}"
        )
    if not scales.is_floating_point():
        raise DTypeError(f"scales: expected a float tensor, found {scales.dtype}")
    if tuple(scales.shape) not in ((tenants, n_planes), (tenants, n_planes, n)):
        raise ShapeError(
            f"scales: expected [{tenants}, {n_planes}] (per matrix) or [{tenants}, "
            f"{n_planes}, {n}] (per row) for planes {list(planes.shape)}, found "
            f"{list(scales.shape)}"
        )


def check_stack_sizes(planes: torch.Tensor, k: int) -> None:
    """``[T, P, N, W]`` planes with T, P and N > 0 (the message the Rust kernel gives)."""
    tenants, n_planes, n, _ = planes.shape
    if not (tenants and n_planes and n):
        raise ShapeError(
            f"delta planes: expected [tenants, planes, out, words] with every size > 0, found "
            f"tenants={tenants}, planes={n_planes}, out={n}, in={k}"
        )


def _check_finite(scales: torch.Tensor, tenants: list[int]) -> None:
    """The scales of the tenants a call uses are finite (as the Rust kernel checks:
    a stack's unused tenants are not read). Not for CUDA tensors: the check would
    be a device sync every call (the CUDA kernels' own check shares the ids' sync)."""
    if scales.is_cuda:
        return
    used = scales.detach()[tenants]
    if bool(torch.isfinite(used).all()):
        return
    bad = (~torch.isfinite(used)).nonzero()
    if bad.numel():
        where = bad[0].tolist()
        where[0] = tenants[where[0]]
        value = float(scales[tuple(where)])
        shown = "NaN" if value != value else f"{value}"  # spelled as the Rust kernel does
        index = f", index {where[2]}" if len(where) == 3 else ""
        raise NonFiniteError(
            f"delta scales: expected finite values, found {shown} for tenant {where[0]}, "
            f"plane {where[1]}{index}"
        )


def _checked_ids(tenant_ids: object, rows: int, tenants: int) -> torch.Tensor:
    if not isinstance(tenant_ids, torch.Tensor):
        raise DTypeError(
            f"tenant_ids: expected an integer tensor (int64), found {type(tenant_ids).__name__}"
        )
    if tenant_ids.is_floating_point() or tenant_ids.is_complex() or tenant_ids.dtype == torch.bool:
        raise DTypeError(
            f"tenant_ids: expected an integer tensor (int64), found {tenant_ids.dtype}"
        )
    ids = tenant_ids.reshape(-1).to(torch.int64)  # uint8: -1 < 0 must not wrap to 255
    if tenant_ids.dim() != 1:
        raise ShapeError(
            f"tenant_ids: expected a 1-D tensor, one id per row of x ({rows}), found shape "
            f"{list(tenant_ids.shape)}"
        )
    if ids.numel() != rows:
        raise ShapeError(f"tenant_ids: expected one id per row of x ({rows}), found {ids.numel()}")
    bad = ((ids < -1) | (ids >= tenants)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise QDeltaError(
            f"tenant_ids: expected values in [-1, {tenants}) ({tenants} tenant(s) stacked, "
            f"-1 = no delta), found {int(ids[row])} at row {row}"
        )
    return ids
