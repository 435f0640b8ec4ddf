"""One dispatch point for the delta matmul kernels.

Tensor conventions shared by every backend:
- ``planes``: int32 ``[P, N, W]`` (one tenant) or ``[T, P, N, W]`` (tenants),
  ``W = ceil(K / 32)``, the project's bit layout (docs/FORMAT.md);
- ``scales``: float32 ``[P]`` / ``[P, N]`` (one tenant) or ``[T, P]`` / ``[T, P, N]``;
- ``x``: ``[M, K]`` in float32, float16 or bfloat16; the result ``[M, N]`` has x's dtype;
- ``tenant_ids``: int64 ``[M]``, ``-1`` = no delta for that row.

Backends: ``reference`` (torch, the oracle), ``cpu`` (Rust) and ``cuda``
(cupy) as they land; ``auto`` picks the fastest available for the device.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch

from qdelta.errors import QDeltaError
from qdelta.kernels import cpu, reference

Backend = Literal["auto", "reference", "cpu", "cuda"]

#: "auto" runs the Rust kernel on CPU inputs of at most this many rows. Above
#: about 3000 rows the reference's dense unpack + BLAS matmul catches up
#: (measured crossover, docs/CPU_KERNEL.md); inputs that need gradients stay
#: on the (differentiable) reference.
CPU_MAX_ROWS = 2048


def _use_cpu(x: torch.Tensor, scales: torch.Tensor, backend: str) -> bool:
    if backend not in get_args(Backend):
        raise QDeltaError(f"backend: expected one of {get_args(Backend)}, found {backend!r}")
    if backend != "auto":
        return backend == "cpu"
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scales.requires_grad)
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not needs_grad
        and rows <= CPU_MAX_ROWS
    )


def delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``y = sum_p alpha_p * x @ S_p^T`` for one tenant's delta."""
    if _use_cuda(backend, x):
        from qdelta.kernels import cuda

        return cuda.delta_matmul(x, planes, scales, bits=bits)
    if _use_cpu(x, scales, backend):
        return cpu.delta_matmul(x, planes, scales, bits=bits)
    return reference.delta_matmul(x, planes, scales, bits=bits)


def multi_tenant_delta_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    scales: torch.Tensor,
    tenant_ids: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-row tenant delta: ``y[m] = sum_p alpha[t_m, p] * x[m] @ S[t_m, p]^T``."""
    if _use_cuda(backend, x):
        from qdelta.kernels import cuda

        return cuda.multi_tenant_delta_matmul(x, planes, scales, tenant_ids)
    if _use_cpu(x, scales, backend):
        return cpu.multi_tenant_delta_matmul(x, planes, scales, tenant_ids)
    return reference.multi_tenant_delta_matmul(x, planes, scales, tenant_ids)


_warned_no_cupy = False


def _use_cuda(backend: str, x: torch.Tensor) -> bool:
    """``cuda``: required; ``auto``: for CUDA tensors when cupy imports, else warn once."""
    global _warned_no_cupy
    if backend == "cuda" or (backend == "auto" and x.is_cuda):
        from qdelta.kernels import cuda

        if cuda.available():
            return True
        if backend == "cuda":
            raise QDeltaError("backend 'cuda': expected a CUDA device and cupy, found none")
        if not _warned_no_cupy:
            _warned_no_cupy = True
            warnings.warn(
                "qdelta: cupy is not importable; CUDA tensors use the torch reference kernels",
                RuntimeWarning,
                stacklevel=3,
            )
    return False
