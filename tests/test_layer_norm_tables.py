"""A per-tenant LayerNorm stacks its tenants' weights and biases once per change of
its tenants, so a routed batch gathers its rows without touching every tenant:
rows that keep the base's tensors read them live (a base changed in place, the
base's gradient), the tables are counted as reserved bytes, not the tenants'."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from qdelta.tenant_modules import Route, RowLayerNorm

D = 24


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 (x - mean) / sqrt(var + eps) * w + b, from nothing of the module's."""
    x = x.double()
    centred = x - x.mean(-1, keepdim=True)
    normed = centred / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return normed * w.double() + b.double()


def _norm_with_tenants(gen: torch.Generator, count: int):
    """A LayerNorm with ``count`` tenants at slots 0..count-1: even ones change the
    weight and the bias, odd ones only the bias (they keep the base's weight)."""
    base = nn.LayerNorm(D)
    with torch.no_grad():
        base.weight.copy_(torch.randn(D, generator=gen))
        base.bias.copy_(torch.randn(D, generator=gen))
    route = Route()
    norm = RowLayerNorm(base, route)
    own = {}
    for t in range(count):
        params = {"bias": torch.randn(D, generator=gen)}
        if t % 2 == 0:
            params["weight"] = torch.randn(D, generator=gen)
        norm.add(f"t{t}", params)
        own[t] = params
    norm.set_slots({f"t{t}": t for t in range(count)}, count)
    return base, route, norm, own


def _rows_want(base, own, slots, x):
    out = []
    for r, slot in enumerate(slots):
        params = own.get(slot, {})
        w = params.get("weight", base.weight.detach())
        b = params.get("bias", base.bias.detach())
        out.append(_reference(x[r], w, b))
    return torch.stack(out)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))


@contextlib.contextmanager
def _counted_stacks(monkeypatch) -> Iterator[list[int]]:
    """The sizes of the torch.stack calls made inside (the references outside)."""
    stacked: list[int] = []
    real = torch.stack

    def counting(*args, **kwargs):
        stacked.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "stack", counting)
    try:
        yield stacked
    finally:
        monkeypatch.setattr(torch, "stack", real)


def _after_a_first_batch(gen: torch.Generator, tenants: int) -> tuple:
    """``_norm_with_tenants`` once a routed batch has made its tables."""
    base, route, norm, own = _norm_with_tenants(gen, tenants)
    route.slots = torch.tensor([0, 1])
    with torch.no_grad():
        norm(torch.randn(2, 3, D, generator=gen))
    return base, route, norm, own


def test_routed_batches_gather_rows_without_restacking(gen, monkeypatch):
    """After the first batch, new routings (other tenants, other rows) stack
    nothing: each batch's rows come from the tables made once."""
    base, route, norm, own = _after_a_first_batch(gen, 40)
    for slots in ([5, -1, 38, 2], [39], [-1, 17, 17, 6, 11]):
        route.slots = torch.tensor(slots)
        x = torch.randn(len(slots), 3, D, generator=gen)
        with _counted_stacks(monkeypatch) as stacked, torch.no_grad():
            got = norm(x)
        assert stacked == []
        torch.testing.assert_close(
            got.double(), _rows_want(base, own, slots, x), rtol=1e-5, atol=1e-5
        )


def test_a_tenant_change_and_a_base_change_in_place_are_seen(gen):
    """A removal and an addition remake the tables; the base's weight and bias
    changed in place (a checkpoint loaded into it) reach the rows that keep them."""
    base, route, norm, own = _norm_with_tenants(gen, 4)
    slots = [0, 1, 2, 3, -1]
    x = torch.randn(len(slots), 2, D, generator=gen)
    route.slots = torch.tensor(slots)
    with torch.no_grad():
        norm(x)
        base.weight.mul_(-3.0)
        base.bias.add_(1.0)
        torch.testing.assert_close(
            norm(x).double(), _rows_want(base, own, slots, x), rtol=1e-5, atol=1e-5
        )
    norm.remove("t1")
    del own[1]
    own[1] = {"weight": torch.randn(D, generator=gen), "bias": torch.randn(D, generator=gen)}
    norm.add("t1b", own[1])
    norm.set_slots({"t0": 0, "t1b": 1, "t2": 2, "t3": 3}, 4)
    route.slots = torch.tensor(slots)
    with torch.no_grad():
        torch.testing.assert_close(
            norm(x).double(), _rows_want(base, own, slots, x), rtol=1e-5, atol=1e-5
        )


def test_the_base_gradient_comes_from_the_rows_that_keep_it(gen):
    """With gradients on, the base's weight gets the gradient of the base rows and
    of the tenants that keep it (autograd of the float64 reference), no more."""
    base, route, norm, own = _norm_with_tenants(gen, 4)
    slots = [1, 0, -1, 3, 2]
    x = torch.randn(len(slots), 2, D, generator=gen)
    route.slots = torch.tensor(slots)
    upstream = torch.randn(len(slots), 2, D, generator=gen)
    (norm(x) * upstream).sum().backward()
    w = base.weight.detach().double().requires_grad_()
    b = base.bias.detach().double().requires_grad_()
    rows = []
    for r, slot in enumerate(slots):
        params = own.get(slot, {})
        rows.append(_reference(x[r], params.get("weight", w), params.get("bias", b)))
    (torch.stack(rows) * upstream.double()).sum().backward()
    torch.testing.assert_close(base.weight.grad.double(), w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.bias.grad.double(), b.grad, rtol=1e-5, atol=1e-5)


def test_the_tables_are_reserved_bytes_not_the_tenants(gen):
    """tenant_nbytes (what the budget bounds) is the tenants' own tensors before and
    after a batch; the tables are the derived tensors, gone with the tenants."""
    _, route, norm, own = _norm_with_tenants(gen, 3)
    mine = sum(t.numel() * t.element_size() for p in own.values() for t in p.values())
    assert norm.tenant_nbytes() == mine
    assert norm.derived_tensors() == []
    route.slots = torch.tensor([0, 2])
    with torch.no_grad():
        norm(torch.randn(2, 1, D, generator=gen))
    assert norm.tenant_nbytes() == mine
    derived = norm.derived_tensors()
    assert sum(t.numel() for t in derived if t.is_floating_point()) == 2 * 4 * D
    for name in ("t0", "t1", "t2"):
        norm.remove(name)
    assert norm.derived_tensors() == [] and norm.tenant_nbytes() == 0


def test_loads_and_removals_edit_the_tables_in_place_of_remaking_them(gen, monkeypatch):
    """Once made, the tables follow loads and removals row by row (no stack of
    every tenant): they equal tables made afresh, and the rows their tenants."""
    base, route, norm, own = _after_a_first_batch(gen, 6)
    slot_of = {f"t{t}": t for t in range(6)}
    with _counted_stacks(monkeypatch) as stacked:
        for name in ("t1", "t4"):
            norm.remove(name)
            del own[slot_of.pop(name)]
        for slot, keeps_weight in ((1, True), (4, False), (6, True)):
            params = {"bias": torch.randn(D, generator=gen)}
            if not keeps_weight:
                params["weight"] = torch.randn(D, generator=gen)
            norm.add(f"n{slot}", params)
            own[slot] = params
            slot_of[f"n{slot}"] = slot
        norm.set_slots(slot_of, 7)
    assert stacked == []
    edited = norm._tables()
    norm._tables_cache = None
    for got, want in zip(edited, norm._tables(), strict=True):
        assert torch.equal(got, want)
    slots = [*own, -1]
    route.slots = torch.tensor(slots)
    x = torch.randn(len(slots), 2, D, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(
            norm(x).double(), _rows_want(base, own, slots, x), rtol=1e-5, atol=1e-5
        )
