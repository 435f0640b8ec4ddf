"""Applied models inside Hugging Face code: the wrappers' ``weight`` pass-through
(T5 reads ``wo.weight.dtype``), merged modules through ``save_pretrained``
(a tensor extra state), and tied tensors that stay tied through apply/unapply.

Every result is compared with an independent dense reference: a copy of the base
plus the sign planes decoded with numpy here (not by qdelta) and the kept
tensors written under every name the base ties to them.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import qdelta  # noqa: E402
from test_hf_architectures import VOCAB  # noqa: E402
from test_hf_architectures import _config as arch_config  # noqa: E402

V = VOCAB


def _config(arch: str):
    """The decoder-only configs are test_hf_architectures'; the encoder-decoders here."""
    T = transformers
    if arch in ("llama", "llama_tied", "gpt2"):
        return arch_config(arch)
    if arch == "t5":
        cfg = T.T5Config(
            vocab_size=V,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        return cfg, T.T5ForConditionalGeneration
    if arch == "bart":
        cfg = T.BartConfig(
            vocab_size=V,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
        )
        return cfg, T.BartForConditionalGeneration
    raise KeyError(arch)


def build(arch: str, seed: int = 0) -> nn.Module:
    cfg, cls = _config(arch)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms and biases off their init, so they matter
        g = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def finetune(base: nn.Module, seed: int = 1, untie: str | None = None) -> nn.Module:
    """Every parameter nudged (a tied one once: it stays tied); ``untie``: that
    parameter becomes a tensor of its own, nudged apart from its twin."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for p in ft.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.std() + 1e-2))
    if untie is not None:
        owner_name, _, attr = untie.rpartition(".")
        owner = ft.get_submodule(owner_name)
        old = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(old + 0.1 * torch.randn(old.shape, generator=g)))
    return ft


def np_unpack(layer: qdelta.PackedLayer) -> np.ndarray:
    """Independent decode of [P, out, W] uint32 sign planes (bit 1 = -1) to [out, in]."""
    out, inp = layer.shape
    planes = layer.planes
    bits = np.unpackbits(
        planes.view(np.uint8).reshape(planes.shape[0], out, -1), axis=-1, bitorder="little"
    )[..., :inp]
    signs = 1.0 - 2.0 * bits.astype(np.float64)
    s = np.asarray(layer.scales, dtype=np.float64)
    s = s[:, None, None] if s.ndim == 1 else s[:, :, None]
    return (signs * s).sum(0)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


@torch.no_grad()
def dense_reference(base: nn.Module, delta: qdelta.Delta) -> nn.Module:
    """base + decoded planes (a tied weight takes its delta once) + the kept tensors:
    a value kept under one name of a tied tensor is that tensor's; values kept
    under two names of it that differ untie it (each name its own tensor)."""
    ref = copy.deepcopy(base)
    aliases = _aliases(ref)
    params = dict(ref.named_parameters(remove_duplicate=False))
    for key in delta.params:
        given = [n for n in aliases.get(key, [key]) if n in delta.params]
        if len(given) > 1 and not all(
            torch.equal(delta.params[n], delta.params[key]) for n in given
        ):
            owner_name, _, attr = key.rpartition(".")
            setattr(ref.get_submodule(owner_name), attr, nn.Parameter(params[key].clone()))
    params = dict(ref.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    for name, layer in delta.layers.items():
        weight = ref.get_submodule(name).weight
        d = torch.from_numpy(np_unpack(layer)).to(weight.dtype)
        if id(weight) not in done:
            done.add(id(weight))
            weight.add_(d.T if layer.transposed else d)
    for key, value in delta.params.items():
        params[key].copy_(value)
    return ref


def _ids(n: int = 7, b: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, V, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits.float()
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key


def tie_groups(model: nn.Module) -> list[list[str]]:
    return sorted(g for g in map(sorted, _grouped(model)) if len(g) > 1)


def _grouped(model: nn.Module):
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return by_id.values()


# ---- the weight pass-through (T5 reads wo.weight.dtype) ------------------------------


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_apply_forward_generate_and_unapply(arch):
    base = build(arch)
    ft = finetune(base)
    delta = qdelta.compress(base, ft)
    assert delta.layers and any(n.endswith(("wo", "fc2")) for n in delta.layers)
    before, ties = snapshot(base), tie_groups(base)
    ids = _ids()
    ref = dense_reference(base, delta)
    merged = qdelta.merge(copy.deepcopy(base), delta)
    torch.testing.assert_close(logits(merged, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)

    model = qdelta.apply(base, delta)
    assert tie_groups(model) == ties  # the shared embedding and head stay one tensor
    for name in delta.layers:
        mod = model.get_submodule(name)
        assert mod.weight is mod.base_layer.weight
        assert mod.bias is mod.base_layer.bias
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, ids), generate(ref, ids))
    assert torch.equal(generate(model, ids), generate(merged, ids))

    qdelta.unapply(model)
    assert not qdelta.nn.delta_modules(model)
    assert tie_groups(model) == ties
    assert_bit_identical(model, before)


def test_t5_half_precision_reads_the_base_dtype():
    """T5 casts its hidden states to ``wo.weight.dtype``: after ``.to(bfloat16)``
    that is the base layer's new dtype, and the forward runs."""
    base = build("t5")
    delta = qdelta.compress(base, finetune(base))
    ref = dense_reference(base, delta).to(torch.bfloat16)
    model = qdelta.apply(copy.deepcopy(base), delta).to(torch.bfloat16)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, qdelta.BitDeltaLinear)
    assert wo.weight.dtype == torch.bfloat16 and wo.weight is wo.base_layer.weight
    ids = _ids()
    got, want = logits(model, ids), logits(ref, ids)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def _packed(rng: np.random.Generator, out: int, inp: int, bits: int = 2) -> qdelta.PackedLayer:
    words = -(-inp // 32)
    planes = rng.integers(0, 2**32, size=(bits, out, words), dtype=np.uint32)
    scales = (rng.random(bits) * 0.1 + 0.01).astype(np.float32)
    return qdelta.PackedLayer(planes, scales, (out, inp))


def test_weight_properties_stay_out_of_state_dicts_and_follow_the_base(rng):
    from transformers.pytorch_utils import Conv1D

    lin = qdelta.BitDeltaLinear(nn.Linear(40, 24), _packed(rng, 24, 40))
    conv_base = Conv1D(24, 40)  # weight [in, out]
    packed = _packed(rng, 24, 40)
    conv = qdelta.BitDeltaLinear(
        conv_base, qdelta.PackedLayer(packed.planes, packed.scales, (24, 40), True)
    )
    emb = qdelta.BitDeltaEmbedding(nn.Embedding(30, 16, padding_idx=2), _packed(rng, 30, 16))
    nobias = qdelta.BitDeltaLinear(nn.Linear(40, 24, bias=False), _packed(rng, 24, 40))

    for mod in (lin, conv):
        assert mod.weight is mod.base_layer.weight and mod.bias is mod.base_layer.bias
    assert conv.weight.shape == (40, 24)
    assert nobias.bias is None
    assert emb.weight is emb.base_layer.weight
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (30, 16, 2)
    assert (lin.in_features, lin.out_features) == (40, 24)

    # state dicts: just the base layer's keys and the delta's
    assert set(lin.state_dict()) == {"base_layer.weight", "base_layer.bias", "planes", "scales"}
    assert set(emb.state_dict()) == {"base_layer.weight", "planes", "scales"}
    assert [n for n, _ in lin.named_parameters()] == [
        "scales",
        "base_layer.weight",
        "base_layer.bias",
    ]
    other = qdelta.BitDeltaLinear(nn.Linear(40, 24), _packed(rng, 24, 40))
    other.load_state_dict(lin.state_dict(), strict=True)
    assert torch.equal(other.weight, lin.weight) and other.weight is other.base_layer.weight

    # copies: the property reads the copy's own base layer
    for mod in (lin, emb):
        dup = copy.deepcopy(mod)
        assert dup.weight is dup.base_layer.weight and dup.weight is not mod.weight
        assert torch.equal(dup.weight, mod.weight)
        buf = io.BytesIO()
        torch.save(mod, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded.weight is loaded.base_layer.weight
        assert torch.equal(loaded.weight, mod.weight)
        again = pickle.loads(pickle.dumps(mod))
        assert again.weight is again.base_layer.weight

    # dtype moves: the base layer's tensors are replaced, the property follows
    lin.half()
    assert lin.weight.dtype == torch.float16 and lin.weight is lin.base_layer.weight
    assert lin.bias.dtype == torch.float16

    # merged: the base weight (which the property shows) has the delta in
    w0 = other.weight.detach().clone()
    other.merge()
    torch.testing.assert_close(
        other.weight.detach().double(),
        w0.double() + torch.from_numpy(np_unpack(_layer_of(other))),
        rtol=0,
        atol=1e-5,
    )
    other.unmerge()
    assert torch.equal(other.weight, w0)


def _layer_of(mod: qdelta.BitDeltaLinear) -> qdelta.PackedLayer:
    planes = mod.planes.numpy().view(np.uint32)
    return qdelta.PackedLayer(
        planes, mod.scales.detach().numpy(), (mod.out_features, mod.in_features)
    )


# ---- merged modules through save_pretrained ------------------------------------------------


def _merge_all(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, qdelta.BitDeltaLinear):
            mod.merge()


def test_merged_applied_model_saves_with_save_pretrained_and_round_trips(tmp_path):
    base = build("llama")
    delta = qdelta.compress(base, finetune(base))
    before = snapshot(base)
    ref = dense_reference(base, delta)
    ids = _ids()

    model = qdelta.apply(copy.deepcopy(base), delta)
    _merge_all(model)
    model.save_pretrained(tmp_path / "saved")
    files = sorted((tmp_path / "saved").glob("*.safetensors"))
    assert files
    stored = {}
    for f in files:
        stored.update(safetensors_torch.load_file(f))
    extra = [k for k in stored if k.endswith("._extra_state")]
    assert sorted(k.removesuffix("._extra_state") for k in extra) == sorted(delta.layers)
    assert all(stored[k].dtype == torch.int64 and stored[k].dim() == 1 for k in extra)

    # A state dict (torch's, or read back from safetensors) into another applied model.
    for state in (model.state_dict(), stored):
        target = qdelta.apply(copy.deepcopy(base), delta)
        if state is stored:  # save_pretrained drops nothing here (the head is untied)
            assert set(state) == set(target.state_dict()) | set(extra)
        target.load_state_dict(state, strict=True)
        mods = qdelta.nn.delta_modules(target)
        assert mods and all(m.merged for m in mods.values())
        torch.testing.assert_close(logits(target, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
        qdelta.unapply(target)
        assert_bit_identical(target, before)  # the merge fixes came back bit-exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merged_state_survives_safetensors_bit_exactly(rng, dtype):
    # Large deltas: subtracting again does not round back, the merge fix is needed.
    base = nn.Linear(40, 24).to(dtype)
    original = base.weight.detach().clone()
    layer = _packed(rng, 24, 40)
    layer = qdelta.PackedLayer(layer.planes, layer.scales * 20, layer.shape)
    mod = qdelta.BitDeltaLinear(base, layer)
    mod.merge()
    assert mod._merge_fix is not None
    state = safetensors_torch.load(safetensors_torch.save(mod.state_dict()))
    fresh = qdelta.BitDeltaLinear(nn.Linear(40, 24).to(dtype), _packed(rng, 24, 40))
    fresh.load_state_dict(state, strict=True)
    assert fresh.merged
    fresh.unmerge()
    assert torch.equal(fresh.weight.view(torch.uint8), original.view(torch.uint8))


def test_older_dict_extra_state_still_loads(rng):
    """The dict form earlier versions wrote under ``_extra_state`` loads as merged."""
    base = nn.Linear(40, 24)
    original = base.weight.detach().clone()
    layer = _packed(rng, 24, 40)
    mod = qdelta.BitDeltaLinear(base, qdelta.PackedLayer(layer.planes, layer.scales * 20, (24, 40)))
    mod.merge()
    index, values = mod._merge_fix
    state = {k: v for k, v in mod.state_dict().items() if k != "_extra_state"}
    state["_extra_state"] = {
        "merged": True,
        "merge_fix_index": torch.stack(index),
        "merge_fix_values": values.clone(),
    }
    fresh = qdelta.BitDeltaLinear(nn.Linear(40, 24), _packed(rng, 24, 40))
    fresh.load_state_dict(state, strict=True)
    assert fresh.merged
    fresh.unmerge()
    assert torch.equal(fresh.weight.view(torch.uint8), original.view(torch.uint8))


def test_bad_extra_state_tensor_is_a_clear_error(rng):
    mod = qdelta.BitDeltaLinear(nn.Linear(40, 24), _packed(rng, 24, 40))
    mod.merge()
    state = mod.state_dict()
    for bad in (torch.zeros(3), torch.arange(10), state["_extra_state"][:-1]):
        state["_extra_state"] = bad
        with pytest.raises(RuntimeError, match="_extra_state: expected the merged state"):
            qdelta.BitDeltaLinear(nn.Linear(40, 24), _packed(rng, 24, 40)).load_state_dict(state)


# ---- tied tensors stay tied ---------------------------------------------------------------

TIED = {"gpt2": ("transformer.wte.weight", "lm_head.weight")}
TIED["llama_tied"] = ("model.embed_tokens.weight", "lm_head.weight")


def _with_params(delta: qdelta.Delta, params: dict[str, torch.Tensor]) -> qdelta.Delta:
    return qdelta.Delta(
        layers=dict(delta.layers),
        params=params,
        base_fingerprint=delta.base_fingerprint,
        tenant=delta.tenant,
        metadata=dict(delta.metadata),
    )


def _tied_deltas(arch: str):
    """(base, ft, the delta keeping the tied tensor under one name, under both names)."""
    emb, head = TIED[arch]
    base = build(arch)
    assert base.get_parameter(emb) is base.get_parameter(head)
    ft = finetune(base)
    delta = qdelta.compress(base, ft)
    value = ft.get_parameter(emb).detach().clone()
    rest = {k: v for k, v in delta.params.items() if k not in (emb, head)}
    one = _with_params(delta, {**rest, emb: value})
    both = _with_params(delta, {**rest, emb: value, head: value.clone()})
    return base, ft, one, both


@pytest.mark.parametrize("arch", list(TIED))
@pytest.mark.parametrize("form", ["one", "both"])
def test_tied_tensor_stays_one_tensor_through_apply_and_unapply(arch, form):
    emb, head = TIED[arch]
    base, ft, one, both = _tied_deltas(arch)
    delta = one if form == "one" else both
    ids = _ids()
    ref = dense_reference(base, delta)
    assert ref.get_parameter(emb) is ref.get_parameter(head)
    # The reference is the fine-tune up to the packing of its layers.
    torch.testing.assert_close(ref.get_parameter(head), ft.get_parameter(head))

    original = base.get_parameter(emb)
    before, ties = snapshot(base), tie_groups(base)
    model = qdelta.apply(base, delta)
    new = model.get_parameter(emb)
    assert new is model.get_parameter(head)  # still one tensor
    assert new is not original and torch.equal(new, ft.get_parameter(emb))
    assert isinstance(new, nn.Parameter) and new.requires_grad
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)

    qdelta.unapply(model)
    assert model.get_parameter(emb) is original and model.get_parameter(head) is original
    assert tie_groups(model) == ties
    assert_bit_identical(model, before)

    merged = qdelta.merge(copy.deepcopy(model), delta)
    assert merged.get_parameter(emb) is merged.get_parameter(head)
    torch.testing.assert_close(logits(merged, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(TIED))
def test_unapply_after_a_cast_gives_the_base_in_the_new_dtype(arch):
    """The tensors apply swapped out come back as the model is now (half), still tied."""
    emb, head = TIED[arch]
    base, _, one, _ = _tied_deltas(arch)
    want = copy.deepcopy(base).half()
    model = qdelta.apply(base, one)
    model.half()
    qdelta.unapply(model)
    assert model.get_parameter(emb) is model.get_parameter(head)
    got, ref = model.state_dict(), want.state_dict()
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    assert all(p.requires_grad for p in model.parameters())
    ids = _ids()
    torch.testing.assert_close(logits(model, ids), logits(want, ids))


@pytest.mark.parametrize("arch", list(TIED))
def test_fine_tune_that_unties_gets_a_tensor_per_name(arch):
    emb, head = TIED[arch]
    base = build(arch)
    ft = finetune(base, untie=head)
    assert ft.get_parameter(emb) is not ft.get_parameter(head)
    delta = qdelta.compress(base, ft)
    assert emb in delta.params and head in delta.params
    assert not torch.equal(delta.params[emb], delta.params[head])
    ids = _ids()
    ref = dense_reference(base, delta)
    assert ref.get_parameter(emb) is not ref.get_parameter(head)
    for key in (emb, head):  # the reference is the fine-tune up to the packed layers
        assert torch.equal(ref.get_parameter(key), ft.get_parameter(key))

    before = snapshot(base)
    model = qdelta.apply(base, delta)
    assert model.get_parameter(emb) is not model.get_parameter(head)
    assert torch.equal(model.get_parameter(emb), ft.get_parameter(emb))
    assert torch.equal(model.get_parameter(head), ft.get_parameter(head))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    qdelta.unapply(model)
    assert model.get_parameter(emb) is model.get_parameter(head)
    assert_bit_identical(model, before)

    # merge writes in place: one tied tensor cannot take two values, so it refuses
    target = copy.deepcopy(model)
    with pytest.raises(qdelta.ModelMismatchError, match="tied"):
        qdelta.merge(target, delta)
    assert_bit_identical(target, before)  # nothing written


@pytest.mark.parametrize("arch", list(TIED))
@pytest.mark.parametrize("compress_embeddings", [False, True])
def test_hf_tie_weights_on_an_applied_model_keeps_the_fine_tune(arch, compress_embeddings):
    """HF's ``tie_weights`` sets ``lm_head.weight = <embedding weight>``: on an applied
    model that is the tensor the head already has (a no-op on a wrapper); another
    tensor set on a wrapper is refused with a clear error."""
    emb, head = TIED[arch]
    base = build(arch)
    delta = qdelta.compress(base, finetune(base), compress_embeddings=compress_embeddings)
    assert (head.removesuffix(".weight") in delta.layers) == compress_embeddings
    ids = _ids()
    ref = dense_reference(base, delta)
    model = qdelta.apply(copy.deepcopy(base), delta)
    keys = set(model.state_dict())
    model.tie_weights()
    assert set(model.state_dict()) == keys
    assert model.get_parameter(emb) is model.get_parameter(head)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    if compress_embeddings:
        wrapper = model.get_submodule(head.removesuffix(".weight"))
        with pytest.raises(AttributeError, match="read-only"):
            wrapper.weight = nn.Parameter(wrapper.weight.detach().clone())
        assert wrapper.weight is model.get_parameter(emb)
