"""A MultiTenantModel through the module lifecycle: casts after tenants loaded,
the wrapped base's checkpoint keys, state-dict loading, copies and pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import qdelta
from runtime_helpers import make_delta, merged, perturbed, tiny_llama

pytest.importorskip("transformers")

IDS = torch.tensor([[5, 17, 3, 88, 41, 9], [60, 2, 33, 7, 19, 70]])


@pytest.fixture(scope="module")
def parts():
    base = tiny_llama(0)
    deltas = {f"t{i}": make_delta(base, perturbed(base, 10 + i, scale=0.05)) for i in range(2)}
    return base, deltas


def serving(parts, tmp_path=None):
    base, deltas = parts
    store = None
    if tmp_path is not None:  # t1 from a store file, t0 given in memory
        store = qdelta.DeltaStore(tmp_path)
        store.add("t1", deltas["t1"])
        return qdelta.MultiTenantModel(copy.deepcopy(base), store, {"t0": deltas["t0"]})
    return qdelta.MultiTenantModel(copy.deepcopy(base), tenants=deltas)


def logits(model, tenants=("t0", "t1")):
    with torch.no_grad():
        return model(IDS, list(tenants)).logits.float()


def oracle(parts, dtype=torch.float32):
    """Each row by its tenant's merged dense model, in ``dtype`` (float64 math first)."""
    base, deltas = parts
    rows = []
    for r, name in enumerate(("t0", "t1")):
        dense = merged(base, deltas[name]).to(dtype)
        with torch.no_grad():
            rows.append(dense(IDS[r : r + 1]).logits[0].float())
    return torch.stack(rows)


@pytest.mark.parametrize(
    "cast, dtype, tol",
    [
        (lambda m: m.double(), torch.float64, 1e-5),
        (lambda m: m.half(), torch.float16, 3e-2),
        (lambda m: m.bfloat16(), torch.bfloat16, 1.5e-1),
        (lambda m: m.to(torch.float64), torch.float64, 1e-5),
    ],
)
def test_cast_after_tenants_loaded_serves_in_the_new_dtype(parts, cast, dtype, tol):
    model = serving(parts)
    logits(model)  # tenants loaded in float32
    cast(model)
    with torch.no_grad():
        out = model(IDS, ["t0", "t1"]).logits
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), oracle(parts, dtype), rtol=0, atol=tol)
    assert set(model.loaded_tenants) == {"t0", "t1"}
    params = {p.data_ptr(): p for p in model.model.parameters()}.values()
    assert model.memory()["base_bytes"] == sum(p.numel() * p.element_size() for p in params)


def test_a_cast_the_budget_cannot_hold_keeps_the_newest_tenants(parts):
    """Widened to float64 under a budget full in float32: the cast happens and the most
    recently used tenant that fits loads again; the other stays registered."""
    model = serving(parts)
    model.preload(["t0", "t1"])
    model.budget_bytes = model.resident_bytes  # full
    model.double()
    assert next(model.model.parameters()).dtype == torch.float64
    assert model.loaded_tenants == ["t1"]
    assert model.resident_bytes <= model.budget_bytes
    assert set(model.tenants) == {"t0", "t1"}
    torch.testing.assert_close(  # t0 loads on demand (evicting t1) and serves right
        logits(model, ("t0", "t0"))[0], oracle(parts, torch.float64)[0], rtol=0, atol=1e-5
    )
    model.float()
    model.budget_bytes = model.resident_bytes  # one tenant in float32
    model.double()  # which alone outgrows it in float64: none loads again
    assert model.loaded_tenants == [] and set(model.tenants) == {"t0", "t1"}


def test_cast_before_tenants_load(parts):
    model = qdelta.MultiTenantModel(copy.deepcopy(parts[0])).half()
    for name, delta in parts[1].items():
        model.add_tenant(name, delta)  # checked against the base as built (fp32 fingerprint)
    torch.testing.assert_close(logits(model), oracle(parts, torch.float16), rtol=0, atol=3e-2)


def test_wrapped_base_keeps_its_own_checkpoint(parts, tmp_path):
    base = parts[0]
    model = serving(parts)
    logits(model)  # every wrapper swapped in
    assert list(model.model.state_dict()) == list(base.state_dict())
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k
    model.model.save_pretrained(tmp_path / "ckpt")  # no shared-tensor error
    from transformers import LlamaForCausalLM

    again = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_loading_a_base_checkpoint_into_the_wrapped_model(parts):
    model = serving(parts)
    logits(model)
    other = tiny_llama(0)  # same architecture, weights nudged
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    model.model.load_state_dict(other.state_dict())  # strict
    expected = []
    for r, name in enumerate(("t0", "t1")):
        dense = merged(other, parts[1][name])
        with torch.no_grad():
            expected.append(dense(IDS[r : r + 1]).logits[0])
    torch.testing.assert_close(logits(model), torch.stack(expected), rtol=0, atol=1e-4)


def test_deepcopy_and_pickle_serve_the_same(parts, tmp_path):
    model = serving(parts, tmp_path)
    before = logits(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(logits(clone), before, rtol=0, atol=0)
        assert clone.store is not model.store and clone.store.directory == model.store.directory
