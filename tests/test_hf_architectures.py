"""Architectures beyond Llama, on tiny offline Hugging Face models: Gemma's
(1 + w) RMSNorm and scaled embeddings, tied embeddings, OPT's positional
embedding, and the attention settings ring attention refuses (sliding windows,
logit soft-capping).

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
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **kw)
        cfg.bos_token_id = cfg.eos_token_id = 0
        return cfg, T.GPT2LMHeadModel
    raise KeyError(arch)


def _available(arch: str) -> bool:
    names = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
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
    for i, p in enumerate(rows):
        want = logits(refs[i], p[None])[0]
        torch.testing.assert_close(out[i, -len(p) :], want, rtol=1e-5, atol=1e-5)
    # Decoding with the cache too (Gemma2/3: sliding window 4 < the 7-token prompt).
    gen = mtm.generate(ids, ["a", "b", None], 3, attention_mask=mask, return_logits=True)
    for i, p in enumerate(rows):
        seq = torch.cat([p, gen.tokens[i, :-1]])
        want = logits(refs[i], seq[None])[0, len(p) - 1 :]
        torch.testing.assert_close(gen.logits[i], want, rtol=1e-5, atol=1e-5)


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
    model = nn.Sequential(
        Same(4, 3), Doubled(3, 3), OPTLearnedPositionalEmbedding(16, 3), nn.Embedding(5, 3)
    )
    assert set(sources.layer_kinds(model)) == {"0", "3"}
    assert sources.linear_form(model[0]) and not sources.linear_form(model[1])
    assert sources.embedding_form(model[3]) == "plain"
    assert sources.embedding_form(model[2]) is None
    if _available("gemma3"):
        assert sources.embedding_form(build("gemma3").model.embed_tokens) == "scaled"


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


def test_tied_llama_multitenant_and_differing_tied_deltas_refused():
    base = build("llama_tied")
    ft = finetune(base)
    delta = qdelta.compress(base, ft, compress_embeddings=True)
    ref = dense_reference(base, delta)
    rows = prompts(11)
    ids, mask = padded(rows)
    mtm = qdelta.MultiTenantModel(copy.deepcopy(base), tenants={"t": delta})
    out = mtm.forward(ids, ["t", None, "t"], attention_mask=mask).logits
    for i, who in enumerate((ref, base, ref)):
        want = logits(who, rows[i][None])[0]
        torch.testing.assert_close(out[i, -len(rows[i]) :], want, rtol=1e-5, atol=1e-5)

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


def test_opt_positional_embedding_refused_by_multitenant_before_any_swap():
    base = build("opt")
    plain = copy.deepcopy(base)
    ids = torch.stack(prompts(3, (6, 6)))
    # Norms frozen (LayerNorm tenants are refused anyway): the positions change.
    delta = qdelta.compress(base, finetune(base, skip=("layer_norm",)))
    assert "model.decoder.embed_positions.weight" in delta.params
    # Positions, norms and the MLP (run on [batch * seq, hidden]) left alone.
    attn = ("q_proj", "k_proj", "v_proj", "out_proj")
    ft = finetune(base, skip=("layer_norm", "embed_positions", "fc1", "fc2"))
    ok = qdelta.compress(base, ft, targets=list(attn))
    mtm = qdelta.MultiTenantModel(base)
    with pytest.raises(qdelta.QDeltaError, match="embed_positions"):
        mtm.add_tenant("t", delta)
    assert no_swaps(mtm.model) and mtm.tenants == []
    # The model keeps serving: base rows equal the HF model's own greedy decoding.
    out = mtm.generate(ids, [None, None], 3)
    want = plain.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert torch.equal(out.sequences, want)
    # A tenant that leaves positions, norms and the MLP alone is served exactly.
    mtm.add_tenant("ok", ok)
    got = mtm.forward(ids, ["ok", None]).logits
    torch.testing.assert_close(
        got[0], logits(dense_reference(plain, ok), ids[:1])[0], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(got[1], logits(plain, ids[1:])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_opt_mlp_tenant_refused_not_misrouted(packed):
    """OPT's MLP sees [batch * seq, hidden]: with a tenant loaded there, base-only
    batches still serve (the base module), and a tenant row is a ShapeError saying
    why (never other rows' weights: the torch form would index the wrong rows)."""
    base = build("opt")
    plain = copy.deepcopy(base)
    ids = torch.stack(prompts(5, (6, 6)))
    ft = finetune(base, skip=("layer_norm", "embed_positions", "embed_tokens", "lm_head"))
    # packed: fc1's weight delta; else only fc1's bias, served at full precision.
    delta = qdelta.compress(base, ft, targets=["fc1"] if packed else ["q_proj"])
    assert ("model.decoder.layers.0.fc1" in delta.layers) == packed
    mtm = qdelta.MultiTenantModel(base, tenants={"t": delta})
    got = mtm.forward(ids, [None, None]).logits
    torch.testing.assert_close(got, logits(plain, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(qdelta.ShapeError, match="reshapes the batch"):
        mtm.forward(ids, ["t", None])
    got = mtm.forward(ids, [None, None]).logits  # still serving after the refusal
    torch.testing.assert_close(got, logits(plain, ids), rtol=1e-5, atol=1e-5)


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


# ---- ring attention: sliding windows and soft-capping refused -------------------------


RING_REFUSED = [
    pytest.param("mistral", {"sliding_window": 8}, "sliding_window=8", id="mistral-window"),
    pytest.param(
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention"] * 2},
        "sliding_window=8",
        id="qwen2-sliding-layers",
    ),
    *[
        pytest.param(
            "gemma2",
            kw,
            want,
            id=name,
            marks=pytest.mark.skipif(not _available("gemma2"), reason="no gemma2"),
        )
        for name, kw, want in (
            ("gemma2", {}, "attn_logit_softcapping"),
            ("gemma2-softcap", {"sliding_window": 128}, "attn_logit_softcapping"),
            ("gemma2-window", {"attn_logit_softcapping": None}, "sliding_window=4"),
        )
    ],
    pytest.param(
        "gemma3",
        {},
        "sliding_window=4",
        id="gemma3",
        marks=pytest.mark.skipif(not _available("gemma3"), reason="no gemma3"),
    ),
]


@pytest.mark.parametrize(("arch", "kw", "want"), RING_REFUSED)
def test_ring_refuses_sliding_windows_and_softcapping(arch, kw, want):
    from qdelta.ring.hf import use_ring_attention

    model = build(arch, **kw)
    with pytest.raises(RingError, match=want):
        use_ring_attention(model)
    # Refused before anything changed.
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_qdelta_ring") for m in model.modules())


def test_ring_attention_function_refuses_window_and_softcap():
    """A setting changed after use_ring_attention still cannot be ignored silently."""
    from qdelta.ring.hf import ring_attention_forward, use_ring_attention

    model = use_ring_attention(build("mistral"))  # window 4096 >= 128 positions: accepted
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 8)
    kv = torch.randn(1, 2, 8, 8)
    with pytest.raises(RingError, match="sliding_window=4"):
        ring_attention_forward(attn, q, kv, kv, None, scaling=0.3, sliding_window=4)
    with pytest.raises(RingError, match="attn_logit_softcapping"):
        ring_attention_forward(attn, q, kv, kv, None, scaling=0.3, softcap=50.0)
