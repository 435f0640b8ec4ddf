"""Torch reference kernels: dense unpack + matmul in float32 (float64 for
float64 inputs). The oracle."""

from __future__ import annotations

import torch

from qdelta import reference


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
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape[0], planes.shape[2], dtype=ct, device=x.device)
    for t in torch.unique(tenant_ids).tolist():
        if t < 0:
            continue
        rows = tenant_ids == t
        dense = dense_delta(planes[t], scales[t], x.shape[-1], dtype=ct)
        out[rows] = x[rows].to(ct) @ dense.T
    return out.to(x.dtype)
