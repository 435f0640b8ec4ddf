"""Numerical edges: merges past a dtype's range, float64 models, model-wide casts,
a float64 default dtype, exact scaling of one compressed delta, non-finite steps
in distillation and float16 unpacking past its range."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.tiny_models import VOCAB, fake_finetune, tiny_llama
from torch import nn

import qdelta


def _pair(rng: np.random.Generator, dtype: torch.dtype, shapes=((24, 40), (40, 24))):
    torch.manual_seed(int(rng.integers(1 << 31)))
    base = nn.Sequential(*(nn.Linear(i, o) for o, i in shapes)).to(dtype)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return base, ft


def _bits(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone().view(torch.int16 if p.element_size() == 2 else torch.int32)
            for p in model.parameters()]  # fmt: skip


def _near_fp16_max(rng: np.random.Generator):
    """Layer 1 of the pair, once merged in float16, passes 65504 (layer 0 fits)."""
    base, ft = _pair(rng, torch.float16)
    with torch.no_grad():
        base[1].weight.fill_(6.5e4)  # 64992 in float16; merged + ~1250: inf
        for m in (base, ft):  # layer 1's inputs stay under 0.0064 for x = 1e-3: a finite forward
            m[0].bias.zero_()
        up = torch.rand(ft[1].weight.shape) < 0.5
        ft[1].weight.copy_(torch.where(up, 65504.0, 6.3e4))
    return base, ft


def test_a_float16_merge_past_its_range_is_refused_and_writes_nothing(rng):
    base, ft = _near_fp16_max(rng)
    delta = qdelta.compress(base, ft)
    before = _bits(base)
    with pytest.raises(qdelta.NonFiniteError, match=r"merge 1: expected weights within "
                       r"torch.float16's range \(\+-65504\), found .* = inf"):  # fmt: skip
        qdelta.merge(base, delta)
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(base), strict=True))
    dense = qdelta.dense_delta(base, ft)  # exact: fits; pushed past 65504 here
    dense.layers["1"] += 2000.0
    with pytest.raises(qdelta.NonFiniteError, match="merge 1: expected weights within"):
        dense.merge_into(base)
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(base), strict=True))

    # The applied model computes it (the delta term is added to the base output).
    applied = qdelta.apply(copy.deepcopy(base), delta)
    x = torch.full((1, 40), 1e-3, dtype=torch.float16)
    y = applied(x)
    assert torch.isfinite(y).all()
    layer = applied[1]
    with pytest.raises(
        qdelta.NonFiniteError,
        match=r"merge BitDeltaLinear\(out=40, in=24\): expected weights within",
    ):
        layer.merge()
    assert not layer.merged and torch.equal(applied(x), y)


@pytest.mark.parametrize("scale_mode", ["matrix", "row"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_a_layers_abs_bound_covers_its_unpacked_delta(rng, bits, scale_mode):
    """merge checks overflow against this bound before unpacking anything."""
    d = rng.standard_normal((37, 70)).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 30))  # fmt: skip
    planes, scales = qdelta.pack_residual(d, bits=bits, scale=scale_mode)
    layer = qdelta.PackedLayer(planes, scales, d.shape)
    assert np.abs(layer.dense().astype(np.float64)).max() <= layer.abs_bound()
    assert layer.abs_bound() <= np.abs(layer.scales.astype(np.float64)).sum() * 1.001


def test_a_merge_past_the_bound_but_within_range_is_written(rng):
    """The bound is only a shortcut: past it the sum itself decides."""
    base, ft = _pair(rng, torch.float16)
    with torch.no_grad():
        base[1].weight.fill_(6.0e4)
        base[1].weight[0, 0] = 6.5e4  # max |w| + max |d| > 65504, but not at one index
        ft[1].weight.copy_(base[1].weight + 2000.0)
        ft[1].weight[0, 0] = 6.3e4  # its delta goes down
    delta = qdelta.compress(base, ft)
    assert float(base[1].weight.abs().max()) + delta.layers["1"].abs_bound() > 65504
    merged = qdelta.merge(copy.deepcopy(base), delta)
    assert torch.isfinite(merged[1].weight).all()


def test_float64_models_compress_and_merge_in_float64(rng):
    base, ft = _pair(rng, torch.float64)
    with torch.no_grad():  # a delta far under the weights' float32 resolution
        base[0].weight.fill_(1.0)
        ft[0].weight.copy_(1.0 + 1e-9 * torch.randn(ft[0].weight.shape, dtype=torch.float64))
    delta = qdelta.compress(base, ft)
    true = (ft[0].weight - base[0].weight).detach().numpy()
    layer = delta.layers["0"]
    assert layer.scales[0] == pytest.approx(np.abs(true).mean(), rel=1e-6)
    np.testing.assert_array_equal(layer.dense() < 0, true < 0)

    merged = qdelta.merge(copy.deepcopy(base), delta)
    for name, d in delta.layers.items():
        want = base.get_submodule(name).weight.detach() + torch.from_numpy(d.dense()).double()
        torch.testing.assert_close(merged.get_submodule(name).weight, want, rtol=0, atol=0)
    dense = qdelta.dense_delta(base, ft)
    assert float(dense.layers["0"].abs().mean()) == pytest.approx(np.abs(true).mean(), rel=1e-6)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_model_wide_casts_keep_the_scales_exact(rng, cast):
    """Scales of 1e-8..1e-5 would round in float16/bfloat16, the smallest to 0."""
    base, ft = _pair(rng, torch.float32)
    emb = nn.Embedding(30, 40)
    ft_emb = copy.deepcopy(emb)
    with torch.no_grad():
        ft[0].weight.add_(2.4e-8 * torch.randn_like(ft[0].weight))
        ft[1].weight.copy_(base[1].weight + 1e-5 * torch.randn_like(ft[1].weight))
        ft_emb.weight.add_(3e-8 * torch.randn_like(ft_emb.weight))
    delta = qdelta.compress(base, ft)
    emb_layer = qdelta.compress(
        nn.ModuleDict({"e": emb}), nn.ModuleDict({"e": ft_emb}), compress_embeddings=True
    ).layers["e"]
    model = qdelta.apply(copy.deepcopy(base), delta)
    wrapped = qdelta.BitDeltaEmbedding(emb, emb_layer)
    model[0].scales.grad = torch.ones_like(model[0].scales)  # mid-training
    for module, layers in ((model, delta.layers), (wrapped, {"": emb_layer})):
        getattr(module, cast)()
        for name, layer in layers.items():
            scales = module.get_submodule(name).scales
            assert scales.dtype == torch.float32 and isinstance(scales, nn.Parameter)
            np.testing.assert_array_equal(scales.detach().numpy(), layer.scales)
    assert model[0].scales.grad.dtype == torch.float32  # an optimizer step still works
    torch.optim.AdamW([copy.deepcopy(model[0]).scales]).step()
    # The delta still reaches the output: base + delta term in float32, then rounded.
    x = torch.randn(3, 24).to(getattr(torch, "float16" if cast == "half" else cast))
    y = model[1](x)
    want = (x.double() @ (model[1].base_layer.weight.double()
            + torch.from_numpy(delta.layers["1"].dense()).double()).T
            + model[1].base_layer.bias.double())  # fmt: skip
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    model.double()  # float64 widens them (exactly)
    assert model[0].scales.dtype == torch.float64
    np.testing.assert_array_equal(model[0].scales.detach().numpy(), delta.layers["0"].scales)


def test_a_float64_default_dtype_leaves_the_float32_fast_paths_working(rng):
    base, ft = _pair(rng, torch.float32)
    delta = qdelta.compress(base, ft)
    model = qdelta.apply(copy.deepcopy(base), delta)
    stack = qdelta.MultiTenantLinear(base[0])
    stack.add_tenant("t", delta.layers["0"])
    x = torch.randn(2, 40, dtype=torch.float32)
    ids = torch.tensor([0, -1])
    with torch.no_grad():
        want = model(x), stack(x, ids)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            got = model(x), stack(x, ids)
    finally:
        torch.set_default_dtype(old)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.detach())


def _dense(delta: qdelta.Delta, name: str) -> np.ndarray:
    return delta.layers[name].dense().astype(np.float64)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_one_compressed_delta_times_a_weight_is_exact(rng, tmp_path, bits, scale):
    """A greedy refit of a residual delta's own sum would move it (6-9%)."""
    base, ft = _pair(rng, torch.float32, shapes=((24, 45), (45, 24)))  # ragged rows
    delta = qdelta.compress(base, ft, bits=bits, scale=scale)
    same = qdelta.soup([delta])
    for name, layer in delta.layers.items():
        np.testing.assert_array_equal(same.layers[name].planes, layer.planes)
        np.testing.assert_array_equal(same.layers[name].scales, layer.scales)
    for w in (2.5, -0.5, -1.0):
        got = qdelta.combine([(delta, w)], base=base)
        assert got.metadata["bits"] == str(bits) and got.metadata["scale"] == scale
        for name, layer in delta.layers.items():
            out = got.layers[name]
            assert out.bits == bits and out.scale_mode == scale
            # Each scale is the float32 nearest |w| * scale (half an ulp off) and
            # dense() sums the planes in float32, so a weight where the planes'
            # scales cancel is off by a few ulps of the row's largest weight: an
            # absolute bound, not a relative one (a refit would be off by 6-9%).
            np.testing.assert_allclose(out.scales, abs(w) * layer.scales, rtol=2**-24, atol=0)
            want = w * _dense(delta, name)
            ulps = 4 * bits * 2**-24 * np.abs(want).max()
            np.testing.assert_allclose(_dense(got, name), want, rtol=0, atol=ulps)
            tail = layer.shape[1] % 32
            assert not (out.planes[..., -1] >> np.uint32(tail)).any()  # padding stays 0
            assert (out.scales >= 0).all()
        got.save(tmp_path / "scaled.qdelta")  # the writer checks the padding too
        qdelta.load(tmp_path / "scaled.qdelta")
    twice = qdelta.combine([(delta, 0.25), (delta, 0.75)])
    for name, layer in delta.layers.items():
        np.testing.assert_array_equal(twice.layers[name].planes, layer.planes)
        np.testing.assert_array_equal(twice.layers[name].scales, layer.scales)
    # Other planes than its own: refitted, as before.
    refit = qdelta.combine([(delta, 1.0)], bits=1)
    assert all(layer.bits == 1 for layer in refit.layers.values())


def test_a_non_finite_distillation_step_names_the_step_and_restores_the_model():
    base = tiny_llama(0)
    ft = fake_finetune(base, rel=0.05)
    calib = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    delta = qdelta.compress(base, ft)
    calls = {"n": 0}

    def poison(module, inputs, out):  # the teacher's logits go NaN at its 7th call
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 7 else out

    hook = ft.lm_head.register_forward_hook(poison)
    try:
        with pytest.raises(qdelta.NonFiniteError, match=r"distill step 3 of 6: .* loss nan"):
            qdelta.distill(base, ft, delta, calib, steps=6, batch_size=2, progress=False)
    finally:
        hook.remove()
    assert not qdelta.nn.delta_modules(base)
    assert all(p.requires_grad for p in base.parameters())


def test_a_run_that_ends_in_nan_keeps_the_initial_scales():
    """NaN > before is False: a diverged run must not pass for an improvement."""
    base = tiny_llama(0)
    ft = fake_finetune(base, rel=0.05)
    calib = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    delta = qdelta.compress(base, ft)
    # One step: its loss is finite, the update explodes, the evaluation after it is not.
    result = qdelta.distill(base, ft, delta, calib, steps=1, batch_size=2, lr=1e30, progress=False)
    assert result.kept_initial and not result.loss_after <= result.loss_before
    for name, layer in delta.layers.items():
        np.testing.assert_array_equal(result.delta.layers[name].scales, layer.scales)


def test_unpacking_to_float16_past_its_range_is_refused():
    planes, scales = qdelta.pack_residual(np.full((3, 40), 7e4, np.float32), 1)
    with pytest.raises(qdelta.NonFiniteError, match=r"float16's range.*\[0, 0\]"):
        qdelta.unpack_scaled(planes[0], scales, (3, 40), "float16")
    with pytest.raises(qdelta.NonFiniteError, match="float16's range"):
        qdelta.unpack_residual(planes, scales, (3, 40), "float16")
    ok = qdelta.unpack_residual(planes, scales, (3, 40), "bfloat16")
    assert qdelta.as_torch(ok, "bfloat16").float().eq(70144.0).all()  # bf16 rounding of 7e4
