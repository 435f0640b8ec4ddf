"""Torch reference kernels: dense unpack + matmul in float32 (float64 for
float64 inputs). The oracle."""

from __future__ import annotations

import torch

from qdelta import reference
from qdelta.errors import DTypeError, QDeltaError, ShapeError


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
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    ids = _checked_ids(tenant_ids, x2.shape[0], planes.shape[0])
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x2.shape[0], planes.shape[2], dtype=ct, device=x.device)
    for t in torch.unique(ids).tolist():
        if t < 0:
            continue
        rows = ids == t
        dense = dense_delta(planes[t], scales[t], k, dtype=ct)
        out[rows] = x2[rows].to(ct) @ dense.T
    return out.to(x.dtype).reshape(*lead, planes.shape[2])


def _checked_ids(tenant_ids: object, rows: int, tenants: int) -> torch.Tensor:
    if not isinstance(tenant_ids, torch.Tensor):
        raise DTypeError(
            f"tenant_ids: expected an integer tensor (int64), found {type(tenant_ids).__name__}"
        )
    if tenant_ids.is_floating_point() or tenant_ids.is_complex() or tenant_ids.dtype == torch.bool:
        raise DTypeError(
            f"tenant_ids: expected an integer tensor (int64), found {tenant_ids.dtype}"
        )
    ids = tenant_ids.reshape(-1)
    if tenant_ids.dim() != 1 or ids.numel() != rows:
        raise ShapeError(f"tenant_ids: expected one id per row of x ({rows}), found {ids.numel()}")
    bad = ((ids < -1) | (ids >= tenants)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise QDeltaError(
            f"tenant_ids: expected values in [-1, {tenants}) ({tenants} tenant(s) stacked, "
            f"-1 = no delta), found {int(ids[row])} at row {row}"
        )
    return ids
