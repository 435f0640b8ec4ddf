"""Architectures beyond Llama, on tiny offline Hugging Face models: Gemma's
(1 + w) RMSNorm and scaled embeddings, LayerNorms and GPT-2's Conv1D (GPT-2,
GPT-NeoX, OPT), tied embeddings, OPT's positional embedding, and ring attention
on the attention settings of these models (sliding windows, logit soft-capping).

Every result is compared with an independent dense reference (the base weights
plus the sign planes decoded with numpy here, not by qdelta) and with the HF
model's own forward.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import qdelta  # noqa: E402
from qdelta.ring.errors import RingError  # noqa: E402
from qdelta.tenant_modules import Route, RowRMSNorm, TenantModule  # noqa: E402

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _config(arch: str, **kw):
    T = transformers
    if arch == "gemma":
        return T.GemmaConfig(**COMMON, head_dim=8, **kw), T.GemmaForCausalLM
    if arch == "gemma2":
        cfg = dict(head_dim=8, sliding_window=4, attn_logit_softcapping=5.0)
        cfg.update(final_logit_softcapping=3.0, **kw)
        return T.Gemma2Config(**COMMON, **cfg), T.Gemma2ForCausalLM
    if arch == "gemma3":
        return T.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4, **kw), (
            T.Gemma3ForCausalLM
        )
    if arch == "llama_tied":
        return T.LlamaConfig(**COMMON, tie_word_embeddings=True, **kw), T.LlamaForCausalLM
    if arch == "llama":
        return T.LlamaConfig(**COMMON, tie_word_embeddings=False, **kw), T.LlamaForCausalLM
    if arch == "mistral":
        return T.MistralConfig(**COMMON, tie_word_embeddings=False, **kw), T.MistralForCausalLM
    if arch == "qwen2":
        return T.Qwen2Config(**COMMON, tie_word_embeddings=False, **kw), T.Qwen2ForCausalLM
    if arch == "opt":
        cfg = T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            pad_token_id=1,
            **kw,
        )
        return cfg, T.OPTForCausalLM
    if arch == "neox":
        cfg = T.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **kw,
        )
        return cfg, T.GPTNeoXForCausalLM
    if arch == "phi":
        cfg = T.PhiConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}, **kw)
        return cfg, T.PhiForCausalLM
    if arch == "falcon":
        cfg = T.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            bias=True,
            **kw,
        )
        return cfg, T.FalconForCausalLM
    if arch == "bloom":
        return T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **kw), (
            T.BloomForCausalLM
        )
    if arch == "bigcode":
        cfg = T.GPTBigCodeConfig(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **kw
        )
        return cfg, T.GPTBigCodeForCausalLM
    if arch == "gptj":
        cfg = T.GPTJConfig(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4, **kw
        )
        return cfg, T.GPTJForCausalLM
    if arch == "mixtral":
        cfg = T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, **kw)
        return cfg, T.MixtralForCausalLM
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **kw)
        cfg.bos_token_id = cfg.eos_token_id = 0
        return cfg, T.GPT2LMHeadModel
    if arch == "cohere":  # a LayerNorm without a bias attribute
        return T.CohereConfig(**COMMON, **kw), T.CohereForCausalLM
    raise KeyError(arch)


def _available(arch: str) -> bool:
    names = {
        "gemma2": "Gemma2ForCausalLM",
        "gemma3": "Gemma3ForCausalLM",
        "neox": "GPTNeoXForCausalLM",
        "phi": "PhiForCausalLM",
        "falcon": "FalconForCausalLM",
        "bloom": "BloomForCausalLM",
        "bigcode": "GPTBigCodeForCausalLM",
        "gptj": "GPTJForCausalLM",
        "mixtral": "MixtralForCausalLM",
    }
    return hasattr(transformers, names.get(arch, "LlamaForCausalLM"))


def _arch(*names: str) -> list:
    return [
        pytest.param(n, marks=pytest.mark.skipif(not _available(n), reason=f"no {n} here"))
        for n in names
    ]


def build(arch: str, seed: int = 0, **kw) -> nn.Module:
    cfg, cls = _config(arch, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Norm weights start at 1 (0 for Gemma): move them so the formula matters.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def finetune(base: nn.Module, seed: int = 1, skip: tuple[str, ...] = ()) -> nn.Module:
    """Every parameter (tied ones once: they stay tied) nudged, except names with ``skip``."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for name, p in ft.named_parameters():
        if not any(s in name for s in skip):
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.std() + 1e-2))
    return ft


def np_unpack(planes: np.ndarray, scales: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Independent decode of [P, out, W] uint32 sign planes (bit 1 = -1) to [out, in]."""
    out, inp = shape
    bits = np.unpackbits(
        planes.view(np.uint8).reshape(planes.shape[0], out, -1), axis=-1, bitorder="little"
    )[..., :inp]
    signs = 1.0 - 2.0 * bits.astype(np.float64)
    s = np.asarray(scales, dtype=np.float64)
    s = s[:, None, None] if s.ndim == 1 else s[:, :, None]
    return (signs * s).sum(0)


@torch.no_grad()
def dense_reference(base: nn.Module, delta: qdelta.Delta) -> nn.Module:
    """base + decoded planes (a tied tensor takes its delta once) + the whole params."""
    ref = copy.deepcopy(base)
    params = dict(ref.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    for name, layer in delta.layers.items():
        weight = ref.get_submodule(name).weight
        d = torch.from_numpy(np_unpack(layer.planes, layer.scales, layer.shape)).float()
        if id(weight) not in done:
            done.add(id(weight))
            weight.add_(d.T if layer.transposed else d)
    for key, value in delta.params.items():
        params[key].copy_(value)
    return ref


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


def assert_rows_are_their_models(out: torch.Tensor, rows: list[torch.Tensor], refs) -> None:
    """Row ``i`` of a left-padded batch's logits ``out`` equals model ``refs[i]``'s
    own logits on ``rows[i]`` alone."""
    for i, (p, ref) in enumerate(zip(rows, refs, strict=True)):
        want = logits(ref, p[None])[0]
        torch.testing.assert_close(out[i, -len(p) :], want.to(out.dtype), rtol=1e-5, atol=1e-5)


def assert_decoding_is_their_models(gen, rows: list[torch.Tensor], refs) -> None:
    """Each row's logits at every decoding step (``generate(..., return_logits=True)``)
    equal model ``refs[i]``'s on the prompt followed by the tokens decoded so far."""
    for i, (p, ref) in enumerate(zip(rows, refs, strict=True)):
        seq = torch.cat([p, gen.tokens[i, :-1]])
        want = logits(ref, seq[None])[0, len(p) - 1 :]
        torch.testing.assert_close(gen.logits[i], want, rtol=1e-5, atol=1e-5)


def prompts(seed: int, lengths=(7, 4, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]


def no_swaps(model: nn.Module) -> bool:
    return not any(isinstance(m, TenantModule) for m in model.modules())


# ---- Gemma: (1 + w) RMSNorm, scaled embeddings ---------------------------------


@pytest.mark.parametrize("arch", _arch("gemma", "gemma2", "gemma3"))
@pytest.mark.parametrize("ce", [False, True])
def test_gemma_multitenant_rows_equal_their_dense_models(arch, ce):
    """Mixed batch (tenant a, tenant b, base), left-padded: every row's logits are its
    own dense model's, the base row the HF base model's (norms, embedding, head all
    changed by the tenants)."""
    base = build(arch)
    plain = copy.deepcopy(base)
    deltas = [qdelta.compress(base, finetune(base, seed=s), compress_embeddings=ce) for s in (1, 2)]
    refs = [dense_reference(base, d) for d in deltas] + [plain]
    mtm = qdelta.MultiTenantModel(base, tenants={"a": deltas[0], "b": deltas[1]})
    rows = prompts(7)
    ids, mask = padded(rows)
    out = mtm.forward(ids, ["a", "b", None], attention_mask=mask).logits.float()
    assert_rows_are_their_models(out, rows, refs)
    # Decoding with the cache too (Gemma2/3: sliding window 4 < the 7-token prompt).
    gen = mtm.generate(ids, ["a", "b", None], 3, attention_mask=mask, return_logits=True)
    assert_decoding_is_their_models(gen, rows, refs)


@pytest.mark.parametrize("ce", [False, True])
def test_gemma_multitenant_bfloat16_torch_forms(ce):
    """bfloat16: the torch forms (no Rust call) of the scaled embeddings and the
    (1 + w) norms; base rows are bit-exact with the HF model in bfloat16."""
    base = build("gemma")
    delta = qdelta.compress(base, finetune(base), compress_embeddings=ce)
    ref = dense_reference(base, delta).to(torch.bfloat16)
    plain = copy.deepcopy(base).to(torch.bfloat16)
    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta}).to(torch.bfloat16)
    ids = torch.stack(prompts(9, (7, 7)))
    out = mtm.forward(ids, ["t", None]).logits.float()
    assert torch.equal(out[1], logits(plain, ids[1:])[0])
    torch.testing.assert_close(out[0], logits(ref, ids[:1])[0], rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norm_rows_follow_one_plus_weight(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    g = torch.Generator().manual_seed(0)
    d = 40
    base = GemmaRMSNorm(d, eps=1e-6)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, generator=g))
    base = base.to(dtype)
    route = Route()
    norm = RowRMSNorm(base, route)
    tenant = torch.randn(d, generator=g).to(dtype)
    norm.add("t", {"weight": tenant})
    norm.set_slots({"t": 0}, capacity=1)
    route.slots = torch.tensor([0, -1])
    x = (torch.randn(2, 3, d, generator=g) * 3).to(dtype)
    with torch.no_grad():
        got = norm(x)
        own = copy.deepcopy(base)
        own.weight.copy_(tenant)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[0], own(x[0]), rtol=tol, atol=tol)
        torch.testing.assert_close(got[1], base(x[1]), rtol=tol, atol=tol)


class FancyRMSNorm(nn.Module):
    """Named like an RMSNorm (what a class-name test accepts), but no normalisation
    at all: x * weight."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_norm_by_name_only_is_refused_before_any_swap():
    base = build("llama")
    for layer in base.model.layers:
        layer.input_layernorm = FancyRMSNorm(32)
    ft = finetune(base, skip=("proj", "embed", "lm_head", "model.norm", "post_"))
    delta = qdelta.compress(base, ft)
    assert any("input_layernorm" in k for k in delta.params)
    mtm = qdelta.MultiTenantModel(base)
    with pytest.raises(qdelta.QDeltaError, match="input_layernorm"):
        mtm.add_tenant("t", delta)
    assert no_swaps(mtm.model)
    with pytest.raises(qdelta.QDeltaError):
        RowRMSNorm(base.model.layers[0].input_layernorm, Route())


@pytest.mark.parametrize("arch", _arch("gemma", "gemma3"))
def test_gemma_apply_with_compressed_embeddings(arch):
    """qdelta.apply: the packed embedding delta is scaled like the base lookup."""
    base = build(arch, tie_word_embeddings=False)
    ft = finetune(base)
    delta = qdelta.compress(base, ft, compress_embeddings=True, bits=2)
    assert "model.embed_tokens" in delta.layers
    ref = dense_reference(base, delta)
    ids = prompts(5, (9, 9))
    ids = torch.stack(ids)
    want = logits(ref, ids)
    qdelta.apply(base, delta)
    torch.testing.assert_close(logits(base, ids), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            base.model.embed_tokens(ids), ref.model.embed_tokens(ids), rtol=1e-6, atol=1e-6
        )


def test_embedding_and_linear_forms_are_probed():
    from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

    from qdelta import sources

    class Same(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    # Only layers whose forward is the plain map are layers a delta may replace.
    # An nn.Embedding with max_norm renormalises the rows it looks up, in place.
    model = nn.Sequential(
        Same(4, 3),
        Doubled(3, 3),
        OPTLearnedPositionalEmbedding(16, 3),
        nn.Embedding(5, 3),
        nn.Embedding(5, 3, max_norm=1.0),
    )
    assert set(sources.layer_kinds(model)) == {"0", "3"}
    assert sources.linear_form(model[0]) and not sources.linear_form(model[1])
    assert sources.embedding_form(model[3]) == "plain"
    assert sources.embedding_form(model[2]) is None
    assert sources.embedding_form(model[4]) is None
    if _available("gemma3"):
        assert sources.embedding_form(build("gemma3").model.embed_tokens) == "scaled"


# ---- LayerNorm and GPT-2's Conv1D: GPT-2, GPT-NeoX ------------------------------------


@pytest.mark.parametrize("arch", _arch("gpt2", "neox", "phi", "falcon", "bloom", "bigcode", "gptj"))
@pytest.mark.parametrize("ce", [False, True])
def test_layernorm_conv1d_multitenant_rows_equal_their_dense_models(arch, ce):
    """Every parameter changed (LayerNorm weights and biases, GPT-2's Conv1D weights
    packed transposed, positions, the tied or untied head): a mixed left-padded
    batch, and decoding with the cache, give each row its own dense model's logits
    (GPT-2, GPT-NeoX, Phi, Falcon, BLOOM, GPTBigCode, GPT-J)."""
    base = build(arch)
    plain = copy.deepcopy(base)
    deltas = [qdelta.compress(base, finetune(base, seed=s), compress_embeddings=ce) for s in (1, 2)]
    if arch == "gpt2":
        assert deltas[0].layers["transformer.h.0.attn.c_attn"].transposed
    norm_bias = ("ln_1.bias", "layernorm.bias", "input_layernorm.bias")
    assert any(k.endswith(norm_bias) for k in deltas[0].params)
    refs = [dense_reference(base, d) for d in deltas] + [plain]
    mtm = qdelta.MultiTenantModel(base, tenants={"a": deltas[0], "b": deltas[1]})
    rows = prompts(13)
    ids, mask = padded(rows)
    out = mtm.forward(ids, ["a", "b", None], attention_mask=mask).logits.float()
    assert_rows_are_their_models(out, rows, refs)
    gen = mtm.generate(ids, ["b", None, "a"], 3, attention_mask=mask, return_logits=True)
    assert_decoding_is_their_models(gen, rows, (refs[1], plain, refs[0]))
    kinds = {type(m).__name__ for m in mtm.model.modules()}
    assert {"RowLayerNorm", "RoutedLinear"} <= kinds


@pytest.mark.parametrize("arch", _arch("mixtral"))
def test_mixture_of_experts_attention_tenants_served_experts_refused(arch):
    """Mixtral: a fine-tune of attention, norms and embeddings is served per row; one
    that changes the experts or the router (kept whole by compress: not nn.Linear
    layers) is refused before any swap, naming the module, and the model serves on.
    (transformers 4.x keeps them nn.Linear modules: one tenant's batches only.)"""
    base = build(arch)
    plain = copy.deepcopy(base)
    moe = ("mlp", "block_sparse_moe")  # 5.x, 4.x (whose experts are nn.Linear layers)
    linear = [n for n, m in base.named_modules() if ".experts." in n and isinstance(m, nn.Linear)]
    experts = [r".*\.experts\..*"] if linear else []
    attn = qdelta.compress(
        base, finetune(base, skip=moe), exclude=experts + [r".*\.gate"] * bool(experts)
    )
    full = qdelta.compress(base, finetune(base, seed=2))
    mtm = qdelta.MultiTenantModel(base)
    if any(".experts." in n for n in full.layers):
        # transformers 4.x: the experts are nn.Linear modules fed gathered tokens. A
        # batch of one tenant is served; a mixed one is a ShapeError, never misrouted.
        mtm.add_tenant("full", full)
        rows = prompts(3)
        ids, mask = padded(rows)
        with pytest.raises(qdelta.ShapeError, match="rows first in the input"):
            mtm.forward(ids, ["full", None, "full"], attention_mask=mask)
        out = mtm.forward(ids, ["full"] * 3, attention_mask=mask).logits
        ref = dense_reference(copy.deepcopy(plain), full)
        assert_rows_are_their_models(out, rows, (ref, ref, ref))
        mtm.remove_tenant("full")
    else:  # 5.x: experts and router are whole tensors, refused before any swap
        with pytest.raises(qdelta.QDeltaError, match=r"mlp\.gate"):
            mtm.add_tenant("full", full)
        assert no_swaps(mtm.model) and mtm.tenants == []
    mtm.add_tenant("attn", attn)
    rows = prompts(4)
    ids, mask = padded(rows)
    out = mtm.forward(ids, ["attn", None, "attn"], attention_mask=mask).logits
    ref = dense_reference(plain, attn)
    assert_rows_are_their_models(out, rows, (ref, plain, ref))


def test_gpt2_full_precision_conv1d_and_bias_only_tenants():
    """A Conv1D kept whole by the fine-tune's compression (its weight a full-precision
    parameter: RowLinear, weight [in, out]) and one whose only change is its bias."""
    base = build("gpt2")
    ft = finetune(base, skip=("wte", "wpe"))
    delta = qdelta.compress(base, ft, targets=["c_attn"])
    assert "transformer.h.0.mlp.c_fc.weight" in delta.params
    bias_only = finetune(base, seed=3, skip=("weight", "wte", "wpe"))
    delta2 = qdelta.compress(base, bias_only, targets=["c_attn"])
    assert "transformer.h.0.mlp.c_fc.bias" in delta2.params
    assert "transformer.h.0.mlp.c_fc.weight" not in delta2.params
    plain = copy.deepcopy(base)
    refs = [dense_reference(base, delta), dense_reference(base, delta2), plain]
    mtm = qdelta.MultiTenantModel(base, tenants={"w": delta, "b": delta2})
    ids = torch.stack(prompts(2, (6, 6, 6)))
    out = mtm.forward(ids, ["w", "b", None]).logits
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i], logits(ref, ids[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    from qdelta.tenant_modules import RowLinear

    assert isinstance(mtm.model.transformer.h[0].mlp.c_fc, RowLinear)

    # A packed delta where other tenants take full-precision weights (one class of
    # tenant module per layer): refused, also when both arrive in one batch.
    packed_fc = qdelta.compress(plain, finetune(plain, seed=4), targets=["c_fc"])
    with pytest.raises(qdelta.QDeltaError, match=r"h\.0\.(attn|mlp)\.c_(attn|fc).*mixing packed"):
        mtm.add_tenant("p", packed_fc)
    fresh = qdelta.MultiTenantModel(copy.deepcopy(plain))
    fresh.add_tenant("w", delta)
    fresh.add_tenant("p", packed_fc)
    with pytest.raises(qdelta.QDeltaError, match="mixing packed"):
        fresh.forward(ids, ["w", "p", None])
    assert fresh.forward(ids, [None, None, None]).logits.shape == out.shape


def test_gpt2_bfloat16_multitenant():
    base = build("gpt2")
    delta = qdelta.compress(base, finetune(base))
    ref = dense_reference(base, delta).to(torch.bfloat16)
    plain = copy.deepcopy(base).to(torch.bfloat16)
    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta}).to(torch.bfloat16)
    ids = torch.stack(prompts(9, (7, 7)))
    out = mtm.forward(ids, ["t", None]).logits.float()
    torch.testing.assert_close(out[1], logits(plain, ids[1:])[0], rtol=0, atol=2e-2)
    torch.testing.assert_close(out[0], logits(ref, ids[:1])[0], rtol=0, atol=3e-2)
    # The tenant's row is not the base's: the delta is really applied in bfloat16.
    assert (out[0] - out[1]).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("bias", "changes"),
    [(True, ("weight",)), (True, ("bias",)), (True, ("weight", "bias")), (False, ("weight",))],
)
def test_layernorm_rows_follow_their_tenants(dtype, bias, changes):
    from qdelta.tenant_modules import RowLayerNorm

    g = torch.Generator().manual_seed(0)
    d = 37
    base = nn.LayerNorm(d, eps=1e-3, bias=bias)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(d, generator=g))
    base = base.to(dtype)
    route = Route()
    norm = RowLayerNorm(base, route)
    assert norm.eps == 1e-3
    tenants = {}
    for name in ("t", "u"):
        tenants[name] = {c: torch.randn(d, generator=g).to(dtype) for c in changes}
        norm.add(name, tenants[name])
    norm.set_slots({"t": 0, "u": 1}, capacity=2)
    route.slots = torch.tensor([1, -1, 0, 1])
    x = (torch.randn(4, 3, d, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    with torch.no_grad():
        got = norm(x)
        for r, who in enumerate(("u", None, "t", "u")):
            # Independent reference: float64 math on the row's own weight and bias.
            w = base.weight.double() if who is None else tenants[who].get("weight", base.weight)
            b = base.bias if who is None or not bias else tenants[who].get("bias", base.bias)
            xr = x[r].double()
            want = (xr - xr.mean(-1, keepdim=True)) / torch.sqrt(
                xr.var(-1, unbiased=False, keepdim=True) + 1e-3
            ) * w.double() + (0 if b is None else b.double())
            assert got.dtype == dtype
            torch.testing.assert_close(got[r].double(), want, rtol=tol, atol=tol)
        route.slots = None
        assert torch.equal(norm(x), base(x))  # no route: the base module itself
    assert norm.tenant_nbytes() == 2 * len(changes) * d * base.weight.element_size()
    norm.remove("t")
    norm.set_slots({"u": 1}, capacity=2)
    route.slots = torch.tensor([1, -1])
    with torch.no_grad():
        torch.testing.assert_close(norm(x[:2])[1], base(x[1]), rtol=tol, atol=tol)


class ShiftedLayerNorm(nn.LayerNorm):
    """A LayerNorm by class, but its forward adds 1: no per-row formula stands in for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


class ScaledConv1D(nn.Module):
    """Looks like GPT-2's Conv1D (name, nf, weight [in, out]) but doubles its output."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * (x @ self.weight + self.bias)


ScaledConv1D.__name__ = "Conv1D"


def test_layernorm_and_conv1d_forms_are_probed():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    from qdelta import sources
    from qdelta.tenant_modules import RowLayerNorm, layer_norm_form, rms_norm_form

    assert layer_norm_form(nn.LayerNorm(8, eps=1e-6)) == 1e-6
    assert layer_norm_form(nn.LayerNorm(8, bias=False)) == 1e-5
    assert layer_norm_form(LlamaRMSNorm(8)) is None
    assert rms_norm_form(nn.LayerNorm(8)) is None
    assert layer_norm_form(ShiftedLayerNorm(8)) is None
    assert layer_norm_form(nn.LayerNorm(8, elementwise_affine=False)) is None
    with pytest.raises(qdelta.QDeltaError, match="LayerNorm"):
        RowLayerNorm(ShiftedLayerNorm(8), Route())
    assert sources.conv1d_form(Conv1D(6, 4))
    assert not sources.conv1d_form(ScaledConv1D(6, 4))
    assert not sources.conv1d_form(nn.Linear(4, 6))

    # Refused by MultiTenantModel before any swap, the model still serving.
    base = build("gpt2")
    base.transformer.h[0].ln_1 = ShiftedLayerNorm(32)
    plain = copy.deepcopy(base)
    delta = qdelta.compress(base, finetune(base, skip=("wte", "wpe")))
    mtm = qdelta.MultiTenantModel(base)
    with pytest.raises(qdelta.QDeltaError, match=r"h\.0\.ln_1"):
        mtm.add_tenant("t", delta)
    assert no_swaps(mtm.model) and mtm.tenants == []
    ids = torch.stack(prompts(1, (5, 5)))
    torch.testing.assert_close(
        mtm.forward(ids, [None, None]).logits, logits(plain, ids), rtol=1e-6, atol=1e-6
    )


def test_multitenant_linear_on_conv1d():
    """MultiTenantLinear over a Conv1D base (weight [in, out]): its deltas pack
    [out, in], transposed=True; a Linear's delta (not transposed) is refused."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(5)
    k, n = 45, 38
    conv = Conv1D(n, k)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(k, n, generator=g))
        conv.bias.copy_(torch.randn(n, generator=g))
    layer = qdelta.MultiTenantLinear(conv)
    assert (layer.out_features, layer.in_features) == (n, k)
    packed = {}
    for name, bits in (("a", 1), ("b", 3)):
        planes, scales = qdelta.reference.pack_residual(torch.randn(n, k, generator=g), bits, "row")
        packed[name] = qdelta.PackedLayer(
            planes.numpy().view(np.uint32), scales.numpy(), (n, k), transposed=True
        )
        layer.add_tenant(name, packed[name])
    with pytest.raises(qdelta.ShapeError, match="Conv1D, transposed"):
        layer.add_tenant("lin", qdelta.PackedLayer(packed["a"].planes, packed["a"].scales, (n, k)))
    ids = torch.tensor([layer.tenant_id("b"), -1, layer.tenant_id("a"), layer.tenant_id("b")])
    for shape in ((4, k), (4, 3, k)):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            got = layer(x, ids)
        for r, who in enumerate(("b", None, "a", "b")):
            w = conv.weight.double().T
            if who is not None:
                p = packed[who]
                w = w + torch.from_numpy(np_unpack(p.planes, p.scales, p.shape))
            want = x[r].double() @ w.T + conv.bias.double()
            torch.testing.assert_close(got[r].double(), want, rtol=1e-5, atol=1e-4)


# ---- tied embeddings --------------------------------------------------------------


TIED = {
    "llama_tied": "model.embed_tokens",
    "gpt2": "transformer.wte",
    "opt": "model.decoder.embed_tokens",
}


@pytest.mark.parametrize("arch", list(TIED))
def test_tied_weights_take_the_delta_once(arch):
    base = build(arch)
    emb = TIED[arch]
    assert base.get_submodule(emb).weight is base.lm_head.weight
    ft = finetune(base)
    delta = qdelta.compress(base, ft, bits=3, compress_embeddings=True)
    assert emb in delta.layers and "lm_head" in delta.layers  # both modules covered
    a, b = delta.layers[emb], delta.layers["lm_head"]
    assert np.array_equal(a.planes, b.planes) and np.array_equal(a.scales, b.scales)
    ref = dense_reference(base, delta)
    ids = torch.stack(prompts(3, (8, 8)))

    merged = qdelta.merge(copy.deepcopy(base), delta)
    torch.testing.assert_close(merged.lm_head.weight, ref.lm_head.weight, rtol=0, atol=1e-6)
    assert merged.get_submodule(emb).weight is merged.lm_head.weight
    torch.testing.assert_close(logits(merged, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)

    dense = qdelta.dense_delta(base, ft, compress_embeddings=True)
    exact = dense.merge_into(copy.deepcopy(base))
    torch.testing.assert_close(exact.lm_head.weight, ft.lm_head.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(exact, ids), logits(ft, ids), rtol=1e-5, atol=1e-5)

    applied = qdelta.apply(copy.deepcopy(base), delta)
    torch.testing.assert_close(logits(applied, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama_tied"])
def test_tied_store_files_share_the_pair_and_serve_from_the_store(arch, tmp_path):
    """A tied model compressed with its embeddings: the file stores the tied
    embedding/head delta once (format version 2), and a MultiTenantModel reading
    the store serves every row as its dense model."""
    base = build(arch)
    emb = TIED[arch]
    plain = copy.deepcopy(base)
    deltas = [
        qdelta.compress(base, finetune(base, seed=s), compress_embeddings=True) for s in (1, 2)
    ]
    store = qdelta.DeltaStore(tmp_path)
    for name, d in zip("ab", deltas, strict=True):
        f = store.add(name, d)
        assert f.format_version == 2
        planes_of = {entry[0]: entry[5] for entry in f.layer_table}
        assert planes_of["lm_head"] == planes_of[emb]  # one planes tensor for both layers
        unshared = sum(layer.nbytes for layer in d.layers.values())
        suffixes = (".qdelta_planes", ".qdelta_scales")
        stored = sum(nbytes for name, _, _, nbytes in f.tensors if name.endswith(suffixes))
        assert stored == unshared - d.layers[emb].nbytes
    mtm = qdelta.MultiTenantModel(base, store)
    rows = prompts(17)
    ids, mask = padded(rows)
    out = mtm.forward(ids, ["a", None, "b"], attention_mask=mask).logits
    refs = (dense_reference(plain, deltas[0]), plain, dense_reference(plain, deltas[1]))
    assert_rows_are_their_models(out, rows, refs)


def test_tied_llama_multitenant_and_differing_tied_deltas_refused():
    base = build("llama_tied")
    ft = finetune(base)
    delta = qdelta.compress(base, ft, compress_embeddings=True)
    ref = dense_reference(base, delta)
    rows = prompts(11)
    ids, mask = padded(rows)
    mtm = qdelta.MultiTenantModel(copy.deepcopy(base), tenants={"t": delta})
    out = mtm.forward(ids, ["t", None, "t"], attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, (ref, base, ref))

    # Tied layers whose deltas differ (e.g. scales distilled apart): one weight cannot
    # hold both, so merge refuses, before writing anything.
    head = delta.layers["lm_head"]
    delta.layers["lm_head"] = qdelta.PackedLayer(head.planes, head.scales * 2, head.shape)
    target = copy.deepcopy(base)
    before = target.lm_head.weight.clone()
    with pytest.raises(qdelta.ModelMismatchError, match="tied"):
        qdelta.merge(target, delta)
    assert torch.equal(target.lm_head.weight, before)
    dense = qdelta.DenseDelta.from_delta(delta)
    with pytest.raises(qdelta.ModelMismatchError, match="tied"):
        dense.merge_into(target)
    assert torch.equal(target.lm_head.weight, before)


# ---- OPT's positional embedding ------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False])
def test_opt_full_finetunes_with_new_positions_served_per_row(packed):
    """OPT's positional embedding takes the attention mask, not ids: a tenant's
    positions are served by re-running the base module per tenant on its rows with
    the tenant's table (the probe found it row-separable). Every row of a
    left-padded mixed batch, prefill and cached decode, equals its own model."""
    base = build("opt")
    plain = copy.deepcopy(base)
    rows = prompts(9)
    ids, mask = padded(rows)
    # Everything fine-tuned, the positions included.
    delta = qdelta.compress(base, finetune(base), targets=None if packed else ["q_proj"])
    other = qdelta.compress(base, finetune(base, seed=5), targets=None if packed else ["q_proj"])
    assert "model.decoder.embed_positions.weight" in delta.params
    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta, "u": other})
    assert "model.decoder.embed_positions" in mtm._layouts().rerun
    served = mtm.model.get_submodule("model.decoder.embed_positions")
    assert type(served).__name__ == "RowRerunEmbedding" and served.tenants == ["t", "u"]
    refs = {"t": dense_reference(plain, delta), "u": dense_reference(plain, other), None: plain}
    who = ["u", None, "t"]
    out = mtm.forward(ids, who, attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [refs[name] for name in who])
    gen = mtm.generate(ids, who, 3, attention_mask=mask, return_logits=True)
    assert_decoding_is_their_models(gen, rows, [refs[name] for name in who])
    # The tables count in the budget; removing a tenant leaves the other served.
    table = plain.model.decoder.embed_positions.weight
    assert served.tenant_nbytes() == 2 * table.numel() * table.element_size()
    mtm.remove_tenant("u")
    out = mtm.forward(ids, ["t", None, "t"], attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [refs["t"], plain, refs["t"]])


class _MixedRows(nn.Embedding):
    """A positional embedding whose rows mix across the batch (each row looks up
    the sum of every row's mask): not row-separable, so never re-run per tenant."""

    def forward(self, attention_mask, cache_length=0, position_ids=None):
        pos = attention_mask.sum(0, keepdim=True).expand_as(attention_mask).cumsum(-1) % 5
        return super().forward(pos.long())


class _MixingLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab})()
        self.embed = nn.Embedding(vocab, d)
        self.pos = _MixedRows(5, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return _Logits(self.head(torch.tanh(self.embed(input_ids) + self.pos(mask))))


class _MeanRows(nn.Embedding):
    """Positions scaled by the batch's mean mask: rows mix, but not on a probe whose
    rows are alike (all-ones masks)."""

    def forward(self, attention_mask, cache_length=0, position_ids=None):
        mean = attention_mask.float().mean(0, keepdim=True)
        pos = (attention_mask.cumsum(-1) * mean).round().long() % 5
        return super().forward(pos)


@pytest.mark.parametrize("mixing", [_MixedRows, _MeanRows], ids=["sum", "mean"])
def test_a_positional_embedding_whose_rows_mix_is_refused(mixing):
    torch.manual_seed(0)
    base = _MixingLM()
    base.pos = mixing(5, 16)
    delta = qdelta.compress(base, finetune(base), targets=["head"])
    assert "pos.weight" in delta.params
    mtm = qdelta.MultiTenantModel(base)
    with pytest.raises(qdelta.QDeltaError, match="pos"):
        mtm.add_tenant("t", delta)
    assert no_swaps(mtm.model) and mtm.tenants == [] and mtm._layouts().rerun == set()


@pytest.mark.parametrize("packed", [True, False])
def test_opt_flattened_mlp_and_norms_served_per_row(packed):
    """OPT runs each layer's final_layer_norm and MLP on [batch * seq, hidden]. The
    runtime's probe forward finds those modules see the batch flattened batch first,
    so each sequence's entries take its tenant: every row of a left-padded mixed
    batch, prefill and cached decode, equals its own dense model."""
    base = build("opt")
    plain = copy.deepcopy(base)
    rows = prompts(6)
    ids, mask = padded(rows)
    ft = finetune(base, skip=("embed_positions",))
    # packed: every linear layer packed (fc1 / fc2 too); else only attention packed,
    # the MLP's weights and biases served at full precision.
    attn = ["q_proj", "k_proj", "v_proj", "out_proj"]
    delta = qdelta.compress(base, ft, targets=None if packed else attn)
    assert ("model.decoder.layers.0.fc1" in delta.layers) == packed
    assert "model.decoder.layers.0.final_layer_norm.weight" in delta.params
    ft2 = finetune(base, seed=8, skip=("embed_positions",))
    other = qdelta.compress(base, ft2, targets=None if packed else attn)
    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta, "u": other})
    assert "model.decoder.layers.1.fc2" in mtm._layouts().flat
    assert "model.decoder.layers.0.self_attn.q_proj" not in mtm._layouts().flat
    refs = {"t": dense_reference(plain, delta), "u": dense_reference(plain, other), None: plain}
    who = ["t", None, "u"]
    out = mtm.forward(ids, who, attention_mask=mask).logits
    assert_rows_are_their_models(out, rows, [refs[name] for name in who])
    gen = mtm.generate(ids, who, 3, attention_mask=mask, return_logits=True)
    assert_decoding_is_their_models(gen, rows, [refs[name] for name in who])


class _Logits:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class SeqFirstFlatLM(nn.Module):
    """A toy causal LM whose middle layer sees [seq * batch, hidden], sequence first
    (what a model with a [seq, batch] layout gives): not the order the batch rows
    are in, so no per-row tenant may be routed there."""

    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab})()
        self.embed = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        h = self.embed(input_ids)  # [B, S, d]
        b, t, d = h.shape
        flat = h.transpose(0, 1).reshape(t * b, d)  # sequence first
        h = self.mid(flat).reshape(t, b, d).transpose(0, 1)
        return _Logits(self.head(torch.tanh(h)))


def test_flattened_rows_in_another_order_are_refused_not_misrouted():
    torch.manual_seed(0)
    base = SeqFirstFlatLM()
    plain = copy.deepcopy(base)
    ft = finetune(base)
    delta = qdelta.compress(base, ft, targets=["mid", "head"])
    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta})
    ids = torch.stack(prompts(2, (5, 5)))
    assert mtm._layouts().flat == set()
    with pytest.raises(qdelta.ShapeError, match="reshapes the batch"):
        mtm.forward(ids, ["t", None])
    # Base rows still served; a batch of one sequence has no order to get wrong.
    torch.testing.assert_close(
        mtm.forward(ids, [None, None]).logits, plain(ids).logits, rtol=1e-6, atol=1e-6
    )
    one = mtm.forward(ids[:1], ["t"]).logits
    torch.testing.assert_close(one, dense_reference(plain, delta)(ids[:1]).logits)


def test_opt_layernorms_served_where_the_batch_is_first():
    """OPT's attention norms and its decoder's last norm see [batch, seq, hidden]: a
    tenant's LayerNorm weights and biases there are served exactly, alongside
    tenants of the flattened final_layer_norm of each layer."""
    base = build("opt")
    plain = copy.deepcopy(base)
    rows = prompts(6)
    ids, mask = padded(rows)
    flat = ("layers.0.final_layer_norm", "layers.1.final_layer_norm")
    attn = ["q_proj", "k_proj", "v_proj", "out_proj"]
    ft = finetune(base, skip=("embed_positions", "fc1", "fc2", *flat))
    delta = qdelta.compress(base, ft, targets=attn)
    assert "model.decoder.layers.0.self_attn_layer_norm.bias" in delta.params
    assert "model.decoder.final_layer_norm.weight" in delta.params
    flat_norm = qdelta.compress(
        plain, finetune(plain, seed=4, skip=("embed_positions", "fc1", "fc2")), targets=attn
    )
    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta, "flat": flat_norm})
    out = mtm.forward(ids, [None, "t", "flat"], attention_mask=mask).logits
    refs = (plain, dense_reference(plain, delta), dense_reference(plain, flat_norm))
    assert_rows_are_their_models(out, rows, refs)


def test_opt_compress_embeddings_keeps_positions_whole():
    base = build("opt")
    ft = finetune(base)
    delta = qdelta.compress(base, ft, compress_embeddings=True)
    assert "model.decoder.embed_tokens" in delta.layers
    assert "model.decoder.embed_positions" not in delta.layers
    assert "model.decoder.embed_positions.weight" in delta.params
    ref = dense_reference(base, delta)
    ids = torch.stack(prompts(4, (6, 6)))
    qdelta.apply(base, delta)
    torch.testing.assert_close(logits(base, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


# ---- ring attention: sliding windows and soft-capping computed ------------------------


RING_SETTINGS = [
    pytest.param("mistral", {"sliding_window": 8}, id="mistral-window"),
    pytest.param(
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention"] * 2},
        id="qwen2-sliding-layers",
    ),
    *[
        pytest.param(
            "gemma2",
            kw,
            id=name,
            marks=pytest.mark.skipif(not _available("gemma2"), reason="no gemma2"),
        )
        for name, kw in (
            ("gemma2", {}),
            ("gemma2-softcap", {"sliding_window": 128}),
            ("gemma2-window", {"attn_logit_softcapping": None}),
        )
    ],
    pytest.param(
        "gemma3",
        {},
        id="gemma3",
        marks=pytest.mark.skipif(not _available("gemma3"), reason="no gemma3"),
    ),
]


@pytest.mark.parametrize(("arch", "kw"), RING_SETTINGS)
def test_ring_computes_sliding_windows_and_softcapping(one_rank, arch, kw):
    """On one rank the ring is one block: its window and soft-cap masks must be the
    model's own (tests/test_ring_hf_windows.py runs them over 3 ranks)."""
    from qdelta.ring.hf import ring_forward, use_ring_attention

    model = build(arch, **kw)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = ring_forward(use_ring_attention(model, backend="math", timeout=30), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ring_refuses_other_layer_types():
    from qdelta.ring.hf import use_ring_attention

    model = build("qwen2")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(RingError, match=r"layer_types \['chunked_attention'\]"):
        use_ring_attention(model)
    # Refused before anything changed.
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_qdelta_ring") for m in model.modules())


def test_ring_attention_function_refuses_sinks_and_bad_windows():
    """What the ring cannot compute is never ignored silently."""
    from qdelta.ring.hf import ring_attention_forward, use_ring_attention

    model = use_ring_attention(build("mistral"))
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 8)
    kv = torch.randn(1, 2, 8, 8)
    with pytest.raises(RingError, match="attention sinks"):
        ring_attention_forward(attn, q, kv, kv, None, scaling=0.3, s_aux=torch.zeros(4))
    with pytest.raises(RingError, match="sliding_window >= 1"):
        ring_attention_forward(attn, q, kv, kv, None, scaling=0.3, sliding_window=0)
    with pytest.raises(RingError, match="sliding_window as an int"):
        ring_attention_forward(attn, q, kv, kv, None, scaling=0.3, sliding_window=4.0)
