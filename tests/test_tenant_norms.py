"""Norm layers under per-row tenants: the probes that recognise them (small and zero
epsilons, every common dtype, and the modules they must not take), a base norm
without a ``bias`` attribute (Cohere's LayerNorm), tenant modules that add a
tenant all or nothing, and whole models (Cohere, GPT-2 with eps 1e-12) whose
mixed-tenant rows equal each tenant's own dense model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

import qdelta  # noqa: E402
from qdelta import stacks, tenant_modules  # noqa: E402
from qdelta.tenant_modules import (  # noqa: E402
    PackedRowEmbedding,
    Route,
    RowEmbedding,
    RowLayerNorm,
    RowLinear,
    RowRMSNorm,
    layer_norm_form,
    norm_probe_finding,
    rms_norm_form,
)
from test_hf_architectures import (  # noqa: E402
    build,
    dense_reference,
    finetune,
    logits,
    padded,
    prompts,
)

TOL = dict(rtol=1e-5, atol=1e-5)
EPSILONS = [0.0, 1e-14, 1e-12, 1e-10, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---- modules the probes must refuse ---------------------------------------------------


class OtherEps(nn.LayerNorm):
    """Says ``eps`` but computes with ``true_eps``."""

    def __init__(self, d: int, eps: float, true_eps: float) -> None:
        super().__init__(d, eps=eps)
        self.true_eps = true_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.true_eps)


class OtherEpsRMS(LlamaRMSNorm):
    def __init__(self, d: int, eps: float, true_eps: float) -> None:
        super().__init__(d, eps=eps)
        self.true_eps = true_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.true_eps))


class BatchStatistics(nn.LayerNorm):
    """Mean and variance over the whole input, not per row: rows mix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean()
        return (x - m) / torch.sqrt(((x - m) ** 2).mean() + self.eps) * self.weight + self.bias


class SlightlyMixing(nn.LayerNorm):
    """A LayerNorm plus a small term from the other rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1e-3 * x.mean(0, keepdim=True)


def _other(eps: float, factor: float) -> float:
    return eps * factor if eps else 1e-13


# ---- the probes -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", EPSILONS)
def test_layer_norm_probe_takes_small_epsilons(eps, dtype):
    """nn.LayerNorm with and without a bias and Cohere's LayerNorm (no bias attribute
    at all), eps from 0 to 1e-3 (BERT, RoBERTa, BioGPT: 1e-12), in every dtype."""
    for d in (8, 32, 1024):
        assert layer_norm_form(nn.LayerNorm(d, eps=eps).to(dtype)) == eps
        assert layer_norm_form(nn.LayerNorm(d, eps=eps, bias=False).to(dtype)) == eps
        assert layer_norm_form(CohereLayerNorm(d, eps=eps).to(dtype)) == eps
        assert rms_norm_form(nn.LayerNorm(d, eps=eps).to(dtype)) is None
        assert rms_norm_form(nn.LayerNorm(d, eps=eps, bias=False).to(dtype)) is None
        assert rms_norm_form(CohereLayerNorm(d, eps=eps).to(dtype)) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", EPSILONS)
def test_rms_norm_probe_takes_small_epsilons(eps, dtype):
    for d in (8, 32, 1024):
        assert rms_norm_form(LlamaRMSNorm(d, eps=eps).to(dtype)) == (0.0, eps)
        assert rms_norm_form(GemmaRMSNorm(d, eps=eps).to(dtype)) == (1.0, eps)
        assert layer_norm_form(LlamaRMSNorm(d, eps=eps).to(dtype)) is None
        assert layer_norm_form(GemmaRMSNorm(d, eps=eps).to(dtype)) is None


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-8, 1e-6, 1e-5, 1e-3])
def test_probes_refuse_what_no_per_row_formula_stands_in_for(eps):
    d = 32
    refused = {
        "statistics over the batch": BatchStatistics(d, eps=eps),
        "a term from the other rows": SlightlyMixing(d, eps=eps),
        "no weight": nn.LayerNorm(d, eps=eps, elementwise_affine=False),
        "twice the eps it says": OtherEps(d, eps, _other(eps, 2.0)),
        "1.1 times the eps it says": OtherEps(d, eps, _other(eps, 1.1)),
        "another eps entirely": OtherEps(d, eps, 1e-5 if eps != 1e-5 else 1e-3),
    }
    for what, module in refused.items():
        assert layer_norm_form(module) is None, what
        assert rms_norm_form(module) is None, what
    for factor in (2.0, 1.1):
        module = OtherEpsRMS(d, eps, _other(eps, factor))
        assert rms_norm_form(module) is None, factor
        assert layer_norm_form(module) is None, factor
        with pytest.raises(qdelta.QDeltaError, match="RMSNorm"):
            RowRMSNorm(module, Route())
    with pytest.raises(qdelta.QDeltaError, match="LayerNorm"):
        RowLayerNorm(OtherEps(d, eps, _other(eps, 2.0)), Route())


def test_probe_finding_says_what_was_found():
    assert norm_probe_finding(nn.LayerNorm(8, eps=1e-12)) == (
        "a LayerNorm ((x - mean) / std * w + b, eps 1e-12)"
    )
    assert "RMSNorm" in norm_probe_finding(LlamaRMSNorm(8, eps=1e-12))
    assert "(1 + w)" in norm_probe_finding(GemmaRMSNorm(8))
    found = norm_probe_finding(OtherEps(8, 1e-12, 1e-5))
    assert found.startswith("an output on a probe input that is neither") and "1e-12" in found
    assert "not one value per feature" in norm_probe_finding(CohereLayerNorm((4, 8)))
    assert "no floating-point weight" in norm_probe_finding(
        nn.LayerNorm(8, elementwise_affine=False)
    )


# ---- per-row norms: small eps, no bias attribute --------------------------------------


def _reference_layer_norm(x: torch.Tensor, w, b, eps: float) -> torch.Tensor:
    """Float64 (x - mean) / sqrt(var + eps) * w + b, from nothing of the module's."""
    x = x.double()
    out = (
        (x - x.mean(-1, keepdim=True))
        / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        * w.double()
    )
    return out if b is None else out + b.double()


@pytest.mark.parametrize("make", ["layernorm", "cohere"])
@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-7, 1e-5])
def test_layer_norm_rows_at_small_eps_follow_their_tenants(make, eps, gen):
    """Rows whose variance is about eps (where it decides the result), per tenant,
    against float64 math on fresh random weights; a base without a bias attribute
    (Cohere) has tenants with weights only."""
    d = 40
    base = nn.LayerNorm(d, eps=eps) if make == "layernorm" else CohereLayerNorm(d, eps=eps)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(d, generator=gen))
    route = Route()
    norm = RowLayerNorm(base, route)
    assert norm.eps == eps
    changes = ("weight", "bias") if make == "layernorm" else ("weight",)
    tenants = {n: {c: torch.randn(d, generator=gen) for c in changes} for n in ("t", "u")}
    for name, params in tenants.items():
        norm.add(name, params)
    norm.set_slots({"t": 0, "u": 1}, capacity=2)
    route.slots = torch.tensor([1, -1, 0, 1])
    scale = max(eps, 1e-12) ** 0.5
    x = torch.randn(4, 3, d, generator=gen) * 2 + 0.5
    x[:, 1:] *= scale  # positions 1, 2: variance about eps
    x[:, 2] /= 10
    with torch.no_grad():
        got = norm(x)
    for r, who in enumerate(("u", None, "t", "u")):
        own = {} if who is None else tenants[who]
        w = own.get("weight", base.weight.detach())
        b = own.get("bias", getattr(base, "bias", None))
        want = _reference_layer_norm(x[r], w, None if b is None else b.detach(), eps)
        torch.testing.assert_close(got[r].double(), want, **TOL)
    assert norm.tenant_nbytes() == 2 * len(changes) * d * 4


def test_a_bias_for_a_norm_without_one_is_refused_and_nothing_added(gen):
    norm = RowLayerNorm(CohereLayerNorm(8), Route())
    with pytest.raises(qdelta.QDeltaError, match="bias"):
        norm.add("t", {"weight": torch.randn(8, generator=gen), "bias": torch.zeros(8)})
    assert norm.tenants == [] and norm._weights == [] and norm._biases == []


# ---- all or nothing -------------------------------------------------------------------


class _BiasFails(dict):
    """Tenant params whose bias cannot be read (an error while building the tenant)."""

    def get(self, key, default=None):
        if key == "bias":
            raise RuntimeError("injected: the bias could not be read")
        return super().get(key, default)


def _failing_stack(monkeypatch):
    """Growing a tenant stack fails (the packed embedding restacks with torch.stack,
    the others grow through qdelta.stacks)."""

    def stack(*args, **kwargs):
        raise RuntimeError("injected: out of memory")

    monkeypatch.setattr(torch, "stack", stack)
    monkeypatch.setattr(stacks, "appended", stack)


@pytest.mark.parametrize("kind", ["linear", "layernorm", "rmsnorm", "embedding", "packed"])
def test_a_tenant_module_adds_a_tenant_all_or_nothing(kind, gen, monkeypatch):
    """A failure while adding leaves the module as it was (still serving the tenants
    it had, as before); removing a name never (fully) added is safe."""
    d, vocab = 12, 9
    route = Route()
    if kind == "linear":
        module = RowLinear(nn.Linear(d, d), route)
        first = {"weight": torch.randn(d, d, generator=gen), "bias": torch.randn(d, generator=gen)}
        x = torch.randn(2, 3, d, generator=gen)
    elif kind == "layernorm":
        module = RowLayerNorm(nn.LayerNorm(d), route)
        first = {"weight": torch.randn(d, generator=gen), "bias": torch.randn(d, generator=gen)}
        x = torch.randn(2, 3, d, generator=gen)
    elif kind == "rmsnorm":
        module = RowRMSNorm(LlamaRMSNorm(d), route)
        first = {"weight": torch.randn(d, generator=gen)}
        x = torch.randn(2, 3, d, generator=gen)
    elif kind == "embedding":
        module = RowEmbedding(nn.Embedding(vocab, d), route)
        first = {"weight": torch.randn(vocab, d, generator=gen)}
        x = torch.randint(0, vocab, (2, 3), generator=gen)
    else:
        module = PackedRowEmbedding(nn.Embedding(vocab, d), route)
        planes, scales = qdelta.pack_residual(torch.randn(vocab, d, generator=gen), 2, "row")
        first = qdelta.PackedLayer(planes, scales, (vocab, d))
        x = torch.randint(0, vocab, (2, 3), generator=gen)

    def add(name, params, fail):
        if kind == "packed":
            if fail:
                _failing_stack(monkeypatch)
            module.add(name, params, {}, slot=len(module.tenants))
        elif fail and kind in ("linear", "layernorm"):
            module.add(name, _BiasFails(params))
        else:
            if fail:
                _failing_stack(monkeypatch)
            module.add(name, params)

    add("a", first, fail=False)
    module.set_slots({"a": 0}, capacity=1)
    route.slots = torch.tensor([0, -1])
    with torch.no_grad():
        before = module(x)
    with pytest.raises(RuntimeError, match="injected"):
        add("b", first, fail=True)
    monkeypatch.undo()
    assert module.tenants == ["a"]
    module.remove("b")  # never added: nothing to do, no IndexError
    module.remove("never")
    assert module.tenants == ["a"]
    module.set_slots({"a": 0}, capacity=1)
    with torch.no_grad():
        assert torch.equal(module(x), before)
    add("b", first, fail=False)  # the same name once the failure is gone
    assert module.tenants == ["a", "b"]
    with pytest.raises(qdelta.QDeltaError, match="already added"):
        add("b", first, fail=False)
    module.remove("a")
    module.remove("b")
    assert module.tenants == []


# ---- whole models ---------------------------------------------------------------------


def _cohere(seed: int = 0, **kw) -> nn.Module:
    return build("cohere", seed=seed, **kw)


def _gpt2_small_eps(seed: int = 0) -> nn.Module:
    return build("gpt2", seed=seed, layer_norm_epsilon=1e-12)


MODELS = {"cohere": _cohere, "gpt2_eps1e-12": _gpt2_small_eps}


def _seeds(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 2**30, (n,), generator=gen).tolist()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_mixed_tenants_equal_their_dense_models(arch, gen):
    """Two tenants changing every parameter (norms included) and the base in one
    left-padded batch: every row's logits, at every generated step, are its own
    dense model's (base + decoded deltas + full params, built independently)."""
    s = _seeds(gen, 4)
    base = MODELS[arch](s[0])
    plain = copy.deepcopy(base)
    deltas = {
        n: qdelta.compress(base, finetune(base, seed=k)) for n, k in zip("ab", s[1:3], strict=True)
    }
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    model = qdelta.MultiTenantModel(base, tenants=deltas)
    norms = [m for m in model.model.modules() if isinstance(m, RowLayerNorm)]
    assert norms and all(m.tenants == ["a", "b"] for m in norms)
    if arch.startswith("gpt2"):
        assert {m.eps for m in norms} == {1e-12}
    rows = prompts(s[3], (7, 3, 5))
    ids, mask = padded(rows)
    who = ["a", None, "b"]
    out = model.generate(ids, who, 4, attention_mask=mask, return_logits=True)
    for i, name in enumerate(who):
        seq = torch.cat([rows[i], out.tokens[i, :-1]])
        want = logits(refs[name], seq[None])[0, len(rows[i]) - 1 :]
        torch.testing.assert_close(out.logits[i], want[: out.logits.shape[1]], **TOL)
    # The tenants' rows are not the base's: their norms and deltas really apply.
    first = logits(plain, rows[0][None])[0, -1]
    assert (out.logits[0, 0] - first).abs().max() > 1e-3


def test_a_tenant_failing_midway_leaves_the_others_served(gen, monkeypatch):
    """Loading tenant b fails in the middle (some of its modules already added, the
    failure while building one of Cohere's bias-less LayerNorms): the error is the
    original one, never an IndexError from the rollback, again on every retry; the
    model serves tenant a and the base as before, and b once the failure is gone."""
    s = _seeds(gen, 4)
    base = _cohere(s[0])
    plain = copy.deepcopy(base)
    deltas = {
        n: qdelta.compress(base, finetune(base, seed=k)) for n, k in zip("ab", s[1:3], strict=True)
    }
    refs = {n: dense_reference(plain, d) for n, d in deltas.items()} | {None: plain}
    model = qdelta.MultiTenantModel(base, tenants={"a": deltas["a"]})
    model.preload(["a"])
    target = "model.layers.1.input_layernorm"
    cast = qdelta.MultiTenantModel._cast

    def failing_cast(self, mname, attrs):
        out = cast(self, mname, attrs)
        return _BiasFails(out) if mname == target else out

    monkeypatch.setattr(qdelta.MultiTenantModel, "_cast", failing_cast)
    model.add_tenant("b", deltas["b"])
    ids = torch.stack(prompts(s[3], (6, 6, 6)))
    for _ in range(2):  # the first use, and a retry
        with pytest.raises(RuntimeError, match="injected") as raised:
            model(ids, ["a", "b", None])
        assert not isinstance(raised.value, IndexError)
        with pytest.raises(RuntimeError, match="injected"):
            model.generate(ids, ["b", "a", None], 2)
        assert model.loaded_tenants == ["a"]
        holding = [
            n
            for n, m in model.model.named_modules()
            if isinstance(m, tenant_modules.TenantModule) and "b" in m.tenants
        ]
        assert holding == []
        with torch.no_grad():
            out = model(ids, ["a", None, "a"]).logits.float()
        for i, name in enumerate(["a", None, "a"]):
            torch.testing.assert_close(out[i], logits(refs[name], ids[i : i + 1])[0], **TOL)
    monkeypatch.undo()
    with torch.no_grad():
        out = model(ids, ["b", "a", None]).logits.float()
    for i, name in enumerate(["b", "a", None]):
        torch.testing.assert_close(out[i], logits(refs[name], ids[i : i + 1])[0], **TOL)


def test_a_refused_norm_says_what_the_probe_found(gen):
    """A model whose final norm mixes rows is refused for a tenant that changes it,
    with the probe's finding in the message (not a bare 'expected LayerNorm')."""
    s = _seeds(gen, 2)
    base = _gpt2_small_eps(s[0])
    ln_f = base.transformer.ln_f
    mixing = BatchStatistics(ln_f.normalized_shape, eps=ln_f.eps)
    mixing.load_state_dict(ln_f.state_dict())
    base.transformer.ln_f = mixing
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.transformer.ln_f.weight.add_(0.1)
    delta = qdelta.compress(base, ft)
    model = qdelta.MultiTenantModel(base)
    with pytest.raises(
        qdelta.QDeltaError,
        match=r"per-row parameters of BatchStatistics \('transformer.ln_f'\).*found an output "
        r"on a probe input that is neither",
    ):
        model.add_tenant("t", delta)
        model.generate(torch.tensor([[1, 2, 3]]), ["t"], 1)
