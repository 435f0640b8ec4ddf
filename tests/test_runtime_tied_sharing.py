"""A tied embedding/head pair compressed with ``compress_embeddings=True`` is
resident once in MultiTenantModel: the embedding lookup reads its rows from the
head's MultiTenantLinear stack, and the budget counts the pair once.

Every row is compared with an independent dense model (the base plus the sign
planes decoded with numpy, ``dense_reference``); byte counts are computed here
from the packed tensors' shapes. Hidden sizes 36 and 40 leave the last packed
word of each row part padding; Gemma (hidden 32) has none, and a scaled lookup.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import qdelta  # noqa: E402
from qdelta.tenant_modules import PackedRowEmbedding, RoutedLinear  # noqa: E402
from test_hf_architectures import (  # noqa: E402
    VOCAB,
    _arch,
    assert_decoding_is_their_models,
    assert_rows_are_their_models,
    build,
    dense_reference,
    finetune,
    np_unpack,
    padded,
    prompts,
)

EMBEDDING = {
    "llama_tied": "model.embed_tokens",
    "gpt2": "transformer.wte",
    "opt": "model.decoder.embed_tokens",
    "gemma": "model.embed_tokens",
}
# Tenants: (bits, scale): one and two planes, both scale granularities.
KINDS = {"a": (1, "matrix"), "b": (2, "row"), "c": (1, "row")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tied(arch: str, seed: int = 0) -> nn.Module:
    """A tiny tied model; hidden sizes not a multiple of 32 except Gemma's."""
    T = transformers
    if arch == "gemma":
        return build(arch, seed)
    if arch == "llama_tied":
        cfg = T.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=40,
            head_dim=10,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        cls = T.LlamaForCausalLM
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=36, n_layer=2, n_head=4, n_positions=64)
        cfg.bos_token_id = cfg.eos_token_id = 0
        cls = T.GPT2LMHeadModel
    else:
        cfg = T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=36,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=36,
            pad_token_id=1,
        )
        cls = T.OPTForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norm weights off their init, as build() does
        g = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    assert model.get_submodule(EMBEDDING[arch]).weight is model.lm_head.weight
    return model


def tenant(arch: str, base: nn.Module, seed: int, bits: int, scale: str) -> qdelta.Delta:
    skip = ("embed_positions",) if arch == "opt" else ()  # OPT's positions: not servable
    ft = finetune(base, seed=seed, skip=skip)
    delta = qdelta.compress(base, ft, bits=bits, scale=scale, compress_embeddings=True)
    emb, head = delta.layers[EMBEDDING[arch]], delta.layers["lm_head"]
    assert np.array_equal(emb.planes, head.planes) and np.array_equal(emb.scales, head.scales)
    return delta


def tenants(arch: str, base: nn.Module) -> dict[str, qdelta.Delta]:
    return {n: tenant(arch, base, seed, *KINDS[n]) for seed, n in enumerate(KINDS, start=1)}


def layer_bytes(layer: qdelta.PackedLayer) -> int:
    """Bytes of one stack entry, from the shapes: uint32 words of ``ceil(in / 32)``
    per row and plane, and float32 scales per plane and row."""
    out, inp = layer.shape
    planes = layer.planes.shape[0]
    return planes * out * (-(-inp // 32)) * 4 + planes * out * 4


def param_bytes(delta: qdelta.Delta) -> int:
    return sum(v.numel() * 4 for v in delta.params.values())  # float32 bases


def together(deltas: dict[str, qdelta.Delta], names) -> int:
    """Bytes of these tenants' stacks, from the shapes: the tied pair once (under
    the embedding), every layer's entries as deep as its deepest tenant's."""
    count: dict[str, int] = {}
    depth: dict[str, int] = {}
    per_plane: dict[str, int] = {}
    params = 0
    for n in names:
        params += param_bytes(deltas[n])
        for k, lay in deltas[n].layers.items():
            if k == "lm_head":
                continue
            count[k] = count.get(k, 0) + 1
            depth[k] = max(depth.get(k, 0), lay.planes.shape[0])
            per_plane[k] = layer_bytes(lay) // lay.planes.shape[0]
    return params + sum(count[k] * depth[k] * per_plane[k] for k in count)


def wrappers(mtm: qdelta.MultiTenantModel, arch: str) -> tuple[PackedRowEmbedding, RoutedLinear]:
    emb, head = mtm._wrapped[EMBEDDING[arch]], mtm._wrapped["lm_head"]
    assert isinstance(emb, PackedRowEmbedding) and isinstance(head, RoutedLinear)
    return emb, head


def assert_shared(mtm: qdelta.MultiTenantModel, arch: str, names) -> None:
    """Those tenants' embedding rows come from the head's stack, nothing of the
    embedding's own holds them."""
    emb, head = wrappers(mtm, arch)
    assert set(emb._shared) == set(names) and all(t is head for t in emb._shared.values())
    assert set(names) <= set(head.tenants)
    if set(emb.tenants) == set(names):
        assert emb._stacked_planes is None and emb.tenant_nbytes() == 0


def untied_reference(base: nn.Module, delta: qdelta.Delta) -> nn.Module:
    """An untied copy of the base, each packed layer's decoded delta added to its
    own weight (a tied base whose tenant's embedding and head deltas differ)."""
    ref = copy.deepcopy(base)
    ref.lm_head.weight = nn.Parameter(ref.lm_head.weight.detach().clone())
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in delta.layers.items():
            d = torch.from_numpy(np_unpack(layer.planes, layer.scales, layer.shape)).float()
            ref.get_submodule(name).weight.add_(d.T if layer.transposed else d)
        for key, value in delta.params.items():
            params[key].copy_(value)
    return ref


@pytest.mark.parametrize("arch", ["llama_tied", "gpt2", "opt", *_arch("gemma")])
def test_mixed_rows_and_decoding_read_the_heads_stack(arch, monkeypatch):
    base = tied(arch)
    plain = copy.deepcopy(base)
    deltas = tenants(arch, base)
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    mtm = qdelta.MultiTenantModel(base, tenants=deltas)
    assert_shared(mtm, arch, "abc")
    emb, head = wrappers(mtm, arch)

    who = ["a", None, "b", "c"]
    rows = prompts(5, (6, 4, 5, 3))
    ids, mask = padded(rows)
    out = mtm.forward(ids, who, attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [refs[n] for n in who])
    # The Rust gather ran, on the head's own tensors (two planes deep: b pads a and c).
    assert emb._plan is not None
    ((planes, scales, _),) = emb._plan[0]
    assert planes is head.layer.planes and scales is head.layer.scales
    assert planes.shape[1] == 2

    gen = mtm.generate(ids, who, 4, attention_mask=mask, return_logits=True)
    assert_decoding_is_their_models(gen, rows, [refs[n] for n in who])

    # The torch form reads the same stack.
    monkeypatch.setattr(PackedRowEmbedding, "_rowwise", lambda self, ids, local: None)
    out = mtm.forward(ids, who, attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [refs[n] for n in who])


@pytest.mark.parametrize("bits", [1, 2])
def test_budget_counts_the_tied_pair_once(bits):
    base = tied("llama_tied")
    plain = copy.deepcopy(base)
    delta = tenant("llama_tied", base, 1, bits, "row")
    emb = delta.layers[EMBEDDING["llama_tied"]]
    single = sum(layer_bytes(lay) for n, lay in delta.layers.items() if n != "lm_head")
    single += param_bytes(delta)
    both = single + layer_bytes(emb)

    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta})
    assert mtm.resident_bytes == single < both
    # Measured from the tensors the modules hold: one copy of the pair.
    assert mtm.memory()["tenant_bytes"] == single
    assert_shared(mtm, "llama_tied", "t")

    # A budget the one-stack count fits and the two-stack count would not.
    mtm = qdelta.MultiTenantModel(copy.deepcopy(plain), budget_bytes=single)
    mtm.add_tenant("t", delta)
    rows = prompts(2, (5, 3))
    ids, mask = padded(rows)
    out = mtm.forward(ids, ["t", None], attention_mask=mask).logits
    assert mtm.loaded_tenants == ["t"] and mtm.resident_bytes == single
    assert_rows_are_their_models(out, rows, [dense_reference(plain, delta), plain])


def test_lru_eviction_removal_and_readding_keep_rows_on_their_tenants():
    arch = "gpt2"
    base = tied(arch)
    plain = copy.deepcopy(base)
    deltas = tenants(arch, base)
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    # Room for two tenants (a pads to b's two planes) at one stack each, not for
    # two of them at two stacks, nor for three.
    budget = together(deltas, ["a", "b"])
    emb_bytes = layer_bytes(deltas["b"].layers[EMBEDDING[arch]])
    assert budget < budget + 2 * emb_bytes and together(deltas, "abc") > budget
    assert together(deltas, ["b", "c"]) <= budget and together(deltas, ["a", "c"]) <= budget
    mtm = qdelta.MultiTenantModel(base, budget_bytes=budget)
    for n, d in deltas.items():
        mtm.add_tenant(n, d)
    rows = prompts(9, (5, 3, 4))

    def check(who: list[str | None]) -> None:
        ids, mask = padded(rows[: len(who)])
        out = mtm.forward(ids, who, attention_mask=mask).logits
        assert_rows_are_their_models(out, rows[: len(who)], [refs[n] for n in who])
        assert mtm.resident_bytes == together(deltas, mtm.loaded_tenants)
        assert mtm.budget_bytes is None or mtm.resident_bytes <= mtm.budget_bytes
        assert_shared(mtm, arch, mtm.loaded_tenants)

    check(["a", "b", None])
    check(["c", None])  # evicts a (least recently used)
    assert mtm.loaded_tenants == ["b", "c"]
    check(["a", "c"])  # evicts b; a comes back on the freed slot
    assert mtm.loaded_tenants == ["c", "a"]
    check(["b", "a", None])  # evicts c
    # Removing the tenant whose planes sit first moves the others' stack slots up.
    head = wrappers(mtm, arch)[1]
    first, other = sorted(mtm.loaded_tenants, key=head.stack_slot)
    assert (head.stack_slot(first), head.stack_slot(other)) == (0, 1)
    mtm.remove_tenant(first)
    assert head.stack_slot(other) == 0
    check([other, None])
    # Re-adding a name replaces its delta (two planes now).
    replacement = tenant(arch, plain, 11, 2, "matrix")
    refs[first] = dense_reference(plain, replacement)
    deltas[first] = replacement
    mtm.budget_bytes = None
    mtm.add_tenant(first, replacement)
    check([first, other, None])
    mtm.add_tenant(other, deltas[other])  # re-adding a loaded tenant unloads it first
    check([other, first])


@pytest.mark.parametrize("how", ["untied fine-tune", "scales apart"])
def test_differing_tied_deltas_keep_a_stack_each(how):
    arch = "llama_tied"
    base = tied(arch)
    plain = copy.deepcopy(base)
    deltas = tenants(arch, base)
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    if how == "untied fine-tune":  # compress itself packs them apart
        ft = finetune(base, seed=7)
        with torch.no_grad():
            ft.lm_head.weight = nn.Parameter(ft.lm_head.weight + 0.05 * torch.randn(VOCAB, 40))
        odd = qdelta.compress(base, ft, bits=2, compress_embeddings=True)
    else:  # e.g. scales distilled apart
        odd = tenant(arch, base, 7, 2, "row")
        head = odd.layers["lm_head"]
        odd.layers["lm_head"] = qdelta.PackedLayer(head.planes, head.scales * 2, head.shape)
    emb_layer, head_layer = odd.layers[EMBEDDING[arch]], odd.layers["lm_head"]
    assert not np.array_equal(emb_layer.planes, head_layer.planes) or not np.array_equal(
        emb_layer.scales, head_layer.scales
    )
    refs["x"] = untied_reference(plain, odd)
    mtm = qdelta.MultiTenantModel(base, tenants={**deltas, "x": odd})
    emb, head = wrappers(mtm, arch)
    assert_shared(mtm, arch, "abc")
    assert emb._own == ["x"] and emb.tenant_nbytes() == layer_bytes(emb_layer)
    assert mtm._loaded["x"] == sum(layer_bytes(lay) for lay in odd.layers.values()) + param_bytes(
        odd
    )

    # One batch reads both stacks: x's own rows, the others' from the head.
    who = ["x", "a", None, "b"]
    rows = prompts(13, (4, 6, 3, 5))
    ids, mask = padded(rows)
    for fast in (True, False):
        if not fast:
            emb._rowwise = lambda ids, local: None
        out = mtm.forward(ids, who, attention_mask=mask).logits
        assert_rows_are_their_models(out, rows, [refs[n] for n in who])
    del emb._rowwise
    assert len(emb._plan[0]) == 2
    gen = mtm.generate(ids, who, 3, attention_mask=mask, return_logits=True)
    assert_decoding_is_their_models(gen, rows, [refs[n] for n in who])
    # Only the own-stack tenant left: the head's stack is not read.
    mtm.remove_tenant("a")
    mtm.remove_tenant("b")
    out = mtm.forward(ids[:2], ["x", "c"], attention_mask=mask[:2]).logits
    assert_rows_are_their_models(out, rows[:2], [refs["x"], refs["c"]])


def test_casts_and_copies_keep_one_stack():
    arch = "opt"
    base = tied(arch)
    plain = copy.deepcopy(base)
    deltas = {n: d for n, d in tenants(arch, base).items() if n in "ab"}
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    mtm = qdelta.MultiTenantModel(base, tenants=deltas)
    single = mtm.resident_bytes
    who = ["b", None, "a"]
    rows = prompts(21, (5, 3, 4))
    ids, mask = padded(rows)

    mtm.double()  # the torch form, in float64
    assert_shared(mtm, arch, "ab")
    # No padding: HF's float64 eager attention makes left-padded rows NaN by itself.
    same = torch.stack(prompts(22, (4, 4, 4)))
    out = mtm.forward(same, who).logits
    for i, n in enumerate(who):
        with torch.no_grad():
            want = copy.deepcopy(refs[n]).double()(input_ids=same[i : i + 1], use_cache=False)
        torch.testing.assert_close(out[i], want.logits[0], rtol=1e-5, atol=1e-5)
    mtm.float()
    assert_shared(mtm, arch, "ab")
    assert mtm.resident_bytes == single
    out = mtm.forward(ids, who, attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [refs[n] for n in who])

    twin = copy.deepcopy(mtm)
    head = wrappers(twin, arch)[1]
    assert head is not wrappers(mtm, arch)[1]
    assert_shared(twin, arch, "ab")
    out = twin.forward(ids, who, attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [refs[n] for n in who])


def test_untied_models_keep_their_own_table():
    base = build("llama")  # untied: the embedding and the head are two weights
    plain = copy.deepcopy(base)
    delta = qdelta.compress(base, finetune(base, seed=3), compress_embeddings=True)
    mtm = qdelta.MultiTenantModel(base, tenants={"u": delta})
    emb = mtm._wrapped["model.embed_tokens"]
    assert emb._own == ["u"] and not emb._shared
    assert mtm.resident_bytes == sum(map(layer_bytes, delta.layers.values())) + param_bytes(delta)
    rows = prompts(4, (5, 3))
    ids, mask = padded(rows)
    out = mtm.forward(ids, ["u", None], attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [dense_reference(plain, delta), plain])


def test_store_tenants_share_the_pair_they_map_once(tmp_path):
    arch = "gpt2"
    base = tied(arch)
    plain = copy.deepcopy(base)
    deltas = {n: d for n, d in tenants(arch, base).items() if n in "ab"}
    store = qdelta.DeltaStore(tmp_path)
    for n, d in deltas.items():
        assert store.add(n, d).format_version == 2
    mapped = store.open("b").to_delta().layers
    assert mapped[EMBEDDING[arch]].planes.ctypes.data == mapped["lm_head"].planes.ctypes.data
    mtm = qdelta.MultiTenantModel(base, store)
    rows = prompts(6, (4, 5, 3))
    ids, mask = padded(rows)
    out = mtm.forward(ids, ["b", None, "a"], attention_mask=mask).logits
    refs = [dense_reference(plain, deltas["b"]), plain, dense_reference(plain, deltas["a"])]
    assert_rows_are_their_models(out, rows, refs)
    assert_shared(mtm, arch, "ab")


def test_a_twin_that_cannot_serve_the_table_is_refused_naming_why():
    arch = "llama_tied"
    base = tied(arch)
    deltas = tenants(arch, base)
    mtm = qdelta.MultiTenantModel(base, tenants={"a": deltas["a"]})
    emb, head = wrappers(mtm, arch)
    packed = deltas["b"].layers[EMBEDDING[arch]]
    with pytest.raises(qdelta.QDeltaError, match=r"at slot 3.*found the tenant at slot None"):
        emb.add("b", packed, {}, 3, twin=head)  # b is not in the head's stack
    assert "b" not in emb.tenants
