"""Each tenant module's slot map (model slot -> its own row) is updated one tenant
at a time as tenants load and leave: after any sequence of loads and removals it
is the map a whole rebuild makes, and every routed row reads its own tenant's
weights (float64 reference); a MultiTenantModel's loads and evictions rebuild no
module's whole map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.runtime_helpers import merged, perturbed, tiny_llama
from tests.test_multitenant import seeded
from tests.tiny_models import one_thread

import qdelta
from qdelta import reference, tenant_modules
from qdelta.tenant_modules import (
    PackedRowEmbedding,
    Route,
    RoutedLinear,
    RowEmbedding,
    RowLayerNorm,
    RowLinear,
    RowRMSNorm,
)

pytest.importorskip("transformers")

DIM, VOCAB = 12, 9


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def _rms_norm() -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(DIM)


def _packed(rows: int, cols: int, bits: int, gen: torch.Generator):
    """A packed delta and its dense float64 value."""
    planes, scales = qdelta.pack_residual(
        torch.randn(rows, cols, generator=gen) * 0.1, bits=bits, scale="row"
    )
    dense = reference.unpack_planes(
        torch.from_numpy(np.asarray(planes).view(np.int32)),
        torch.as_tensor(np.asarray(scales)),
        cols,
        dtype=torch.float64,
    )
    return qdelta.PackedLayer(planes, scales, (rows, cols)), dense


# kind -> (the base module, its wrapper class, a batch input, whether deltas are packed)
KINDS = {
    "rms_norm": (_rms_norm, RowRMSNorm, "hidden", False),
    "layer_norm": (lambda: torch.nn.LayerNorm(DIM), RowLayerNorm, "hidden", False),
    "embedding": (lambda: torch.nn.Embedding(VOCAB, DIM), RowEmbedding, "ids", False),
    "linear": (lambda: torch.nn.Linear(DIM, DIM), RowLinear, "hidden", False),
    "packed_linear": (lambda: torch.nn.Linear(DIM, DIM), RoutedLinear, "hidden", True),
    "packed_embedding": (
        lambda: torch.nn.Embedding(VOCAB, DIM),
        PackedRowEmbedding,
        "ids",
        True,
    ),
}


class _Served:
    """A wrapper, the tenants it holds (name -> model slot) and each tenant's
    float64 parameters, loaded and removed as MultiTenantModel does."""

    def __init__(self, kind: str, gen: torch.Generator) -> None:
        make_base, cls, self.input, self.packed = KINDS[kind]
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
        self.base = make_base().double()
        self.route = Route()
        self.module = cls(self.base, self.route)
        self.gen = gen
        self.slot_of: dict[str, int] = {}
        self.params: dict[str, dict[str, torch.Tensor]] = {}
        self.capacity = 0

    def load(self, name: str, bits: int) -> None:
        free = sorted(set(range(len(self.slot_of) + 1)) - set(self.slot_of.values()))
        slot = free[0]
        weight = self.base.weight.detach()
        if self.packed:
            layer, dense = _packed(*weight.shape, bits, self.gen)
            self.module.add(name, layer, {}, slot)
            own = {"weight": weight + dense}
        else:
            own = {
                "weight": weight + torch.randn(weight.shape, generator=self.gen, dtype=weight.dtype)
            }
            if getattr(self.base, "bias", None) is not None and bits > 1:
                own["bias"] = torch.randn(weight.shape[0], generator=self.gen, dtype=weight.dtype)
            self.module.add(name, own)
        self.slot_of[name] = slot
        self.params[name] = own
        self.capacity = max(self.capacity, slot + 1)
        self.module.map_slot(name, slot, self.capacity)

    def remove(self, name: str) -> None:
        self.module.remove(name)
        del self.slot_of[name], self.params[name]

    def check_map(self) -> None:
        """The map is what a whole rebuild (set_slots) makes: -1 past it."""
        table = self.module._slot_map
        assert table.shape[0] > self.capacity
        want = torch.full_like(table, -1)
        for name, slot in self.slot_of.items():
            want[slot + 1] = self.module.local_index(name)
        assert torch.equal(table, want), (table.tolist(), want.tolist())

    def check_rows(self, names: list[str | None] | None = None) -> None:
        """One routed batch of ``names`` rows (default: each tenant, the base; None:
        the base), each row equal to its own module's output."""
        names = [*self.slot_of, None] if names is None else names
        self.route.slots = torch.tensor([-1 if n is None else self.slot_of[n] for n in names])
        if self.input == "ids":
            x = torch.randint(0, VOCAB, (len(names), 3), generator=self.gen)
        else:
            x = torch.randn(len(names), 3, DIM, generator=self.gen, dtype=torch.float64)
        with torch.no_grad():
            got = self.module(x)
            for r, name in enumerate(names):
                params = {} if name is None else self.params[name]
                want = torch.func.functional_call(self.base, params, (x[r : r + 1],))
                torch.testing.assert_close(got[r : r + 1], want, rtol=1e-6, atol=1e-6)
        self.route.slots = None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(KINDS)),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 3)), max_size=14),
    seed=st.integers(0, 2**31 - 1),
)
def test_incremental_maps_equal_a_whole_rebuild(kind, steps, seed):
    """Random loads (1-3 planes) and removals: the map updated one tenant at a time
    is the whole rebuild's and every row reads its own tenant's weights."""
    served = _Served(kind, torch.Generator().manual_seed(seed))
    for load, which, bits in steps:
        name = f"t{which}"
        if name in served.slot_of:
            if not load:
                served.remove(name)
        elif load:
            served.load(name, bits)
        served.check_map()
    if served.slot_of:
        served.check_rows()
    # A whole rebuild agrees with what the steps left.
    kept = served.module._slot_map.clone()
    served.module.set_slots(served.slot_of, served.capacity)
    assert torch.equal(served.module._slot_map, kept[: served.capacity + 1])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_removal_moves_the_last_tenant_into_the_freed_row(kind):
    """Remove the first of four tenants, then one in the middle: the last tenant's
    rows move and its map entry follows; the base rows are untouched."""
    served = _Served(kind, seeded())
    for t in range(4):
        served.load(f"t{t}", bits=1 + t % 2)
    for name in ("t0", "t2"):
        served.remove(name)
        served.check_map()
        served.check_rows()
    served.load("t4", bits=2)  # into a freed slot
    served.check_map()
    served.check_rows()


def test_a_packed_embedding_gives_back_its_deepest_planes():
    """The only 3-plane tenant of a packed embedding leaves: the stack keeps no
    all-zero third plane (the budget counts a layer as deep as its deepest tenant)."""
    served = _Served("packed_embedding", seeded())
    for name, bits in (("a", 1), ("deep", 3), ("b", 2)):
        served.load(name, bits)
    assert served.module._stacked_planes.shape[1] == 3
    served.remove("deep")
    assert served.module._stacked_planes.shape[1] == 2
    served.check_map()
    served.check_rows()


def _whole_maps_agree(model: qdelta.MultiTenantModel) -> None:
    capacity = model._capacity
    for mname, wrapper in model._wrapped.items():
        table = wrapper._slot_map
        want = torch.full_like(table, -1)
        for name, slot in model._slot_of.items():
            local = wrapper.local_index(name)
            if local is not None:
                want[slot + 1] = local
        assert table.shape[0] > capacity, mname
        assert torch.equal(table, want), mname


def test_loads_and_evictions_rebuild_no_whole_map(monkeypatch):
    """Once each module exists, a MultiTenantModel's loads and the evictions of a
    full budget update the maps one tenant at a time (no set_slots); the maps then
    equal whole rebuilds and each tenant's rows equal its merged model."""
    seed = int(np.random.default_rng().integers(1 << 30))
    base = tiny_llama(seed)
    deltas = {f"t{i}": qdelta.compress(base, perturbed(base, seed + i + 1)) for i in range(5)}
    model = qdelta.MultiTenantModel(merged(base, None))
    for name, delta in deltas.items():
        model.add_tenant(name, delta)
    model.preload(["t0"])  # every module wrapped
    model.budget_bytes = 3 * model.resident_bytes  # room for three (all 1-bit)
    rebuilds = []
    whole = tenant_modules.TenantModule.set_slots

    def counted(self, slot_of, capacity):
        rebuilds.append(type(self).__name__)
        return whole(self, slot_of, capacity)

    monkeypatch.setattr(tenant_modules.TenantModule, "set_slots", counted)
    for name in ["t1", "t2", "t3", "t0", "t4", "t1"]:  # t3 on evicts the oldest
        model.preload([name])
        _whole_maps_agree(model)
    assert rebuilds == []
    assert len(model.loaded_tenants) == 3
    monkeypatch.undo()
    ids = torch.randint(0, 101, (4, 5), generator=seeded())
    rows = [*model.loaded_tenants, None]
    with torch.no_grad():
        got = model(ids, rows).logits
        for r, name in enumerate(rows):
            want = merged(base, None if name is None else deltas[name])(ids[r : r + 1]).logits
            torch.testing.assert_close(got[r : r + 1], want, rtol=1e-4, atol=2e-4)


def test_bias_changes_are_written_row_by_row():
    """A packed linear whose tenants bring their own biases: a load or a removal
    writes its own row of the bias change table (the same table object, until the
    map outgrows it), and every row still equals its tenant's dense linear; a base
    bias changed in place makes the table again."""
    gen = seeded()
    base = torch.nn.Linear(DIM, DIM).double()
    route = Route()
    module = RoutedLinear(base, route)
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    slot_of: dict[str, int] = {}

    def load(name: str, slot: int, with_bias: bool) -> None:
        layer, delta = _packed(DIM, DIM, 2, gen)
        params = {"bias": torch.randn(DIM, generator=gen, dtype=torch.float64)} if with_bias else {}
        module.add(name, layer, params, slot)
        module.map_slot(name, slot, max([slot, *slot_of.values()]) + 1)
        slot_of[name] = slot
        dense[name] = (base.weight.detach() + delta, params.get("bias", base.bias.detach()))

    def check() -> None:
        names = [*slot_of, None]
        route.slots = torch.tensor([-1 if n is None else slot_of[n] for n in names])
        x = torch.randn(len(names), DIM, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            got = module(x)
        for r, name in enumerate(names):
            w, b = (base.weight.detach(), base.bias.detach()) if name is None else dense[name]
            torch.testing.assert_close(got[r], x[r] @ w.T + b, rtol=1e-9, atol=1e-9)

    for slot, name in enumerate("abc"):
        load(name, slot, with_bias=name != "b")
    check()
    table = module._change_cache[3]
    module.remove("a")
    del slot_of["a"], dense["a"]
    load("d", 0, with_bias=True)  # into the freed slot
    check()
    assert module._change_cache[3] is table
    with torch.no_grad():
        base.bias.mul_(-2.0)  # "b" keeps the base's bias: its reference is a view of it
    check()
    assert module._change_cache[3] is not table


def test_an_embedding_lookup_is_passed_only_its_batch_tables(monkeypatch):
    """With twelve tenants resident, a float32 batch of two tenants and the base
    hands the Rust lookup three tables, not thirteen (the binding reads every array
    it is given, each decode step); every row equals its own table's lookup."""
    served = _Served("embedding", seeded())
    served.base.float()
    for t in range(12):
        served.load(f"t{t}", bits=1)
    served.module._stacked = served.module._stacked.float()
    served.params = {n: {"weight": p["weight"].float()} for n, p in served.params.items()}
    passed = []
    lookup = tenant_modules.cpu.gather_embedding

    def counted(tables, *args):
        passed.append(len(tables))
        return lookup(tables, *args)

    monkeypatch.setattr(tenant_modules.cpu, "gather_embedding", counted)
    served.check_rows(["t7", None, "t2", "t7"])
    served.check_rows(["t11"])
    assert passed == [3, 1]


def test_a_packed_embedding_makes_its_source_table_once_per_change():
    """Batches routing other tenants reuse the table of each tenant's stack rows
    (made in O(tenants)); a load or a removal makes it again, and rows stay right."""
    served = _Served("packed_embedding", seeded())
    for t in range(6):
        served.load(f"t{t}", bits=1 + t % 2)
    served.check_rows(["t1", None])
    table = served.module._table_cache[1]
    served.check_rows(["t4", "t0", "t5"])
    assert served.module._table_cache[1] is table
    served.remove("t0")  # t5 moves into t0's row
    served.check_rows(["t5", "t3"])
    assert served.module._table_cache[1] is not table
    served.load("t6", bits=2)
    served.check_rows(["t6", "t5", None])
