"""The Rust CPU delta matmul (qdelta.kernels.cpu) against a float64 oracle
built from the torch reference unpacking, and the dispatch rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qdelta
from qdelta import kernels, reference
from qdelta.kernels import cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance of the result, dominated by rounding the output to the dtype.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_stack(tenants: int, bits: int, n: int, k: int, scale: str, gen: torch.Generator):
    planes, scales = [], []
    for _ in range(tenants):
        delta = torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))
        p, s = reference.pack_residual(delta, bits, scale)
        planes.append(p)
        scales.append(s)
    return torch.stack(planes), torch.stack(scales)


def oracle(x, planes, scales, ids, bits=None):
    """float64 ``x[m] @ dense(t_m)^T`` from the torch reference unpacking."""
    k = x.shape[-1]
    y = torch.zeros(x.shape[0], planes.shape[2], dtype=torch.float64)
    for m, t in enumerate(ids.tolist()):
        if t >= 0:
            dense = reference.unpack_planes(planes[t], scales[t], k, bits, torch.float64)
            y[m] = x[m].to(torch.float64) @ dense.T
    return y


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.abs().max().item() + 1e-12
    err = (got.to(torch.float64) - want).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(5, 31), (37, 100), (70, 257), (64, 64)])
@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_multi_tenant_matches_oracle(dtype, n, k, bits, scale):
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    planes, scales = make_stack(3, bits, n, k, scale, gen)
    x = torch.randn(9, k, generator=gen).to(dtype)
    # Rows of one tenant scattered, base-only rows among them.
    ids = torch.tensor([2, -1, 0, 2, 1, 0, -1, 2, 1])
    got = cpu.multi_tenant_delta_matmul(x, planes, scales, ids)
    assert got.dtype == dtype and got.shape == (9, n)
    assert_close(got, oracle(x, planes, scales, ids), dtype)
    assert (got[ids == -1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_tenant_leading_dims_and_bits(dtype):
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    planes, scales = make_stack(1, 3, 23, 75, "row", gen)
    x = torch.randn(2, 3, 75, generator=gen).to(dtype)
    for bits in (1, 2, None):
        got = kernels.delta_matmul(x, planes[0], scales[0], bits=bits, backend="cpu")
        assert got.shape == (2, 3, 23) and got.dtype == dtype
        want = oracle(x.reshape(6, 75), planes, scales, torch.zeros(6, dtype=torch.int64), bits)
        assert_close(got.reshape(6, 23), want, dtype)


def test_cpu_matches_reference_backend():
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    planes, scales = make_stack(4, 2, 33, 90, "row", gen)
    x = torch.randn(6, 90, generator=gen)
    ids = torch.tensor([3, 0, -1, 3, 1, 2])
    got = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="cpu")
    want = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_out_accumulates_in_float32():
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    planes, scales = make_stack(2, 1, 16, 40, "matrix", gen)
    x = torch.randn(3, 40, generator=gen).to(torch.bfloat16)
    ids = torch.tensor([1, -1, 0])
    start = torch.randn(3, 16, generator=gen)
    out = start.clone()
    got = cpu.multi_tenant_delta_matmul(x, planes, scales, ids, out=out)
    assert got is out
    want = oracle(x, planes, scales, ids) + start.to(torch.float64)
    assert_close(out, want, torch.float32)
    assert torch.equal(out[1], start[1])


def test_planes_go_to_the_core_without_a_copy():
    planes = torch.randint(-(2**31), 2**31 - 1, (2, 1, 4, 3), dtype=torch.int32)
    arr = cpu._planes_array(planes)
    assert arr.dtype == np.uint32 and arr.ctypes.data == planes.data_ptr()
    x = torch.randn(2, 5).to(torch.bfloat16)
    xa, name = cpu._x_array(x)
    assert name == "bfloat16" and xa.ctypes.data == x.data_ptr()


def test_zero_scale_planes_add_nothing():
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    planes, scales = make_stack(2, 2, 12, 50, "row", gen)
    scales[1, 1] = 0.0  # tenant 1 really has one plane (padding, as MultiTenantLinear stores it)
    x = torch.randn(4, 50, generator=gen)
    ids = torch.tensor([1, 0, 1, -1])
    got = cpu.multi_tenant_delta_matmul(x, planes, scales, ids)
    assert_close(got, oracle(x, planes, scales, ids), torch.float32)


def test_auto_dispatch_rule():
    scales = torch.ones(1)
    # Few rows of a small delta, or up to N*K/2048 rows of a large one: the Rust kernel.
    assert kernels.cpu_max_rows(128, 128) == kernels.CPU_MIN_ROWS
    assert kernels.cpu_max_rows(2048, 2048) == 2048 * 2048 // kernels.CPU_WEIGHTS_PER_ROW
    small = torch.randn(kernels.CPU_MIN_ROWS, 3)
    assert kernels._use_cpu(small, scales, "auto", 5)
    assert not kernels._use_cpu(torch.randn(kernels.CPU_MIN_ROWS + 1, 3), scales, "auto", 5)
    limit = kernels.cpu_max_rows(2048, 2048)
    assert kernels._use_cpu(torch.randn(limit, 2048), scales, "auto", 2048)
    assert not kernels._use_cpu(torch.randn(limit + 1, 2048), scales, "auto", 2048)
    assert not kernels._use_cpu(small.double(), scales, "auto", 5)
    assert not kernels._use_cpu(small.requires_grad_(), scales, "auto", 5)
    assert not kernels._use_cpu(torch.randn(2, 3), scales.requires_grad_(), "auto", 5)
    assert kernels._use_cpu(torch.randn(2, 3), scales, "cpu", 5)


def test_bad_input_is_a_clear_error():
    gen = torch.Generator().manual_seed(1)
    planes, scales = make_stack(2, 1, 8, 40, "matrix", gen)
    x = torch.randn(3, 40)
    ok_ids = torch.tensor([0, 1, -1])
    mt = cpu.multi_tenant_delta_matmul
    with pytest.raises(qdelta.QDeltaError, match=r"found 2 at row 1"):
        mt(x, planes, scales, torch.tensor([0, 2, -1]))
    with pytest.raises(qdelta.ShapeError, match=r"one id per row of x \(3\), found 2"):
        mt(x, planes, scales, torch.tensor([0, 1]))
    with pytest.raises(qdelta.DTypeError, match="tenant_ids: expected an integer tensor"):
        mt(x, planes, scales, torch.tensor([0.0, 1.0, -1.0]))
    with pytest.raises(qdelta.ShapeError, match="need 3 u32 words per row"):
        mt(torch.randn(3, 70), planes, scales, ok_ids)
    # A strided view of the planes is taken (copied), as the reference takes it.
    strided = planes.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(mt(x, strided, scales, ok_ids), mt(x, planes, scales, ok_ids))
    with pytest.raises(qdelta.ShapeError, match="scales: expected"):
        mt(x, planes, scales[:, :, None].expand(2, 1, 3).contiguous(), ok_ids)
    with pytest.raises(qdelta.DTypeError, match="x: expected float32"):
        mt(x.double(), planes, scales, ok_ids)
    with pytest.raises(qdelta.DTypeError, match="planes: expected int32"):
        mt(x, planes.to(torch.int64), scales, ok_ids)
    with pytest.raises(qdelta.NonFiniteError, match="tenant 1, plane 0"):
        mt(x, planes, torch.tensor([[0.5], [float("nan")]]), ok_ids)
    with pytest.raises(qdelta.QDeltaError, match=r"bits: expected 1..=1"):
        kernels.delta_matmul(x, planes[0], scales[0], bits=2, backend="cpu")
