"""Delta GEMV: the Rust CPU kernel vs torch.nn.functional.linear on the dense
float32 delta (torch as this environment configures it: its threads, its
BLAS, OPENBLAS_CORETYPE if set), side by side in one run.

Run with `make bench` (or `pytest benches/bench_gemv.py --benchmark-only`);
`benches/report_gemv.py` turns the JSON into the README table.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qdelta import reference
from qdelta.kernels import cpu

N = K = 4096
TENANTS = 8


def _info(benchmark, group: str) -> None:
    benchmark.group = group
    benchmark.extra_info.update(
        torch_threads=torch.get_num_threads(),
        openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", ""),
        isa=cpu.ISA,
    )


@pytest.fixture(scope="module")
def stack() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """TENANTS one-plane deltas: planes [T, 1, N, W], scales [T, 1], dense float32 [N, K] each."""
    gen = torch.Generator().manual_seed(0)
    planes, scales, dense = [], [], []
    for _ in range(TENANTS):
        delta = torch.randn(N, K, generator=gen) * 1e-3
        p, s = reference.pack_residual(delta, 1, "matrix")
        planes.append(p)
        scales.append(s)
        dense.append(reference.unpack_planes(p, s, K))
    return torch.stack(planes), torch.stack(scales), dense


@pytest.mark.parametrize("batch", [1, 8])
def test_gemv_qdelta(benchmark, stack, batch):
    planes, scales, _ = stack
    _info(benchmark, f"gemv-{N}x{K}-1plane-batch{batch}")
    x = torch.randn(batch, K)
    benchmark(cpu.delta_matmul, x, planes[0], scales[0])


@pytest.mark.parametrize("batch", [1, 8])
def test_gemv_torch(benchmark, stack, batch):
    _, _, dense = stack
    _info(benchmark, f"gemv-{N}x{K}-1plane-batch{batch}")
    x = torch.randn(batch, K)
    benchmark(F.linear, x, dense[0])


def test_multitenant_qdelta(benchmark, stack):
    planes, scales, _ = stack
    _info(benchmark, f"multitenant-{TENANTS}tenants-1row-each-{N}x{K}")
    x = torch.randn(TENANTS, K)
    ids = torch.arange(TENANTS)
    benchmark(cpu.multi_tenant_delta_matmul, x, planes, scales, ids)


def test_multitenant_torch(benchmark, stack):
    _, _, dense = stack
    _info(benchmark, f"multitenant-{TENANTS}tenants-1row-each-{N}x{K}")
    x = torch.randn(TENANTS, K)

    def dense_one_after_another():
        return [F.linear(x[t : t + 1], dense[t]) for t in range(TENANTS)]

    benchmark(dense_one_after_another)


SMALL = 512  # decode at the runtime benchmark's model size: per-call cost dominates


@pytest.fixture(scope="module")
def small_stack() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    planes, scales, dense = [], [], []
    for _ in range(TENANTS):
        delta = torch.randn(SMALL, SMALL, generator=gen) * 1e-3
        p, s = reference.pack_residual(delta, 1, "matrix")
        planes.append(p)
        scales.append(s)
        dense.append(reference.unpack_planes(p, s, SMALL))
    return torch.stack(planes), torch.stack(scales), dense


def test_multitenant_small_qdelta(benchmark, small_stack):
    planes, scales, _ = small_stack
    _info(benchmark, f"multitenant-{TENANTS}tenants-1row-each-{SMALL}x{SMALL}")
    x = torch.randn(TENANTS, SMALL)
    ids = torch.arange(TENANTS)
    benchmark(cpu.multi_tenant_delta_matmul, x, planes, scales, ids)


def test_multitenant_small_torch(benchmark, small_stack):
    _, _, dense = small_stack
    _info(benchmark, f"multitenant-{TENANTS}tenants-1row-each-{SMALL}x{SMALL}")
    x = torch.randn(TENANTS, SMALL)

    def dense_one_after_another():
        return [F.linear(x[t : t + 1], dense[t]) for t in range(TENANTS)]

    benchmark(dense_one_after_another)
