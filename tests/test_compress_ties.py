"""Tied weights (an embedding and its head as one tensor) under compression.

One tensor is either compressed as a whole or kept whole once: a target naming
one half of a tied pair brings its twin along, and a tensor kept whole is
stored under one name, not once per alias.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.tiny_models import fake_finetune, one_thread, tiny_gpt2, tiny_llama

import qdelta
from qdelta import reference


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _tied_pair(kind: str, rng):
    seed = int(rng.integers(2**31))
    base = tiny_llama(seed, tie_word_embeddings=True) if kind == "llama" else tiny_gpt2(seed)
    ft = fake_finetune(base, seed=seed + 1)
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    assert emb.weight is head.weight  # the premise: tied in the base...
    assert ft.get_input_embeddings().weight is ft.get_output_embeddings().weight  # ...and ft
    names = {m: n for n, m in base.named_modules()}
    return base, ft, names[emb], names[head]


def _oracle(base: torch.nn.Module, delta: qdelta.Delta) -> torch.nn.Module:
    """base + each distinct weight's unpacked delta once (float64), params written in."""
    model = copy.deepcopy(base)
    sd = model.state_dict()
    done: set[int] = set()
    with torch.no_grad():
        for name, layer in delta.layers.items():
            w = sd[f"{name}.weight"]
            if w.data_ptr() in done:
                continue  # a tied weight takes its one delta once
            done.add(w.data_ptr())
            dense = reference.unpack_planes(
                torch.from_numpy(layer.planes.view("int32")),
                torch.from_numpy(layer.scales),
                layer.shape[1],
                dtype=torch.float64,
            )
            w.copy_((w.double() + (dense.T if layer.transposed else dense)).to(w.dtype))
        for key, value in delta.params.items():
            sd[key].copy_(value)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_tied_tensor_kept_whole_is_stored_once(kind, tmp_path, rng):
    base, ft, emb, head = _tied_pair(kind, rng)
    delta = qdelta.compress(base, ft)
    kept = [k for k in (f"{emb}.weight", f"{head}.weight") if k in delta.params]
    assert kept == [next(k for k in ft.state_dict() if k in kept)]  # one, the first name
    path = tmp_path / "t.qdelta"
    delta.save(path)
    loaded = qdelta.load(path)
    assert sorted(loaded.params) == sorted(delta.params)
    dense = qdelta.dense_delta(base, ft)
    assert sorted(dense.params) == sorted(delta.params)
    # Served through the runtime, the one kept tensor is both embedding and head.
    want = _logits(_oracle(base, delta))
    assert torch.allclose(want, _logits(ft), atol=0.5)  # the oracle is the fine-tune, roughly
    served = qdelta.MultiTenantModel(copy.deepcopy(base), tenants={"t": delta})
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    got = served(ids, tenant_ids=["t", "t"]).logits.double()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_targeting_one_half_of_a_tied_pair_compresses_the_pair(kind, rng):
    base, ft, emb, head = _tied_pair(kind, rng)
    for target in (head, emb):
        delta = qdelta.compress(base, ft, targets=target, compress_embeddings=True)
        assert {emb, head} <= set(delta.layers)
        assert f"{emb}.weight" not in delta.params and f"{head}.weight" not in delta.params
        a, b = delta.layers[emb], delta.layers[head]
        assert (a.planes == b.planes).all() and (a.scales == b.scales).all()
    # The head alone (no compress_embeddings) still brings its tied embedding along.
    delta = qdelta.compress(base, ft, targets=head)
    assert {emb, head} <= set(delta.layers)
    merged = qdelta.merge(copy.deepcopy(base), delta)
    want = _logits(_oracle(base, delta))
    assert torch.allclose(_logits(merged), want, atol=1e-5)


def test_excluding_the_twin_of_a_target_is_refused(rng):
    base, ft, emb, head = _tied_pair("llama", rng)
    with pytest.raises(qdelta.TargetError, match=r"share one weight tensor \(tied\)"):
        qdelta.compress(
            base, ft, targets=[head, emb], exclude=emb.rpartition(".")[2], compress_embeddings=True
        )


def test_a_fine_tune_that_untied_its_head_keeps_both_values(rng):
    base, _, emb, head = _tied_pair("llama", rng)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.lm_head.weight = torch.nn.Parameter(ft.lm_head.weight.clone() + 0.01)
        ft.model.embed_tokens.weight.add_(-0.02)
    delta = qdelta.compress(base, ft)
    assert {f"{emb}.weight", f"{head}.weight"} <= set(delta.params)
    assert not torch.equal(delta.params[f"{emb}.weight"], delta.params[f"{head}.weight"])
    # Targeting the head now compresses it alone: it is no longer the embedding's tensor.
    only_head = qdelta.compress(base, ft, targets=head)
    assert set(only_head.layers) == {head} and f"{emb}.weight" in only_head.params


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merging_one_half_of_an_applied_tied_pair_is_refused(kind, rng):
    """The head's merge would put its delta in the weight the embedding adds its own to."""
    base, ft, emb, head = _tied_pair(kind, rng)
    delta = qdelta.compress(base, ft, compress_embeddings=True)
    want = _logits(_oracle(base, delta))
    model = qdelta.apply(copy.deepcopy(base), delta)
    weight = model.get_submodule(head).weight.clone()
    with pytest.raises(qdelta.ModelMismatchError, match=rf"tied to \['{emb}'\].*qdelta.merge"):
        model.get_submodule(head).merge()
    assert torch.equal(model.get_submodule(head).weight, weight)  # nothing written
    assert torch.allclose(_logits(model), want, atol=1e-5)
    # Layers without a twin still merge, and the model stays the fine-tune.
    others = [
        m for n, m in model.named_modules() if isinstance(m, qdelta.BitDeltaLinear) and n != head
    ]
    assert others
    for m in others:
        m.merge()
    assert torch.allclose(_logits(model), want, atol=1e-4)


class _SharedModuleModel(torch.nn.Module):
    """One embedding module under two names (as T5's ``shared`` and
    ``encoder.embed_tokens`` are in some transformers versions), its weight tied
    to the head as well."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Embedding(50, 16)
        self.encoder = torch.nn.Module()
        self.encoder.embed_tokens = self.shared
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.encoder.embed_tokens(ids)))


def test_a_module_under_two_names_is_swapped_once_and_restored(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    base = _SharedModuleModel()
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    delta = qdelta.compress(base, ft, targets=["proj"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = base(ids)
    applied = qdelta.apply(base, delta)
    torch.testing.assert_close(applied.shared.weight, ft.shared.weight, rtol=0, atol=0)
    assert applied.encoder.embed_tokens.weight is applied.head.weight
    qdelta.unapply(applied)
    for key, value in base.state_dict().items():  # every name has its base bits back
        assert torch.equal(value, before[key]), key
    assert base.head.weight is base.shared.weight  # and the tie holds
    with torch.no_grad():
        assert torch.equal(base(ids), expected)
