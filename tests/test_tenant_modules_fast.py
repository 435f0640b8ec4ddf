"""The one-call paths of the per-row tenant modules (the head's per-row weight
linear, src/rowwise.rs; the per-row RMSNorm, src/rmsnorm.rs) against float64
references, and the changes that must stop a bound call from being reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.test_multitenant import seeded

import qdelta
from qdelta import _core
from qdelta.kernels import cpu
from qdelta.tenant_modules import Route, RowLinear, RowRMSNorm

AVX512 = cpu.ISA == "avx512"


def head_with_tenants(n: int, k: int, gen: torch.Generator, bias: bool):
    base = torch.nn.Linear(k, n, bias=bias)
    route = Route()
    head = RowLinear(base, route)
    weights = {}
    for t, name in enumerate(["a", "b", "c"]):
        params = {"weight": torch.randn(n, k, generator=gen)}
        if bias and t != 1:
            params["bias"] = torch.randn(n, generator=gen)
        head.add(name, params)
        weights[name] = params
    head.set_slots({"a": 0, "b": 1, "c": 2}, capacity=3)
    return base, route, head, weights


def head_reference(base, weights, names_per_row, x):
    rows = []
    for r, name in enumerate(names_per_row):
        w = base.weight if name is None else weights[name]["weight"]
        b = base.bias if name is None else weights[name].get("bias", base.bias)
        y = x[r].double() @ w.double().T
        rows.append(y + (0 if b is None else b.double()))
    return torch.stack(rows)


@pytest.mark.parametrize("n, k", [(1, 1), (17, 33), (259, 128), (40, 130)])
@pytest.mark.parametrize("bias", [True, False])
def test_head_matches_per_tenant_linears(n, k, bias):
    gen = seeded()
    base, route, head, weights = head_with_tenants(n, k, gen, bias)
    slots = torch.tensor([2, -1, 0, 1, 2, 0])
    route.slots = slots
    names = [None if s < 0 else "abc"[s] for s in slots.tolist()]
    with torch.no_grad():
        for seq in (1, 3, 1):  # decode steps reuse the bound call; a prefill re-binds
            x = torch.randn(6, seq, k, generator=gen)
            got = head(x)
            assert got.shape == (6, seq, n)
            for s in range(seq):
                want = head_reference(base, weights, names, x[:, s])
                torch.testing.assert_close(got[:, s].double(), want, rtol=1e-5, atol=1e-4)
    assert (head._plan is not None and head._plan[4] is not None) == AVX512


def test_head_follows_changes():
    gen = seeded()
    n, k = 30, 20
    base, route, head, weights = head_with_tenants(n, k, gen, True)
    route.slots = torch.tensor([0, 1, 2, -1])
    names = ["a", "b", "c", None]
    x = torch.randn(4, 1, k, generator=gen)

    def check():
        with torch.no_grad():
            got = head(x)[:, 0].double()
        torch.testing.assert_close(got, head_reference(base, weights, names, x[:, 0]),
                                   rtol=1e-5, atol=1e-4)  # fmt: skip

    check()
    weights["a"]["weight"].mul_(2.0)  # in place: seen through the views
    check()
    base.weight.data = torch.randn(n, k, generator=gen)  # new storage
    check()
    head.remove("b")
    weights["d"] = {"weight": torch.randn(n, k, generator=gen)}
    head.add("d", weights["d"])
    head.set_slots({"a": 0, "d": 1, "c": 2}, capacity=3)
    names[1] = "d"
    route.slots = torch.tensor([0, 1, 2, -1])
    check()
    # With gradients on, torch does the work (and tracks them).
    x.requires_grad_(True)
    assert head(x).requires_grad


def test_norm_matches_the_base_formula_per_tenant():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = seeded()
    d = 70
    base = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, generator=gen))
    route = Route()
    norm = RowRMSNorm(base, route)
    tenant_weights = {name: torch.randn(d, generator=gen) for name in ("a", "b")}
    for name, w in tenant_weights.items():
        norm.add(name, {"weight": w})
    norm.set_slots({"a": 0, "b": 1}, capacity=2)
    route.slots = torch.tensor([1, -1, 0, 1])
    names = ["b", None, "a", "b"]
    for seq in (5, 1, 1):
        x = torch.randn(4, seq, d, generator=gen) * 3
        with torch.no_grad():
            got = norm(x)
        for r, name in enumerate(names):
            own = LlamaRMSNorm(d, eps=1e-5).double()
            with torch.no_grad():
                own.weight.copy_(base.weight if name is None else tenant_weights[name])
                want = own(x[r].double())
            torch.testing.assert_close(got[r].double(), want, rtol=1e-5, atol=1e-5)
    # A changed tenant weight is gathered again.
    with torch.no_grad():
        norm._stacked.mul_(-1.0)
        got = norm(x)
    torch.testing.assert_close(
        got[2].double(),
        (-tenant_weights["a"].double())
        * x[2].double()
        * torch.rsqrt(x[2].double().pow(2).mean(-1, keepdim=True) + 1e-5),
        rtol=1e-5,
        atol=1e-5,
    )


def test_core_refuses_bad_arguments():
    x = np.zeros((2, 4), np.float32)
    w = np.zeros((3, 4), np.float32)
    out = np.zeros((2, 3), np.float32)
    _core.rowwise_linear(x, [w], [None], np.array([0, 0]), out)
    with pytest.raises(qdelta.ShapeError, match="biases: expected one per weight"):
        _core.rowwise_linear(x, [w], [], np.array([0, 0]), out)
    with pytest.raises(qdelta.ShapeError, match=r"weights\[1\]: expected \[3, 4\]"):
        _core.rowwise_linear(x, [w, w[:, :3].copy()], [None, None], np.array([0, 1]), out)
    with pytest.raises(qdelta.QDeltaError, match=r"index: expected values in \[0, 1\)"):
        _core.rowwise_linear(x, [w], [None], np.array([0, 1]), out)
    with pytest.raises(qdelta.DTypeError, match=r"weights\[0\]"):
        _core.rowwise_linear(x, [w.astype(np.float64)], [None], np.array([0, 0]), out)
    y = np.zeros((2, 4), np.float32)
    _core.rms_norm_rows(x, np.ones((2, 4), np.float32), 1e-6, y)
    with pytest.raises(qdelta.ShapeError, match="divides the 2 rows"):
        _core.rms_norm_rows(x, np.ones((3, 4), np.float32), 1e-6, y)
    with pytest.raises(qdelta.ShapeError, match=r"out: expected \[2, 4\]"):
        _core.rms_norm_rows(x, np.ones((1, 4), np.float32), 1e-6, y[:1].copy())
    with pytest.raises(qdelta.QDeltaError, match="eps"):
        _core.rms_norm_rows(x, np.ones((1, 4), np.float32), float("nan"), y)


@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_packed_embedding_matches_the_dense_tables(scale):
    from qdelta.tenant_modules import PackedRowEmbedding

    gen = seeded()
    vocab, width = 37, 45
    base = torch.nn.Embedding(vocab, width)
    route = Route()
    emb = PackedRowEmbedding(base, route)
    tables = {}
    for slot, (name, bits) in enumerate([("a", 1), ("b", 2), ("c", 3)]):
        delta = torch.randn(vocab, width, generator=gen) * 0.1
        planes, scales = qdelta.pack_residual(delta, bits=bits, scale=scale)
        layer = qdelta.PackedLayer(planes, scales, (vocab, width))
        emb.add(name, layer, {}, slot)
        tables[name] = base.weight.detach().double() + qdelta.reference.unpack_planes(
            torch.from_numpy(np.asarray(planes).view(np.int32)),
            torch.as_tensor(np.asarray(scales)),
            width,
            dtype=torch.float64,
        )
    emb.set_slots({"a": 0, "b": 1, "c": 2}, capacity=3)
    route.slots = torch.tensor([2, -1, 0, 1])
    names = ["c", None, "a", "b"]
    for seq in (6, 1, 1):
        ids = torch.randint(0, vocab, (4, seq), generator=gen)
        with torch.no_grad():
            got = emb(ids)
        for r, name in enumerate(names):
            table = base.weight.detach().double() if name is None else tables[name]
            torch.testing.assert_close(got[r].double(), table[ids[r]], rtol=1e-5, atol=1e-5)
    assert emb._plan is not None
    # The torch form (gradients on) agrees.
    torch_form = emb(ids)
    assert torch_form.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(torch_form.detach(), emb(ids), rtol=1e-6, atol=1e-6)


def test_packed_embedding_core_refuses_bad_arguments():
    base = np.zeros((4, 8), np.float32)
    planes = np.zeros((1, 1, 4, 1), np.uint32)
    scales = np.ones((1, 1), np.float32)
    out = np.zeros((2, 8), np.float32)
    _core.packed_embedding(base, planes, scales, np.array([0, 3]), np.array([0, -1]), out)
    with pytest.raises(qdelta.QDeltaError, match=r"tokens: expected ids in \[0, 4\)"):
        _core.packed_embedding(base, planes, scales, np.array([0, 4]), np.array([0, -1]), out)
    with pytest.raises(qdelta.ShapeError, match=r"base table: expected \[4, 8\]"):
        _core.packed_embedding(base[:3].copy(), planes, scales, np.array([0, 1]),
                               np.array([0, 0]), out)  # fmt: skip
    with pytest.raises(qdelta.DTypeError, match="tokens"):
        _core.packed_embedding(base, planes, scales, np.array([0.0, 1.0]), np.array([0, 0]), out)


def test_whole_tables_gathered_per_row():
    from qdelta.tenant_modules import RowEmbedding

    gen = seeded()
    vocab, width = 29, 12
    base = torch.nn.Embedding(vocab, width)
    route = Route()
    emb = RowEmbedding(base, route)
    tables = {name: torch.randn(vocab, width, generator=gen) for name in ("a", "b")}
    for name, table in tables.items():
        emb.add(name, {"weight": table})
    emb.set_slots({"a": 0, "b": 1}, capacity=2)
    route.slots = torch.tensor([1, -1, 0])
    names = ["b", None, "a"]

    def check(ids):
        with torch.no_grad():
            got = emb(ids)
        for r, name in enumerate(names):
            table = base.weight.detach() if name is None else tables[name]
            assert torch.equal(got[r], table[ids[r]])

    for seq in (5, 1, 1):
        check(torch.randint(0, vocab, (3, seq), generator=gen))
    assert emb._plan is not None
    base.weight.data = torch.randn(vocab, width, generator=gen)  # new storage
    check(torch.randint(0, vocab, (3, 1), generator=gen))
    emb.remove("a")
    tables["c"] = torch.randn(vocab, width, generator=gen)
    emb.add("c", {"weight": tables["c"]})
    emb.set_slots({"b": 0, "c": 1}, capacity=2)
    route.slots = torch.tensor([0, -1, 1])
    names = ["b", None, "c"]
    check(torch.randint(0, vocab, (3, 1), generator=gen))
    with pytest.raises(qdelta.QDeltaError, match="tokens: expected ids"):
        with torch.no_grad():
            emb(torch.tensor([[0], [vocab], [1]]))
