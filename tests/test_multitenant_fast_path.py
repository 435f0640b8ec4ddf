"""The per-call shortcuts of MultiTenantLinear (row slots remembered for the
last ids tensor, the stack converted once, the delta added into the base
output) against the float64 dense reference, including after every change
that must invalidate them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.test_multitenant import assert_close, dense_reference, packed, seeded

import qdelta
from qdelta.kernels import cpu, reference


def test_same_ids_tensor_follows_every_change():
    gen = seeded()
    n, k = 37, 70
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    layers = {0: packed(n, k, 2, "row", gen), 1: packed(n, k, 1, "matrix", gen)}
    for tid, layer in layers.items():
        module.add_tenant(tid, layer)
    ids = torch.tensor([1, 0, -1, 1])
    x = torch.randn(4, 3, k, generator=gen)

    def check():
        with torch.no_grad():
            got = module(x, ids)
        assert_close(got, dense_reference(base, layers, x, ids), torch.float32)

    check()
    check()  # served from the remembered slots
    ids[2] = 0  # the same tensor changed in place
    check()
    layers[0] = packed(n, k, 3, "row", gen)  # replaced in place in the stack
    module.add_tenant(0, layers[0])
    check()
    module.scales.mul_(1.5)  # the stack changed in place
    layers = {
        t: qdelta.PackedLayer(lay.planes, lay.scales * 1.5, lay.shape) for t, lay in layers.items()
    }
    check()
    module.remove_tenant(1)
    with pytest.raises(qdelta.UnknownTenantError, match="names tenant id 1"):
        module(x, ids)
    layers[1] = packed(n, k, 1, "row", gen)
    module.add_tenant(1, layers[1])
    check()
    x = torch.randn(4, k, generator=gen)  # rows instead of sequences, same ids
    check()


def test_in_place_add_equals_the_reference_backend():
    gen = seeded()
    n, k = 50, 96
    base = torch.nn.Linear(k, n)
    fast = qdelta.MultiTenantLinear(base)
    slow = qdelta.MultiTenantLinear(base, backend="reference")
    for t in range(3):
        layer = packed(n, k, 1 + t % 2, "row", gen)
        fast.add_tenant(t, layer)
        slow.add_tenant(t, layer)
    x = torch.randn(7, k, generator=gen)
    ids = torch.tensor([2, 0, -1, 1, 2, 0, 0])
    with torch.no_grad():
        got, want = fast(x, ids), slow(x, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # With gradients on, the base output needs them: no in-place add, same result.
    got = fast(x, ids)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_prepared_stack_adds_the_reference_delta(dtype):
    gen = seeded()
    t, p, n, k = 3, 2, 41, 77
    planes = torch.randint(-(2**31), 2**31, (t, p, n, -(-k // 32)), generator=gen)
    planes = planes.to(torch.int32)
    scales = torch.rand(t, p, n, generator=gen) + 0.1
    x = torch.randn(5, k, generator=gen).to(dtype)
    ids = torch.tensor([2, -1, 0, 2, 1])
    start = torch.randn(5, n, generator=gen)
    prepared = cpu.PreparedStack(planes, scales)
    assert prepared.current(planes, scales)
    out = start.clone()
    prepared.add_into(x, ids.numpy(), out)
    want = start.double() + reference.multi_tenant_delta_matmul(
        x.double(), planes, scales.double(), ids
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    scales.add_(1.0)
    assert not prepared.current(planes, scales)
    assert not prepared.current(planes.clone(), scales)


def test_prepared_stack_refuses_bad_shapes():
    with pytest.raises(qdelta.ShapeError, match="planes"):
        cpu.PreparedStack(torch.zeros(2, 3, 4, dtype=torch.int32), torch.ones(2, 3))
    assert (
        np.dtype(
            cpu.PreparedStack(
                torch.zeros(1, 1, 2, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.float16)
            ).scales.dtype
        )
        == np.float32
    )
