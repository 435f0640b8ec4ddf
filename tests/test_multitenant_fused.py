"""The fused decode path of MultiTenantLinear (base matmul and deltas as one
Rust call, src/fused.rs, bound once per batch) against the float64 dense
reference, and every change that must stop a bound call from being reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.test_multitenant import assert_close, dense_reference, packed, seeded

import qdelta
from qdelta import _core, multitenant
from qdelta.kernels import cpu

AVX512 = cpu.ISA == "avx512"


def layer_with_tenants(n: int, k: int, gen: torch.Generator, bias: bool = True):
    base = torch.nn.Linear(k, n, bias=bias)
    module = qdelta.MultiTenantLinear(base)
    layers = {
        0: packed(n, k, 2, "row", gen),
        1: packed(n, k, 1, "matrix", gen),
        2: packed(n, k, 3, "row", gen),
    }
    for tid, layer in layers.items():
        module.add_tenant(tid, layer)
    return base, module, layers


def fused(module: qdelta.MultiTenantLinear) -> bool:
    return module._plan is not None


@pytest.mark.parametrize("n, k", [(1, 1), (16, 16), (37, 70), (64, 129), (130, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_decode_matches_the_dense_reference(n, k, bias):
    gen = seeded()
    base, module, layers = layer_with_tenants(n, k, gen, bias)
    ids = torch.tensor([2, -1, 0, 1, 2, 0, -1])
    with torch.no_grad():
        for _ in range(3):  # the second and third calls reuse the bound call
            x = torch.randn(7, 1, k, generator=gen)
            got = module(x, ids)
            want = dense_reference(base, layers, x, ids) if bias else None
            if not bias:
                base_b = torch.nn.Linear(k, n)
                base_b.weight.data = base.weight.data
                base_b.bias.data.zero_()
                want = dense_reference(base_b, layers, x, ids)
            assert got.shape == (7, 1, n) and got.dtype == torch.float32
            assert_close(got, want, torch.float32)
    assert fused(module) == AVX512


def test_bound_call_follows_every_change():
    gen = seeded()
    n, k = 45, 77
    base, module, layers = layer_with_tenants(n, k, gen)
    ids = torch.tensor([1, 0, -1, 2, 0])
    x = torch.randn(5, k, generator=gen)

    def check():
        with torch.no_grad():
            got = module(x, ids)
        assert_close(got, dense_reference(base, layers, x, ids), torch.float32)

    check()
    check()
    ids[2] = 1  # the ids tensor changed in place
    check()
    with torch.no_grad():
        base.weight.mul_(0.5)  # the base changed in place (seen through the views)
    check()
    base.weight.data = torch.randn(n, k, generator=gen)  # new storage
    check()
    base.bias = torch.nn.Parameter(torch.randn(n, generator=gen))  # a new parameter
    check()
    layers[1] = packed(n, k, 2, "row", gen)
    module.add_tenant(1, layers[1])  # replaced in the stack
    check()
    module.remove_tenant(2)
    with pytest.raises(qdelta.UnknownTenantError, match="names tenant id 2"):
        with torch.no_grad():
            module(x, torch.tensor([2, 0, -1, 1, 0]))
    del layers[2]
    ids[3] = 0
    check()


def test_not_fused_where_it_does_not_apply():
    gen = seeded()
    n, k = 40, 50
    base, module, layers = layer_with_tenants(n, k, gen)
    ids = torch.tensor([0, 1, 2])
    x = torch.randn(3, k, generator=gen)
    # Gradients on (the base parameters require them): torch does the work.
    got = module(x, ids)
    assert got.requires_grad and not fused(module)
    assert_close(got.detach(), dense_reference(base, layers, x, ids), torch.float32)
    with torch.no_grad():
        # Only base rows: the plain base layer.
        module(x, torch.tensor([-1, -1, -1]))
        assert not fused(module)
        # More rows than the decode limit.
        many = torch.randn(multitenant.FUSED_MAX_ROWS + 1, k, generator=gen)
        many_ids = torch.zeros(many.shape[0], dtype=torch.long)
        assert_close(module(many, many_ids), dense_reference(base, layers, many, many_ids),
                     torch.float32)  # fmt: skip
        assert not fused(module)
        # Half precision input.
        module.half()
        got = module(x.half(), ids)
        assert got.dtype == torch.float16 and not fused(module)


@pytest.mark.skipif(not AVX512, reason="the fused call is taken on AVX-512 CPUs only")
def test_move_and_cast_drop_the_bound_call():
    gen = seeded()
    base, module, layers = layer_with_tenants(30, 40, gen)
    ids = torch.tensor([0, 2])
    x = torch.randn(2, 40, generator=gen)
    with torch.no_grad():
        module(x, ids)
        assert fused(module)
        module.double()
        assert not fused(module)
        got = module(x.double(), ids)
    assert got.dtype == torch.float64
    assert_close(got, dense_reference(base, layers, x, ids), torch.float32)


def test_core_refuses_bad_arguments():
    n, k = 8, 40
    planes = np.zeros((2, 1, n, 2), dtype=np.uint32)
    scales = np.ones((2, 1), dtype=np.float32)
    x = np.zeros((3, k), dtype=np.float32)
    w = np.zeros((n, k), dtype=np.float32)
    ids = np.array([0, 1, -1], dtype=np.int64)
    out = np.zeros((3, n), dtype=np.float32)
    _core.fused_linear(x, w, None, planes, scales, ids, out)
    with pytest.raises(qdelta.ShapeError, match=r"weight: expected \[out, 40\]"):
        _core.fused_linear(x, w[:, :39].copy(), None, planes, scales, ids, out)
    with pytest.raises(qdelta.DTypeError, match="weight"):
        _core.fused_linear(x, w.astype(np.float64), None, planes, scales, ids, out)
    with pytest.raises(qdelta.ShapeError, match="bias of weight: expected 8"):
        _core.fused_linear(x, w, np.zeros(7, np.float32), planes, scales, ids, out)
    with pytest.raises(
        qdelta.ShapeError, match=r"out: expected \[\.\.\., 8\] with 3 rows in all, found \[2, 8\]"
    ):
        _core.fused_linear(x, w, None, planes, scales, ids, out[:2].copy())
    with pytest.raises(qdelta.ShapeError, match="planes need 2 u32 words"):
        _core.fused_linear(x, w, None, planes[..., :1].copy(), scales, ids, out)
    with pytest.raises(qdelta.QDeltaError, match="tenant_ids"):
        _core.fused_linear(x, w, None, planes, scales, np.array([0, 2, -1]), out)
    with pytest.raises(qdelta.QDeltaError, match="contiguous"):
        _core.fused_linear(x[:, ::2], w[:, :20].copy(), None, planes[..., :1].copy(), scales,
                           ids, out)  # fmt: skip
