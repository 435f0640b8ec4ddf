"""MultiTenantLinear against the per-tenant dense reference: base weight plus
the delta unpacked by the torch reference, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qdelta
from qdelta import reference

RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))


def packed(n: int, k: int, bits: int, scale: str, gen: torch.Generator) -> qdelta.PackedLayer:
    delta = torch.randn(n, k, generator=gen) * 0.05
    planes, scales = qdelta.pack_residual(delta, bits=bits, scale=scale)
    return qdelta.PackedLayer(planes, scales, (n, k))


def dense_reference(base: torch.nn.Linear, layers: dict[int, qdelta.PackedLayer], x, ids):
    """Row by row: ``x[r] @ (W + D_t)^T + b`` in float64 (``t = -1``: ``D = 0``)."""
    w = base.weight.detach().to(torch.float64)
    b = base.bias.detach().to(torch.float64)
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    per_row = ids.repeat_interleave(x.shape[1]) if x.dim() == 3 else ids
    y = torch.empty(rows.shape[0], w.shape[0], dtype=torch.float64)
    for r, t in enumerate(per_row.tolist()):
        weight = w
        if t >= 0:
            layer = layers[t]
            planes = torch.from_numpy(layer.planes.view(np.int32))
            scales = torch.from_numpy(layer.scales)
            weight = w + reference.unpack_planes(planes, scales, x.shape[-1], dtype=torch.float64)
        y[r] = rows[r] @ weight.T + b
    return y.reshape(*x.shape[:-1], w.shape[0])


def assert_close(got, want, dtype):
    scale = want.abs().max().item()
    err = (got.to(torch.float64) - want).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [45, 96, 131])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mixed_batch_matches_dense_per_tenant(dtype, k, backend):
    gen = seeded()
    n = 29
    base = torch.nn.Linear(k, n).to(dtype)
    module = qdelta.MultiTenantLinear(base, backend=backend)
    # Tenants of 1, 2 and 3 planes, row and matrix scales, in one stack.
    layers = {}
    for key, bits, scale in (("a", 1, "matrix"), ("b", 3, "row"), (7, 2, "matrix")):
        layer = packed(n, k, bits, scale, gen)
        layers[module.add_tenant(key, layer)] = layer
    assert sorted(layers) == [0, 1, 7]
    assert module.planes.shape == (3, 3, n, -(-k // 32)) and module.scales.shape == (3, 3, n)
    x = torch.randn(6, 3, k, generator=gen).to(dtype)
    ids = torch.tensor([7, -1, 0, 1, 7, 0])
    with torch.no_grad():
        got = module(x, ids)
    assert got.shape == (6, 3, n) and got.dtype == dtype
    assert_close(got, dense_reference(base, layers, x, ids), dtype)


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_rows_form_and_stored_layers_round_trip(bits, scale):
    gen = seeded()
    n, k = 17, 70
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    originals = {}
    for name in ("x", "y"):
        layer = packed(n, k, bits, scale, gen)
        originals[module.add_tenant(name, layer)] = layer
    x = torch.randn(5, k, generator=gen)
    ids = torch.tensor([1, 0, -1, 1, 1], dtype=torch.int32)
    with torch.no_grad():
        got = module(x, ids)
    assert_close(got, dense_reference(base, originals, x, ids.long()), torch.float32)


def test_add_replace_remove_while_serving():
    gen = seeded()
    n, k = 12, 40
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    a = module.add_tenant("a", packed(n, k, 1, "row", gen))
    b_layer = packed(n, k, 3, "matrix", gen)
    b = module.add_tenant("b", b_layer)
    assert (a, b) == (0, 1) and module.tenants == {"a": 0, "b": 1}
    a_layer = packed(n, k, 2, "row", gen)
    assert module.add_tenant("a", a_layer) == a  # replaced in place
    layers = {a: a_layer, b: b_layer}
    x = torch.randn(3, k, generator=gen)
    ids = torch.tensor([a, b, -1])
    with torch.no_grad():
        got = module(x, ids)
    assert_close(got, dense_reference(base, layers, x, ids), torch.float32)
    module.remove_tenant("b")
    assert module.planes.shape[:2] == (1, 2)  # the plane only tenant b had is dropped
    with pytest.raises(qdelta.UnknownTenantError, match="row 1 names tenant id 1"):
        module(x, ids)
    ids = torch.tensor([a, -1, a])
    with torch.no_grad():
        got = module(x, ids)
    assert_close(got, dense_reference(base, layers, x, ids), torch.float32)
    # A freed id is not handed to the next name: a request still holding it is
    # refused, not served by another tenant. The remaining tenant keeps its id.
    assert module.add_tenant("c", packed(n, k, 1, "matrix", gen)) == 2
    with pytest.raises(qdelta.UnknownTenantError, match="row 0 names tenant id 1"):
        module(x, torch.tensor([b, -1, -1]))
    module.remove_tenant(0)
    assert module.tenants == {"c": 2}
    assert module.add_tenant("d", packed(n, k, 1, "matrix", gen)) == 3
    with torch.no_grad():
        assert torch.equal(module(x, torch.tensor([-1, -1, -1])), base(x))


def test_a_tenant_that_fails_to_load_leaves_the_layer_as_it_was(monkeypatch):
    gen = seeded()
    n, k = 10, 37
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    a_layer = packed(n, k, 1, "row", gen)
    a = module.add_tenant("a", a_layer)
    x = torch.randn(2, k, generator=gen)
    ids = torch.tensor([a, -1])
    with torch.no_grad():
        before = module(x, ids)
    real_cat = torch.cat

    def out_of_memory(*args, **kwargs):  # the stack's growth fails (e.g. device memory)
        raise torch.OutOfMemoryError("no room for the new stack")

    monkeypatch.setattr(torch, "cat", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        module.add_tenant("deep", packed(n, k, 3, "matrix", gen))  # new name, deeper stack
    monkeypatch.setattr(torch, "cat", real_cat)
    assert module.tenants == {"a": a} and module.planes.shape[:2] == (1, 1)
    with pytest.raises(qdelta.UnknownTenantError):
        module.tenant_id("deep")
    with torch.no_grad():
        assert torch.equal(module(x, ids), before)
    assert_close(before, dense_reference(base, {a: a_layer}, x, ids), torch.float32)
    # Loading it again (with room now) works and gets the next free id.
    deep = module.add_tenant("deep", packed(n, k, 3, "matrix", gen))
    assert deep == 1 and module.planes.shape[:2] == (2, 3)


@pytest.mark.parametrize("rows", [4, 40])  # the fused decode plan, and the cached slots
@pytest.mark.parametrize("how", ["numpy", "data", "in_place"])
def test_ids_rewritten_in_place_are_seen(rows, how):
    gen = seeded()
    n, k = 16, 64
    base = torch.nn.Linear(k, n)
    module = qdelta.MultiTenantLinear(base)
    layers = {t: packed(n, k, 1, "matrix", gen) for t in (0, 1)}
    for t, layer in layers.items():
        module.add_tenant(t, layer)
    x = torch.randn(rows, k, generator=gen)
    ids = torch.zeros(rows, dtype=torch.int64)
    with torch.no_grad():
        module(x, ids)  # caches the slots (and a plan) for this ids tensor
        if how == "numpy":
            ids.numpy()[1::2] = 1  # bypasses torch's version counter
        elif how == "data":
            ids.data[1::2] = 1  # so does .data
        else:
            ids[1::2] = 1
        got = module(x, ids)
    assert_close(got, dense_reference(base, layers, x, ids), torch.float32)


def test_base_only_without_tenants():
    base = torch.nn.Linear(33, 5)
    module = qdelta.MultiTenantLinear(base)
    x = torch.randn(4, 33)
    with torch.no_grad():
        assert torch.equal(module(x, torch.full((4,), -1)), base(x))
    with pytest.raises(qdelta.UnknownTenantError, match="not loaded"):
        module(x, torch.tensor([-1, 0, -1, -1]))


def test_bad_input_is_a_clear_error():
    gen = seeded()
    base = torch.nn.Linear(50, 8)
    module = qdelta.MultiTenantLinear(base)
    module.add_tenant("a", packed(8, 50, 1, "row", gen))
    x = torch.randn(2, 3, 50)
    with pytest.raises(qdelta.UnknownTenantError, match="sequence 1 names tenant id 5"):
        module(x, torch.tensor([0, 5]))
    with pytest.raises(qdelta.UnknownTenantError, match="sequence 0 names tenant id -3"):
        module(x, torch.tensor([-3, 0]))
    with pytest.raises(
        qdelta.ShapeError, match=r"one id per sequence of x, shape \[2\], found shape \[3\]"
    ):
        module(x, torch.tensor([0, 0, 0]))
    with pytest.raises(qdelta.ShapeError, match="one id per row"):
        module(x[0], torch.tensor([[0, 0, 0]]))
    with pytest.raises(qdelta.DTypeError, match=r"found torch\.float32"):
        module(x, torch.tensor([0.0, 0.0]))
    with pytest.raises(qdelta.DTypeError, match=r"found torch\.bool"):
        module(x, torch.tensor([True, False]))
    with pytest.raises(qdelta.ShapeError, match=r"x: expected \[batch, seq, 50\]"):
        module(torch.randn(2, 49), torch.tensor([0, 0]))
    with pytest.raises(qdelta.ShapeError, match=r"expected a \[8, 50\] delta"):
        module.add_tenant("b", packed(8, 51, 1, "row", gen))
    with pytest.raises(qdelta.UnknownTenantError, match="tenant 'zz': not loaded"):
        module.remove_tenant("zz")
    with pytest.raises(KeyError):
        module.tenant_id(3)
    with pytest.raises(qdelta.QDeltaError, match=r"expected an int in \[0, 2\*\*63\)"):
        module.add_tenant(-1, packed(8, 50, 1, "row", gen))
    with pytest.raises(qdelta.DTypeError, match=r"base_layer: expected a torch\.nn\.Linear"):
        qdelta.MultiTenantLinear(torch.nn.Conv1d(2, 2, 1))
    # The module still serves after every refusal.
    with torch.no_grad():
        assert module(x, torch.tensor([0, -1])).shape == (2, 3, 8)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("rows", [4, 40])  # the one-call path and the separate calls
def test_jit_trace_records_the_delta_for_new_inputs(rows):
    """The kernels write through numpy, which a trace does not record: tracing
    takes torch ops only, so the traced layer computes its delta on new inputs."""
    gen = seeded()
    layer = qdelta.MultiTenantLinear(torch.nn.Linear(64, 32))
    layer.add_tenant("a", packed(32, 64, 2, "row", gen))
    ids = torch.zeros(rows, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (torch.randn(rows, 64, generator=gen), ids))
        x = torch.randn(rows, 64, generator=gen)
        torch.testing.assert_close(traced(x, ids), layer(x, ids), rtol=1e-5, atol=1e-5)


def test_casting_the_layer_keeps_the_scales_exact():
    """.half() / .bfloat16() cast the base layer; the stacked scales stay float32 as
    they were (a cast there and back rounds them and flushes the smallest to 0)."""
    gen = seeded()
    layer = qdelta.MultiTenantLinear(torch.nn.Linear(40, 8))
    layer.add_tenant("a", packed(8, 40, 3, "row", gen))
    with torch.no_grad():
        layer.scales[0, 2] *= 1e-4  # ~1e-7: below fp16's normal range
    before = layer.scales.clone()
    for cast in (layer.half, layer.bfloat16, layer.float, layer.double):
        cast()
        assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, before)
        assert layer.base_layer.weight.dtype == layer.base_layer.bias.dtype
