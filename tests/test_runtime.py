"""MultiTenantModel: a mixed batch equals each tenant's merged dense model alone."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from tests.runtime_helpers import (
    greedy_alone,
    left_pad,
    make_delta,
    merged,
    perturbed,
    tiny_llama,
    trained,
)
from tests.tiny_models import one_thread

import qdelta
from qdelta import MultiTenantModel
from qdelta.stacks import HEADROOM

pytest.importorskip("transformers")

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def world():
    """A base, four real fine-tunes of it (different bits / scales / coverage), their deltas."""
    seed = int(np.random.default_rng().integers(1 << 30))
    base = tiny_llama(seed)
    deltas = {
        "noisy": make_delta(base, perturbed(base, seed + 1), bits=1),
        "trained": make_delta(base, trained(base, seed + 2), bits=2, scale="row"),
        "deep": make_delta(base, perturbed(base, seed + 3, 0.05), bits=3, scale="row"),
        # Touches only the last block and the final norm: other modules serve it the base.
        "partial": make_delta(
            base, perturbed(base, seed + 4, only=("layers.1.mlp", "model.norm")), bits=1
        ),
    }
    return base, deltas


@pytest.fixture(scope="module")
def oracle(world):
    base, deltas = world
    return {None: merged(base, None)} | {n: merged(base, d) for n, d in deltas.items()}


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _check_rows(gen, rows, prompts, oracle, steps=STEPS):
    for r, (tenant, prompt) in enumerate(zip(rows, prompts, strict=False)):
        want_tokens, want_logits = greedy_alone(oracle[tenant], prompt, steps)
        assert gen.tokens[r].tolist() == want_tokens, f"row {r} ({tenant})"
        torch.testing.assert_close(gen.logits[r], want_logits, atol=2e-4, rtol=1e-4)


def test_mixed_batch_equals_each_merged_model_alone(world, oracle):
    base, deltas = world
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    rows = ["noisy", None, "trained", "deep", "noisy", "partial", None, "deep"]
    prompts = _prompts(101, [5, 9, 3, 7, 1, 6, 4, 9], seed=1)
    ids, mask = left_pad(prompts)
    # Names and integer ids are interchangeable; rows of one tenant are not contiguous.
    as_ids = torch.tensor([-1 if t is None else model.tenant_id(t) for t in rows])
    for tenant_ids in (rows, as_ids):
        gen = model.generate(ids, tenant_ids, STEPS, attention_mask=mask, return_logits=True)
        assert gen.sequences.shape == (8, ids.shape[1] + STEPS)
        _check_rows(gen, rows, prompts, oracle)
    # Outside a request the wrapped model is exactly the base.
    x = torch.tensor([prompts[1]])
    torch.testing.assert_close(model.model(input_ids=x).logits, oracle[None](input_ids=x).logits)


def test_tenants_loaded_one_by_one_between_batches_are_each_served(world, oracle):
    """Each load grows the stacks in place (embeddings, norms, linears): a batch
    after each load, and after a tenant leaves and comes back, serves every
    loaded tenant as its merged model does (no stale bound arrays)."""
    base, deltas = world
    model = MultiTenantModel(base_copy(base))
    order = ["partial", "noisy", "deep", "trained"]
    prompts = _prompts(101, [4, 6, 3, 5, 2], seed=3)
    ids, mask = left_pad(prompts)

    def check(loaded):
        rows = [*loaded, None][: len(prompts)]
        rows += [loaded[0]] * (len(prompts) - len(rows))
        gen = model.generate(ids, rows, 2, attention_mask=mask, return_logits=True)
        _check_rows(gen, rows, prompts, oracle, steps=2)

    largest = max(model._tenant_bytes(d) for d in deltas.values())
    for i, name in enumerate(order):
        model.add_tenant(name, deltas[name])
        model.preload([name])
        check(order[: i + 1])
        # The spare rows are counted apart: at most a quarter more (one row at least).
        memory = model.memory()
        used, reserved = memory["tenant_bytes"], memory["tenant_reserved_bytes"]
        assert used == model.resident_bytes
        assert used <= reserved <= used * (1 + HEADROOM) + largest
    model.remove_tenant("noisy")
    check(["partial", "deep", "trained"])
    model.add_tenant("noisy", deltas["noisy"])
    model.preload(["noisy"])
    check(["noisy", "trained", "partial", "deep"])
    for name in order:
        model.remove_tenant(name)
    assert model.memory()["tenant_reserved_bytes"] == 0  # nothing held once all left


def test_a_load_that_fails_after_evicting_leaves_the_others_served(world, oracle, monkeypatch):
    """Evicting moves the last tenant's rows into the freed ones; a load that then
    fails still leaves every module's map pointing at the moved rows."""
    from qdelta import tenant_modules

    base, deltas = world
    model = MultiTenantModel(base_copy(base))
    for name in ("noisy", "trained", "deep"):
        model.add_tenant(name, deltas[name])
        model.preload([name])
    model.budget_bytes = model.resident_bytes  # "partial" needs "noisy" (the oldest) out
    model.add_tenant("partial", deltas["partial"])
    real = tenant_modules.RowRMSNorm.add

    def fail_for_partial(self, name, params):
        if name == "partial":
            raise MemoryError("out of memory (simulated)")
        return real(self, name, params)

    monkeypatch.setattr(tenant_modules.RowRMSNorm, "add", fail_for_partial)
    with pytest.raises(MemoryError):
        model.preload(["partial"])
    monkeypatch.undo()
    assert model.loaded_tenants == ["trained", "deep"]  # noisy evicted, partial not loaded
    prompts = _prompts(101, [4, 6, 3], seed=7)
    ids, mask = left_pad(prompts)
    rows = ["deep", "trained", None]
    gen = model.generate(ids, rows, 2, attention_mask=mask, return_logits=True)
    _check_rows(gen, rows, prompts, oracle, steps=2)


def base_copy(base):
    import copy

    return copy.deepcopy(base)


def test_deltas_are_real(world, oracle):
    """Guard against a vacuous oracle: every tenant changes the logits."""
    x = torch.tensor([[3, 14, 15, 92, 65]])
    ref = oracle[None](input_ids=x).logits
    for name in world[1]:
        assert (oracle[name](input_ids=x).logits - ref).abs().max() > 1e-2, name


def test_sampling_seeded_and_top_k(world):
    base, deltas = world
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    rows = ["noisy", "trained", None, "deep"]
    ids, mask = left_pad(_prompts(101, [4, 2, 6, 5], seed=2))
    kw = dict(attention_mask=mask, do_sample=True, temperature=0.8, seed=7)
    a = model.generate(ids, rows, 8, **kw).tokens
    b = model.generate(ids, rows, 8, **kw).tokens
    assert torch.equal(a, b)
    greedy = model.generate(ids, rows, 8, attention_mask=mask).tokens
    top1 = model.generate(ids, rows, 8, attention_mask=mask, do_sample=True, top_k=1, seed=3)
    assert torch.equal(top1.tokens, greedy)
    # top_k=3 draws only among each step's three best logits.
    gen = model.generate(ids, rows, 8, **kw, top_k=3, return_logits=True)
    best3 = gen.logits.topk(3, dim=-1).indices
    assert (best3 == gen.tokens[..., None]).any(-1).all()


def test_unseeded_sampling_follows_the_global_generator_without_reseeding_it(world):
    base, deltas = world
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    rows = ["noisy", None]
    ids, mask = left_pad(_prompts(101, [4, 2], seed=3))
    kw = dict(attention_mask=mask, do_sample=True, temperature=0.8)
    torch.manual_seed(123)
    a = model.generate(ids, rows, 6, **kw).tokens
    after_a = torch.rand(3)
    torch.manual_seed(123)
    b = model.generate(ids, rows, 6, **kw).tokens
    assert torch.equal(a, b)  # torch.manual_seed reproduces an unseeded call
    assert torch.equal(torch.rand(3), after_a)
    assert torch.initial_seed() == 123  # the global generator was advanced, not reseeded


def test_forward_with_a_kv_cache_continues_the_positions(world):
    """A cached step through forward (HF convention: the mask spans cached + new
    tokens) gives the logits of the whole sequence, left padding and tenants mixed."""
    base, deltas = world
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    rows = ["noisy", None, "deep"]
    ids, mask = left_pad(_prompts(101, [5, 3, 4], seed=12))
    step = torch.tensor([[7], [8], [9]])
    full_ids = torch.cat([ids, step], 1)
    full_mask = torch.cat([mask, torch.ones_like(step)], 1)
    want = model(full_ids, rows, attention_mask=full_mask).logits[:, -1]
    # This transformers version's keyword for the cache.
    kw = (
        "cache"
        if "cache" in inspect.signature(model.model.forward).parameters
        else "past_key_values"
    )
    first = model(ids, rows, attention_mask=mask, use_cache=True)
    cache = getattr(first, "cache", None) or first.past_key_values
    got = model(step, rows, attention_mask=full_mask, **{kw: cache}).logits[:, -1]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(qdelta.ShapeError, match=r"expected shape \[3, 7\] \(6 cached \+ 1 new"):
        model(step, rows, attention_mask=mask, **{kw: cache})
    with pytest.raises(qdelta.DTypeError, match="expected a transformers Cache"):
        model(step, rows, **{kw: ((torch.zeros(1),),)})


def test_eos_stops_rows(world, oracle):
    base, deltas = world
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    prompts = _prompts(101, [3, 5], seed=4)
    ids, mask = left_pad(prompts)
    first, _ = greedy_alone(oracle["noisy"], prompts[0], 1)
    gen = model.generate(ids, ["noisy", None], 5, attention_mask=mask, eos_token_id=first[0])
    assert (gen.tokens[0] == first[0]).all()


def test_lazy_loading_lru_budget_add_remove(world, oracle):
    base, deltas = world
    model = MultiTenantModel(base_copy(base))
    for name in ("noisy", "trained", "deep"):
        model.add_tenant(name, deltas[name])
    assert model.loaded_tenants == []  # lazy: nothing on the device yet
    sizes = {}
    for name in ("noisy", "trained", "deep"):
        single = MultiTenantModel(base_copy(base), tenants={name: deltas[name]})
        sizes[name] = single.resident_bytes
    assert sizes["trained"] <= sizes["deep"]  # 2 row planes vs 3
    # Room for noisy and deep together (noisy padded to deep's planes in the stacks).
    pair = MultiTenantModel(base_copy(base), tenants={n: deltas[n] for n in ("noisy", "deep")})
    assert pair.resident_bytes >= sizes["noisy"] + sizes["deep"]
    model.budget_bytes = pair.resident_bytes + 16
    prompts = _prompts(101, [4, 6], seed=5)
    ids, mask = left_pad(prompts)

    def serve(rows):
        gen = model.generate(ids, rows, STEPS, attention_mask=mask, return_logits=True)
        _check_rows(gen, rows, prompts, oracle)

    serve(["noisy", "trained"])
    assert model.loaded_tenants == ["noisy", "trained"]
    serve(["noisy", None])  # touches noisy: trained is now the oldest
    serve(["deep", "deep"])
    assert model.loaded_tenants == ["noisy", "deep"]
    assert model.resident_bytes <= model.budget_bytes
    serve(["trained", "noisy"])  # evicted tenants come back transparently
    assert set(model.loaded_tenants) == {"trained", "noisy"}
    # Remove and add while serving.
    model.remove_tenant("trained")
    with pytest.raises(qdelta.UnknownTenantError, match="trained"):
        model.generate(ids, ["trained", None], 1, attention_mask=mask)
    new_id = model.add_tenant("partial", deltas["partial"])
    serve(["partial", "noisy"])
    assert model.tenant_id("partial") == new_id
    # Re-adding a name replaces that tenant's delta.
    model.add_tenant("noisy", deltas["deep"])
    gen = model.generate(ids, ["noisy", None], STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, ["deep", None], prompts, oracle)


def test_bad_input_keeps_serving(world, oracle):
    base, deltas = world
    model = MultiTenantModel(base_copy(base), tenants={"noisy": deltas["noisy"]})
    prompts = _prompts(101, [5, 2], seed=6)
    ids, mask = left_pad(prompts)
    good = ["noisy", None]

    def still_serving():
        gen = model.generate(ids, good, STEPS, attention_mask=mask, return_logits=True)
        _check_rows(gen, good, prompts, oracle)

    still_serving()
    bad_calls = [
        (
            qdelta.UnknownTenantError,
            "nobody",
            lambda: model.generate(ids, ["nobody", None], 2, attention_mask=mask),
        ),
        (
            qdelta.UnknownTenantError,
            "id 99",
            lambda: model.generate(ids, [99, -1], 2, attention_mask=mask),
        ),
        (
            qdelta.ShapeError,
            "expected 2 entries",
            lambda: model.generate(ids, ["noisy"], 2, attention_mask=mask),
        ),
        (
            qdelta.ShapeError,
            "1-D",
            lambda: model.generate(ids, torch.zeros(2, 1, dtype=torch.long), 2),
        ),
        (qdelta.DTypeError, "float32", lambda: model.generate(ids, torch.tensor([0.0, -1.0]), 2)),
        (
            qdelta.DTypeError,
            "expected an int64, int32, int16, int8 or uint8 tensor, found torch.uint16",
            lambda: model.generate(ids, torch.tensor([0, 0], dtype=torch.uint16), 2),
        ),
        (qdelta.DTypeError, "sequence", lambda: model.generate(ids, "noisy", 2)),
        (qdelta.DTypeError, "float", lambda: model.generate(ids, [0.5, None], 2)),
        (
            qdelta.ShapeError,
            "left padding",
            lambda: model.generate(ids, good, 2, attention_mask=mask.flip(1)),
        ),
        (qdelta.ShapeError, "token ids", lambda: model.generate(ids + 1000, good, 2)),
        (qdelta.ShapeError, "max_new_tokens", lambda: model.generate(ids, good, 0)),
    ]
    for error, match, call in bad_calls:
        with pytest.raises(error, match=match):
            call()
        still_serving()

    # A delta made against another base: refused, the others keep serving.
    other = tiny_llama(int(np.random.default_rng().integers(1 << 30)))
    foreign = make_delta(other, perturbed(other, 1))
    with pytest.raises(qdelta.BaseMismatchError, match=foreign.base_fingerprint):
        model.add_tenant("foreign", foreign)
    assert "foreign" not in model.tenants
    still_serving()
    # A shape that does not fit the base.
    bad = qdelta.Delta({}, {"model.norm.weight": torch.ones(7)}, deltas["noisy"].base_fingerprint)
    with pytest.raises(qdelta.ShapeError, match=r"model.norm.weight"):
        model.add_tenant("bad", bad)
    still_serving()


def test_kept_tensors_are_counted_in_their_own_dtype_in_a_mixed_base():
    """A bf16 embedding beside float32 norms and head: the budget counts each kept
    tensor at its own size, as memory() measures it."""
    base = tiny_llama(3)
    base.model.embed_tokens.to(torch.bfloat16)
    delta = make_delta(base, perturbed(base, 4, only=("model.embed_tokens", "model.norm")))
    assert {v.dtype for v in delta.params.values()} == {torch.bfloat16, torch.float32}
    model = MultiTenantModel(base_copy(base), tenants={"t": delta})
    assert model.resident_bytes == model.memory()["tenant_bytes"] > 0
    with pytest.raises(qdelta.BudgetError, match=f"needs {model.resident_bytes} bytes"):
        tight = MultiTenantModel(base_copy(base), budget_bytes=model.resident_bytes - 1)
        tight.add_tenant("t", delta)
        tight.preload(["t"])


def test_lowering_the_budget_evicts_least_recently_used_at_once(world, oracle):
    base, deltas = world
    names = ("noisy", "trained", "partial")
    model = MultiTenantModel(base_copy(base), tenants={n: deltas[n] for n in names})
    assert model.loaded_tenants == list(names)
    last = MultiTenantModel(base_copy(base), tenants={"partial": deltas["partial"]})
    model.budget_bytes = last.resident_bytes  # room for the newest tenant alone
    assert model.loaded_tenants == ["partial"]
    assert model.resident_bytes == last.resident_bytes
    assert model.resident_bytes == model.memory()["tenant_bytes"]
    model.budget_bytes = 0
    assert model.loaded_tenants == [] and model.resident_bytes == 0
    # Evicted tenants stay registered and come back within a raised budget.
    model.budget_bytes = None
    prompts = _prompts(101, [3, 5], seed=9)
    ids, mask = left_pad(prompts)
    gen = model.generate(ids, ["trained", None], STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, ["trained", None], prompts, oracle)


def test_budget_too_small(world, oracle):
    base, deltas = world
    small = deltas["partial"]
    model = MultiTenantModel(base_copy(base), tenants={"small": small})
    fits = model.resident_bytes
    model.budget_bytes = fits
    model.add_tenant("big", deltas["deep"])
    model.add_tenant("small2", small)
    prompts = _prompts(101, [3, 4], seed=8)
    ids, mask = left_pad(prompts)
    with pytest.raises(qdelta.BudgetError, match="more than the whole budget"):
        model.generate(ids, ["big", None], 2, attention_mask=mask)
    with pytest.raises(qdelta.BudgetError, match="split the batch"):
        model.generate(ids, ["small", "small2"], 2, attention_mask=mask)
    gen = model.generate(ids, ["small", None], STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, ["partial", None], prompts, oracle)
    gen = model.generate(ids, [None, "small2"], STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, [None, "partial"], prompts, oracle)
    assert model.loaded_tenants == ["small2"]


def test_tied_embeddings_follow_their_twin():
    """With a tied head, a tenant's embedding table serves its head too."""
    base = tiny_llama(11, tie_word_embeddings=True)
    ft = perturbed(base, 12, only=("embed_tokens",))
    delta = make_delta(base, ft)
    delta.params.pop("lm_head.weight", None)  # only the embedding name: the head must follow
    assert list(delta.params) == ["model.embed_tokens.weight"]
    model = MultiTenantModel(base_copy(base), tenants={"t": delta})
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    gen = model.generate(ids, ["t", None], 4, attention_mask=mask, return_logits=True)
    oracle = {"t": merged(base, delta), None: base}
    _check_rows(gen, ["t", None], [[5, 6, 7], [8, 9]], oracle, steps=4)


def test_store_tenants_load_lazily_and_bad_files_do_not_stop_serving(world, oracle, tmp_path):
    base, deltas = world
    store = qdelta.DeltaStore(tmp_path / "store")
    for name in ("noisy", "trained", "partial"):
        store.add(name, deltas[name])
    other = tiny_llama(int(np.random.default_rng().integers(1 << 30)))
    store.add("foreign", make_delta(other, perturbed(other, 1)))
    model = MultiTenantModel(base_copy(base), store, tenants=["noisy"])
    assert sorted(model.tenants) == ["foreign", "noisy", "partial", "trained"]
    assert model.loaded_tenants == ["noisy"]
    prompts = _prompts(101, [4, 7, 2], seed=9)
    ids, mask = left_pad(prompts)
    rows = ["trained", None, "partial"]
    gen = model.generate(ids, rows, STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, rows, prompts, oracle)
    assert set(model.loaded_tenants) == {"noisy", "trained", "partial"}
    # The mismatched tenant fails at first use; the rest of the store keeps serving.
    with pytest.raises(qdelta.BaseMismatchError, match="foreign"):
        model.generate(ids, ["foreign", "noisy", None], 2, attention_mask=mask)
    rows = ["noisy", "partial", None]
    gen = model.generate(ids, rows, STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, rows, prompts, oracle)
    # A tenant added to the store while serving.
    store.add("deep", deltas["deep"])
    model.add_tenant("deep")
    rows = ["deep", "noisy", "deep"]
    gen = model.generate(ids, rows, STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, rows, prompts, oracle)
    with pytest.raises(qdelta.UnknownTenantError, match="ghost"):
        model.add_tenant("ghost")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    """A half-precision base: each row's logits match its merged model within dtype tolerance."""
    seed = int(np.random.default_rng().integers(1 << 30))
    base = tiny_llama(seed)
    deltas = {
        "a": make_delta(base, perturbed(base, seed + 1), bits=2, scale="row"),
        "b": make_delta(base, trained(base, seed + 2, steps=2), bits=1),
    }
    base = base.to(dtype)
    for d in deltas.values():
        d.base_fingerprint = qdelta.fingerprint(base.state_dict())
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    prompts = _prompts(101, [6, 3, 5], seed=10)
    ids, mask = left_pad(prompts)
    rows = ["a", None, "b"]
    logits = model(ids, rows, attention_mask=mask).logits[:, -1].float()
    for r, tenant in enumerate(rows):
        ref = merged(base, deltas.get(tenant))
        want = ref(input_ids=torch.tensor([prompts[r]])).logits[0, -1].float()
        torch.testing.assert_close(logits[r], want, atol=0.1, rtol=0.05)
        if tenant is not None:  # and nearer its own model than the base
            base_logits = base(input_ids=torch.tensor([prompts[r]])).logits[0, -1].float()
            assert (logits[r] - want).norm() < 0.5 * (logits[r] - base_logits).norm()


def test_serves_what_compress_produces(world, oracle):
    """A delta from qdelta.compress (default targets) serves like its merged model."""
    base, _ = world
    seed = int(np.random.default_rng().integers(1 << 30))
    ft = trained(base, seed, steps=2)
    delta = qdelta.compress(base, ft, bits=2, scale="row")
    model = MultiTenantModel(base_copy(base), tenants={"c": delta})
    prompts = _prompts(101, [5, 3], seed=12)
    ids, mask = left_pad(prompts)
    gen = model.generate(ids, ["c", None], STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, ["c", None], prompts, {"c": merged(base, delta), None: oracle[None]})


def test_packed_embeddings_and_head_are_served_per_row():
    """Tenants compressed with ``compress_embeddings=True`` (embedding table and head
    as sign planes too) in one batch with base rows: each row equals its tenant's
    merged dense model."""
    seed = int(np.random.default_rng().integers(1 << 30))
    base = tiny_llama(seed)
    deltas = {
        "a": qdelta.compress(base, perturbed(base, seed + 1), bits=1, compress_embeddings=True),
        "b": qdelta.compress(
            base, perturbed(base, seed + 2, 0.05), bits=2, scale="row", compress_embeddings=True
        ),
    }
    assert all("model.embed_tokens" in d.layers and "lm_head" in d.layers for d in deltas.values())
    oracle = {None: merged(base, None)} | {n: merged(base, d) for n, d in deltas.items()}
    x = torch.tensor([[3, 14, 15, 92, 65]])
    for name in deltas:  # the embedding delta is real: it changes the logits
        assert (
            oracle[name](input_ids=x).logits - oracle[None](input_ids=x).logits
        ).abs().max() > 1e-2
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    rows = ["a", None, "b", "a", "b"]
    prompts = _prompts(101, [4, 7, 2, 6, 5], seed=seed)
    ids, mask = left_pad(prompts)
    gen = model.generate(ids, rows, STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, rows, prompts, oracle)
    # Packed tables cost less resident memory than whole ones (same fine-tune).
    ft = perturbed(base, seed + 1)
    sizes = {}
    for form, delta in (("packed", deltas["a"]), ("whole", make_delta(base, ft))):
        m = MultiTenantModel(base_copy(base), tenants={"a": delta})
        m.preload(["a"])
        sizes[form] = m.memory()["tenant_bytes"]
    assert sizes["packed"] < sizes["whole"] / 2, sizes


def test_packed_embedding_tenants_loaded_one_by_one_are_each_served():
    """Packed embedding tables (untied head) loaded one by one: a shallower tenant
    goes into the deeper stack's spare rows, a deeper one restacks; after each
    load and after a removal every row equals its tenant's merged model."""
    seed = int(np.random.default_rng().integers(1 << 30))
    base = tiny_llama(seed)
    bits = {"two": 2, "one": 1, "two_b": 2, "one_b": 1}
    deltas = {
        name: qdelta.compress(
            base, perturbed(base, seed + i + 1), bits=b, scale="row", compress_embeddings=True
        )
        for i, (name, b) in enumerate(bits.items())
    }
    oracle = {None: merged(base, None)} | {n: merged(base, d) for n, d in deltas.items()}
    model = MultiTenantModel(base_copy(base))
    prompts = _prompts(101, [3, 5, 4, 2, 6], seed=seed)
    ids, mask = left_pad(prompts)

    def check(loaded):
        rows = ([None, *loaded] * 5)[: len(prompts)]
        gen = model.generate(ids, rows, 2, attention_mask=mask, return_logits=True)
        _check_rows(gen, rows, prompts, oracle, steps=2)

    for i, name in enumerate(bits):
        model.add_tenant(name, deltas[name])
        model.preload([name])
        check(list(bits)[: i + 1])
    model.remove_tenant("one")
    check(["two", "two_b", "one_b"])


def test_inference_mode_serves_the_same_tokens_through_the_shortcuts(world, oracle):
    """Serving code often runs under torch.inference_mode(): the tenants loaded and
    the routing tensors made there still carry version counters, so the modules'
    per-batch shortcuts (row slots, bound fused calls) are kept, not rebuilt."""
    from qdelta.kernels import cpu
    from qdelta.tenant_modules import RoutedLinear

    base, deltas = world
    model = MultiTenantModel(base_copy(base), tenants=deltas)
    rows = ["noisy", None, "trained", "deep"]
    prompts = _prompts(101, [5, 9, 3, 7], seed=3)
    ids, mask = left_pad(prompts)
    with torch.inference_mode():
        gen = model.generate(ids, rows, STEPS, attention_mask=mask, return_logits=True)
    _check_rows(gen, rows, prompts, oracle)
    routed = [m for m in model.model.modules() if isinstance(m, RoutedLinear)]
    assert routed and all(not m.layer.planes.is_inference() for m in routed)
    if cpu.ISA == "avx512":
        assert any(m.layer._plan is not None for m in routed)
