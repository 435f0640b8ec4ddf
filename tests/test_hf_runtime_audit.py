"""MultiTenantModel on GPT-2, GPT-NeoX and OPT through what a serving process does
to it: base checkpoints loaded under loaded tenants, casts, copies, checkpoints,
eviction and tenants replaced by deltas of the other kind (packed vs whole),
sampling and threads, bad deltas, and the probe forward of batch_layout.

Every row is compared with its own dense model (``dense_reference``: the base
plus the planes decoded with numpy) or with the HF base model itself.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import qdelta
from qdelta import runtime
from test_hf_architectures import (
    VOCAB,
    build,
    dense_reference,
    finetune,
    logits,
    no_swaps,
    padded,
    prompts,
)

TOL = dict(rtol=1e-5, atol=1e-5)
NO_POSITIONS = {"opt": ("embed_positions",)}  # OPT's learned positions are not servable


def seeds(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 2**30, (n,), generator=gen).tolist()


def tenant(arch: str, base: nn.Module, seed: int, skip: tuple[str, ...] = (), **kw):
    ft = finetune(base, seed=seed, skip=NO_POSITIONS.get(arch, ()) + skip)
    return qdelta.compress(base, ft, **kw)


def assert_rows(out: torch.Tensor, ids: torch.Tensor, refs: list[nn.Module]) -> None:
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i].float(), logits(ref, ids[i : i + 1])[0], **TOL)


def serve(model: qdelta.MultiTenantModel, ids: torch.Tensor, who: list) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, who).logits.float()


# ---- a base checkpoint loaded under tenants with their own biases ----------------------


@pytest.mark.parametrize("arch", ["gpt2", "opt", "neox"])
def test_base_checkpoint_loaded_under_tenants_keeps_their_own_biases(arch, gen):
    """A tenant's full-precision bias beside a packed weight (GPT-2's Conv1D, OPT's and
    NeoX's Linear layers) is the tenant's value, as qdelta.merge writes it: loading
    another base checkpoint into the wrapped model must not shift it by the change of
    the base's bias (it was kept as tenant - old base, so it followed the base)."""
    s = seeds(gen, 3)
    base = build(arch, seed=s[0])
    norms = ("ln_", "layer_norm", "layernorm", "wte", "wpe", "embed")
    delta = tenant(arch, base, s[1], skip=norms)  # packed weights + their own biases
    assert any(k.endswith(("c_attn.bias", "fc1.bias", "dense.bias")) for k in delta.params)
    model = qdelta.MultiTenantModel(base, tenants={"t": delta})
    ids = torch.stack(prompts(s[2], (6, 6)))
    serve(model, ids, ["t", None])  # every tenant module swapped in
    other = build(arch, seed=s[2])
    model.model.load_state_dict(other.state_dict())  # strict
    assert_rows(serve(model, ids, ["t", None]), ids, [dense_reference(other, delta), other])


# ---- tenants of the other kind (packed vs full-precision) on one layer ---------------


@pytest.fixture
def gpt2_kinds(gen):
    """A GPT-2 base, a tenant whose c_attn is packed (the MLP's Conv1Ds whole) and
    one whose c_fc is packed (c_attn whole): they disagree on every Conv1D."""
    s = seeds(gen, 4)
    base = build("gpt2", seed=s[0])
    plain = copy.deepcopy(base)
    attn = tenant("gpt2", base, s[1], skip=("wte", "wpe"), targets=["c_attn"])
    mlp = tenant("gpt2", base, s[2], targets=["c_fc"])
    assert "transformer.h.0.attn.c_attn.weight" in mlp.params
    assert "transformer.h.0.attn.c_attn" in attn.layers
    ids = torch.stack(prompts(s[3], (6, 6)))
    return base, plain, attn, mlp, ids


def test_a_tenant_replaced_by_a_delta_of_the_other_kind(gpt2_kinds):
    """Re-adding a name with a delta of the other kind, or adding one after every
    tenant of the layer left, was refused as 'mixing' with the tenant that goes (or
    went) away: the emptied tenant modules kept deciding the layer's kind."""
    base, plain, attn, mlp, ids = gpt2_kinds
    model = qdelta.MultiTenantModel(base, tenants={"t": mlp})
    assert_rows(serve(model, ids, ["t", None]), ids, [dense_reference(plain, mlp), plain])
    model.add_tenant("t", attn)  # replaces t: no other tenant is on those layers
    assert_rows(serve(model, ids, ["t", None]), ids, [dense_reference(plain, attn), plain])
    model.remove_tenant("t")
    model.add_tenant("u", mlp)
    assert_rows(serve(model, ids, [None, "u"]), ids, [plain, dense_reference(plain, mlp)])
    assert model.model.state_dict().keys() == plain.state_dict().keys()


def test_batches_of_either_kind_served_in_turn(gpt2_kinds):
    """Whether a batch is served must not depend on what earlier batches loaded: a
    loaded tenant of the other kind, not in the batch, is evicted; both kinds in one
    batch stay refused before anything is loaded or evicted."""
    base, plain, attn, mlp, ids = gpt2_kinds
    refs = {"a": dense_reference(plain, attn), "m": dense_reference(plain, mlp), None: plain}
    model = qdelta.MultiTenantModel(base)
    model.add_tenant("a", attn)
    model.add_tenant("m", mlp)
    for who in (["a", None], ["m", "m"], [None, "a"], ["m", None]):
        assert_rows(serve(model, ids, who), ids, [refs[n] for n in who])
        assert model.loaded_tenants == [who[0] or who[1]]
    with pytest.raises(qdelta.QDeltaError, match=r"tenants \['m'\].*split the batch"):
        serve(model, ids, ["a", "m"])
    assert model.loaded_tenants == ["m"]
    assert_rows(serve(model, ids, ["m", None]), ids, [refs["m"], plain])


# ---- lifecycle: casts, checkpoints, copies, eviction ---------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "neox", "opt"])
def test_lifecycle_with_layernorm_and_conv1d_tenants(arch, gen, tmp_path):
    s = seeds(gen, 4)
    base = build(arch, seed=s[0])
    plain = copy.deepcopy(base)
    deltas = {"a": tenant(arch, base, s[1]), "b": tenant(arch, base, s[2])}
    refs = [dense_reference(plain, deltas["a"]), dense_reference(plain, deltas["b"]), plain]
    model = qdelta.MultiTenantModel(base, tenants=deltas)
    ids = torch.stack(prompts(s[3], (6, 6, 6)))
    who = ["a", "b", None]
    assert_rows(serve(model, ids, who), ids, refs)
    kinds = {type(m).__name__ for m in model.model.modules()}
    assert {"RowLayerNorm", "RoutedLinear"} <= kinds

    # The wrapped model's checkpoint is the base's: its keys once, its values.
    state = model.model.state_dict()
    assert list(state) == list(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())
    model.model.save_pretrained(tmp_path / "ckpt")
    again = type(plain).from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())

    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_rows(serve(clone, ids, who), ids, refs)

    # Measured tenant bytes: the LayerNorm tenants' weights and biases among them.
    norms = [m for m in model.model.modules() if type(m).__name__ == "RowLayerNorm"]
    per_norm = sum(n.tenant_nbytes() for n in norms)
    assert per_norm == sum(
        v.numel() * 4
        for d in deltas.values()
        for k, v in d.params.items()
        if "norm" in k or "ln" in k
    )
    assert model.memory()["tenant_bytes"] >= per_norm > 0

    model.double()
    assert_rows(serve(model, ids, who), ids, [copy.deepcopy(r).double() for r in refs])
    for dtype, tol in ((torch.float16, 5e-2), (torch.bfloat16, 2e-1)):
        model.to(dtype)
        out = serve(model, ids, who)
        for i, ref in enumerate(refs):
            want = logits(copy.deepcopy(ref).to(dtype), ids[i : i + 1])[0]
            torch.testing.assert_close(out[i], want, rtol=0, atol=tol)


def test_eviction_and_reload_under_a_budget(gen):
    s = seeds(gen, 5)
    base = build("opt", seed=s[0])
    plain = copy.deepcopy(base)
    names = ("a", "b", "c")
    deltas = {n: tenant("opt", base, seed) for n, seed in zip(names, s[1:4], strict=True)}
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    model = qdelta.MultiTenantModel(base)
    for n, d in deltas.items():
        model.add_tenant(n, d)
    sizes = [model._tenant_bytes(d) for d in deltas.values()]
    model.budget_bytes = sum(sizes) - 1  # two fit, not three
    ids = torch.stack(prompts(s[4], (5, 5)))
    for who in (["a", "b"], ["c", None], ["a", "c"], ["b", "b"], [None, "a"]):
        assert_rows(serve(model, ids, who), ids, [refs[n] for n in who])
        assert len(model.loaded_tenants) <= 2 and model.resident_bytes <= model.budget_bytes
    model.budget_bytes = None
    for n in names:
        model.remove_tenant(n)
    assert model.memory()["tenant_bytes"] == 0
    assert_rows(serve(model, ids, [None, None]), ids, [plain, plain])


# ---- generation -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_generation_rows_follow_their_dense_models(arch, gen):
    """Sampling with a seed, an EOS token, left padding, one row, a long prompt:
    every step's logits are the row's own dense model's on the tokens so far."""
    s = seeds(gen, 6)
    base = build(arch, seed=s[0])
    plain = copy.deepcopy(base)
    deltas = {"a": tenant(arch, base, s[1]), "b": tenant(arch, base, s[2])}
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    model = qdelta.MultiTenantModel(base, tenants=deltas)

    def check(rows, who, steps, **kw):
        ids, mask = padded(rows)
        out = model.generate(ids, who, steps, attention_mask=mask, return_logits=True, **kw)
        for i, name in enumerate(who):
            seq = torch.cat([rows[i], out.tokens[i, :-1]])
            want = logits(refs[name], seq[None])[0, len(rows[i]) - 1 :]
            torch.testing.assert_close(out.logits[i], want[: out.logits.shape[1]], **TOL)
        return out

    sampled = dict(do_sample=True, seed=s[3], top_k=20, temperature=0.9)
    first = check(prompts(s[4], (7, 2, 5)), ["a", None, "b"], 6, **sampled)
    again = check(prompts(s[4], (7, 2, 5)), ["a", None, "b"], 6, **sampled)
    assert torch.equal(first.tokens, again.tokens)  # the seed decides the samples
    eos = int(first.tokens[0, 1])
    out = check(prompts(s[4], (7, 2, 5)), ["a", None, "b"], 12, eos_token_id=eos, **sampled)
    assert (out.tokens[0, 1:] == eos).all()
    check(prompts(s[5], (1,)), ["b"], 4)
    check(prompts(s[5], (100, 30)), ["a", "b"], 12)


def test_gpt2_generate_from_threads_gives_each_tenant_its_tokens(gen):
    s = seeds(gen, 4)
    base = build("gpt2", seed=s[0])
    deltas = {"a": tenant("gpt2", base, s[1]), "b": tenant("gpt2", base, s[2])}
    refs = {n: dense_reference(base, d) for n, d in deltas.items()} | {None: copy.deepcopy(base)}
    model = qdelta.MultiTenantModel(base, tenants=deltas)
    prompt = torch.stack(prompts(s[3], (6,)))
    want = {}
    for name, ref in refs.items():  # greedy decoding with the dense model, no cache
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, logits(ref, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        want[name] = seq[:, 6:]
    wrong: list[str] = []

    def run(name):
        try:
            for _ in range(4):
                got = model.generate(prompt, [name], 8).tokens
                if not torch.equal(got, want[name]):
                    wrong.append(f"{name}: {got.tolist()} != {want[name].tolist()}")
        except Exception as e:  # reported by the assert below
            wrong.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b", None) for _ in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a thread did not finish (deadlock?)"
    assert not wrong, wrong[:3]


# ---- bad deltas: a clear error before anything is swapped ----------------------------


def _biasless_gpt2(seed: int) -> nn.Module:
    model = build("gpt2", seed=seed)
    for block in model.transformer.h:
        norm = nn.LayerNorm(32, bias=False)
        with torch.no_grad():
            norm.weight.copy_(block.ln_1.weight)
        block.ln_1 = norm
    return model


def _relaid(delta: qdelta.Delta, name: str, transposed: bool) -> qdelta.Delta:
    bad = copy.deepcopy(delta)
    layer = bad.layers[name]
    bad.layers[name] = qdelta.PackedLayer(
        layer.planes, layer.scales, layer.shape, transposed=transposed
    )
    return bad


BAD = {
    "layernorm-shape": ("gpt2", "transformer.h.0.ln_1.weight", (31,), qdelta.ShapeError, r"\[32\]"),
    "layernorm-2d": ("gpt2", "transformer.h.1.ln_2.bias", (1, 32), qdelta.ShapeError, r"\[1, 32\]"),
    "layernorm-nan": (
        "opt",
        "model.decoder.final_layer_norm.bias",
        "nan",
        qdelta.NonFiniteError,
        "NaN",
    ),
    "conv1d-bias-inf": (
        "gpt2",
        "transformer.h.0.attn.c_attn.bias",
        "inf",
        qdelta.NonFiniteError,
        "NaN/Inf",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layernorm_and_conv1d_params_refused_before_any_swap(case, gen):
    arch, key, value, error, message = BAD[case]
    s = seeds(gen, 2)
    base = build(arch, seed=s[0])
    plain = copy.deepcopy(base)
    delta = tenant(arch, base, s[1])
    shape = delta.params[key].shape
    if value in ("nan", "inf"):
        bad = delta.params[key].clone()
        bad[int(torch.randint(0, shape[0], (1,), generator=gen))] = float(value)
    else:
        bad = torch.randn(value, generator=gen)
    delta.params[key] = bad
    model = qdelta.MultiTenantModel(base)
    with pytest.raises(error, match=message) as err:
        model.add_tenant("t", delta)
    assert key in str(err.value)
    assert no_swaps(model.model) and model.tenants == []
    ids = torch.stack(prompts(s[1], (5, 5)))
    assert_rows(serve(model, ids, [None, None]), ids, [plain, plain])


def test_a_bias_for_a_norm_without_one_refused(gen):
    s = seeds(gen, 2)
    base = _biasless_gpt2(s[0])
    plain = copy.deepcopy(base)
    delta = tenant("gpt2", base, s[1])
    ref = dense_reference(plain, delta)
    delta.params["transformer.h.0.ln_1.bias"] = torch.randn(32, generator=gen)
    model = qdelta.MultiTenantModel(base)
    with pytest.raises(qdelta.ShapeError, match=r"no parameter 'transformer\.h\.0\.ln_1\.bias'"):
        model.add_tenant("t", delta)
    assert no_swaps(model.model)
    del delta.params["transformer.h.0.ln_1.bias"]
    model.add_tenant("t", delta)  # the norm without a bias: served per row
    ids = torch.stack(prompts(s[1], (5, 5)))
    assert_rows(serve(model, ids, ["t", None]), ids, [ref, plain])


@pytest.mark.parametrize(
    ("arch", "layer", "transposed", "want"),
    [
        ("gpt2", "transformer.h.0.attn.c_attn", False, "a Conv1D .* transposed=True; found "),
        ("opt", "model.decoder.layers.0.fc1", True, "an nn.Linear .* transposed=False; found "),
        ("opt", "model.decoder.layers.1.self_attn.q_proj", True, "nn.Linear .*=False; found "),
    ],
)
def test_a_delta_packed_for_the_other_layout_is_named_as_such(arch, layer, transposed, want, gen):
    """A Conv1D's delta not transposed, a Linear's transposed (even a square one, whose
    shape fits): a ShapeError saying which layout the base has and which was found."""
    s = seeds(gen, 2)
    base = build(arch, seed=s[0])
    plain = copy.deepcopy(base)
    delta = _relaid(tenant(arch, base, s[1]), layer, transposed)
    model = qdelta.MultiTenantModel(base)
    with pytest.raises(qdelta.ShapeError, match=want) as err:
        model.add_tenant("t", delta)
    assert layer in str(err.value) and f"transposed={transposed}" in str(err.value)
    assert no_swaps(model.model) and model.tenants == []
    ids = torch.stack(prompts(s[1], (5, 5)))
    assert_rows(serve(model, ids, [None, None]), ids, [plain, plain])


# ---- the probe forward (batch_layout) ----------------------------------------------------


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class FlatLM(nn.Module):
    """A toy causal LM whose middle layer sees [batch * seq, d], batch first (as OPT's
    MLP does), and whose forward takes no ``use_cache``; ``fail`` makes it raise
    on a batch of two sequences."""

    def __init__(self, d: int = 16, fail: bool = False) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": VOCAB})()
        self.embed = nn.Embedding(VOCAB, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB)
        self.fail = fail

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if self.fail and input_ids.shape[0] == 2 and not torch.is_grad_enabled():
            raise RuntimeError("this model cannot run that batch")
        h = self.embed(input_ids)
        b, t, d = h.shape
        h = self.mid(h.reshape(b * t, d)).reshape(b, t, d)
        return _Out(self.head(torch.tanh(h)))


def _flat_parts(gen: torch.Generator, fail: bool = False):
    torch.manual_seed(seeds(gen, 1)[0])
    base = FlatLM(fail=fail)
    plain = copy.deepcopy(base)
    delta = qdelta.compress(base, finetune(base, seed=seeds(gen, 1)[0]), targets=["mid", "head"])
    ids = torch.randint(0, VOCAB, (3, 5), generator=gen)
    return base, plain, delta, ids


def test_probe_runs_a_forward_without_use_cache(gen):
    """A model whose forward has no use_cache keyword was probed with one, the probe
    failed, and its flattened layer refused per-row tenants it can be given."""
    base, plain, delta, ids = _flat_parts(gen)
    model = qdelta.MultiTenantModel(base, tenants={"t": delta})
    out = model.forward(ids, ["t", None, "t"]).logits
    assert model._layouts().flat == {"mid"}
    ref = dense_reference(plain, delta)
    for i, who in enumerate((ref, plain, ref)):
        torch.testing.assert_close(out[i], who(ids[i : i + 1]).logits[0], **TOL)


def test_probe_failing_forward_refuses_and_keeps_serving(gen):
    base, plain, delta, ids = _flat_parts(gen, fail=True)
    model = qdelta.MultiTenantModel(base, tenants={"t": delta})
    with pytest.raises(qdelta.ShapeError, match="reshapes the batch"):
        model.forward(ids, ["t", None, "t"])
    assert model._layouts().flat == set()
    torch.testing.assert_close(model.forward(ids, [None] * 3).logits, plain(ids).logits, **TOL)
    # One tenant for the whole batch has no order to get wrong.
    got = model.forward(ids, ["t"] * 3).logits
    torch.testing.assert_close(got, dense_reference(plain, delta)(ids).logits, **TOL)


def test_probe_runs_once_per_model(gen, monkeypatch):
    calls = []
    real = runtime.probe_layouts
    monkeypatch.setattr(runtime, "probe_layouts", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = seeds(gen, 3)
    base = build("opt", seed=s[0])
    plain = copy.deepcopy(base)
    delta = tenant("opt", base, s[1])
    model = qdelta.MultiTenantModel(base).half()  # probed in float16
    model.add_tenant("t", delta)
    ids = torch.stack(prompts(s[2], (5, 5)))
    out = serve(model, ids, ["t", None])
    ref = dense_reference(plain, delta).half()
    for i, who in enumerate((ref, plain.half())):
        torch.testing.assert_close(out[i], logits(who, ids[i : i + 1])[0], rtol=0, atol=5e-2)
    assert "model.decoder.layers.0.fc1" in model._layouts().flat
    model.remove_tenant("t")
    model.add_tenant("t", delta)
    model.float()
    serve(copy.deepcopy(model), ids, ["t", None])
    assert len(calls) == 1
    # Back in float32 (the weights rounded through float16, as plain's are); not bit
    # for bit: a batch of two and a batch of one may take different BLAS blockings.
    torch.testing.assert_close(
        serve(model, ids, [None, None])[0], logits(plain.float(), ids[:1])[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("arch", "ce", "scale"),
    [("llama", False, "matrix"), ("llama", True, "row"), ("gpt2", True, "matrix")],
)
def test_resident_bytes_are_the_loaded_tensors_bytes(arch, ce, scale):
    """The budget's count is what the loaded tensors take (scales held per plane and
    row, whatever the file's granularity; a layer's stack padded to its deepest
    tenant), as tenants of one and three planes come and go."""
    from qdelta.tenant_modules import TenantModule

    base = build(arch)
    deltas = {
        n: qdelta.compress(
            base, finetune(base, seed=s), compress_embeddings=ce, scale=scale, bits=bits
        )
        for n, s, bits in (("a", 1, 1), ("b", 2, 1), ("deep", 3, 3))
    }
    model = qdelta.MultiTenantModel(base)
    for name, delta in deltas.items():
        model.add_tenant(name, delta)  # registered, loaded on first use

    def held() -> int:
        return sum(m.tenant_nbytes() for m in model.model.modules() if isinstance(m, TenantModule))

    model.preload(["a", "b"])
    shallow = model.resident_bytes
    assert shallow == held()
    model.preload(["deep"])  # a and b now sit three planes deep
    assert model.resident_bytes == held() > shallow + model._tenant_bytes(deltas["deep"])
    model.remove_tenant("deep")
    assert model.resident_bytes == held() == shallow


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class GatheredTokensLM(nn.Module):
    """A toy causal LM with one mixture-of-experts style layer: ``expert`` runs on
    the tokens with an even id only, gathered from the whole batch (their count has
    nothing to do with the batch size, though it may equal it)."""

    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab})()
        self.embed = nn.Embedding(vocab, d)
        self.expert = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        h = self.embed(input_ids)
        flat = h.reshape(-1, h.shape[-1])
        picked = (input_ids.reshape(-1) % 2 == 0).nonzero().squeeze(1)
        mixed = flat.clone()
        mixed[picked] = flat[picked] + self.expert(flat[picked])
        return _Out(self.head(torch.tanh(mixed.reshape(h.shape))))


def test_gathered_token_rows_are_never_taken_for_the_batch():
    """The expert sees as many rows as the batch has sequences, but they are two
    tokens of the *second* sequence: routing them as batch rows would give the
    first row's tenant to the second row's tokens. The probe marks the layer, so a
    mixed batch is refused; a batch of one tenant is served exactly."""
    torch.manual_seed(0)
    base = GatheredTokensLM()
    plain = copy.deepcopy(base)
    delta = qdelta.compress(base, finetune(base), targets=["expert", "head"])
    model = qdelta.MultiTenantModel(base, tenants={"t": delta})
    ids = torch.tensor([[1, 3, 5, 7, 9], [2, 11, 4, 13, 15]])  # even ids: two, both in row 1
    assert "expert" in model._layouts().other and "head" not in model._layouts().other
    with pytest.raises(qdelta.ShapeError, match="reshapes the batch"):
        model.forward(ids, ["t", None])
    ref = dense_reference(plain, delta)
    torch.testing.assert_close(model.forward(ids, ["t", "t"]).logits, ref(ids).logits, **TOL)
    torch.testing.assert_close(model.forward(ids, [None, None]).logits, plain(ids).logits, **TOL)


def test_budget_counts_the_planes_a_deep_tenant_adds_to_the_others():
    """Two tenants whose sizes alone fit a budget do not, when one is deeper: the
    stacks pad the shallow one to the deep one's planes, and that is counted."""
    from qdelta.tenant_modules import TenantModule

    base = build("llama")
    shallow = qdelta.compress(base, finetune(base, seed=1), bits=1)
    deep = qdelta.compress(base, finetune(base, seed=2), bits=3)
    alone = {}
    for name, delta in (("shallow", shallow), ("deep", deep)):
        alone[name] = qdelta.MultiTenantModel(copy.deepcopy(base), tenants={name: delta})
    budget = sum(m.resident_bytes for m in alone.values())
    model = qdelta.MultiTenantModel(base, budget_bytes=budget)
    model.add_tenant("shallow", shallow)
    model.add_tenant("deep", deep)
    ids = torch.stack(prompts(4, (5, 5)))
    with pytest.raises(qdelta.BudgetError, match="split the batch"):
        model.forward(ids, ["shallow", "deep"])
    model.forward(ids, ["shallow", None])
    model.forward(ids, ["deep", None])  # evicts shallow: both stacks would not fit
    assert model.loaded_tenants == ["deep"]
    held = sum(m.tenant_nbytes() for m in model.model.modules() if isinstance(m, TenantModule))
    assert model.resident_bytes == held <= budget
