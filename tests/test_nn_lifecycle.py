"""BitDeltaLinear / BitDeltaEmbedding through a module's life: state dicts (merged
or not, from a mapped file), hooks on the base layer, double backward, tracing and
float64. Every check is against an independent float64 dense reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import qdelta
from qdelta.nn import delta_modules


def _layer(rng, out_f, in_f, bits=2, scale="row", size=0.02):
    delta = rng.standard_normal((out_f, in_f)).astype(np.float32) * size
    planes, scales = qdelta.pack_residual(delta, bits=bits, scale=scale)
    return qdelta.PackedLayer(planes, scales, (out_f, in_f))


def _signs64(planes: torch.Tensor, cols: int) -> torch.Tensor:
    """Independent decode of int32 planes (numpy bit unpacking): float64 +-1 ``[P, N, cols]``."""
    words = planes.detach().cpu().numpy().astype("<i4").view(np.uint8)
    bits = np.unpackbits(words, axis=-1, bitorder="little")[..., :cols]
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))


def _dense64(planes: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    s = scales.double()
    s = s[:, None, None] if s.dim() == 1 else s[:, :, None]
    return (_signs64(planes, cols) * s).sum(0)


def _want(mod: qdelta.BitDeltaLinear, x: torch.Tensor, weight=None) -> torch.Tensor:
    """float64 ``x @ (W + D)^T + b`` of an nn.Linear-based module."""
    w = mod.base_layer.weight.detach().double() if weight is None else weight.double()
    d = _dense64(mod.planes, mod.scales.detach(), mod.in_features)
    return x.double() @ (w + d).T + mod.base_layer.bias.detach().double()


def _module(rng, out_f=24, in_f=40, dtype=torch.float32, size=0.02, base=None):
    base = nn.Linear(in_f, out_f) if base is None else base
    return qdelta.BitDeltaLinear(base.to(dtype), _layer(rng, out_f, in_f, size=size))


def _x(rng, *shape, dtype=torch.float32):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


# ---------------------------------------------------------------- planes are owned


def test_planes_are_a_copy_the_caller_keeps_intact(rng):
    layer = _layer(rng, 24, 40)
    before = layer.planes.copy()
    mod = qdelta.BitDeltaLinear(nn.Linear(40, 24), layer)
    emb_layer = _layer(rng, 30, 16)
    emb = qdelta.BitDeltaEmbedding(nn.Embedding(30, 16), emb_layer)
    assert not np.shares_memory(mod.planes.numpy(), layer.planes)
    assert not np.shares_memory(emb.planes.numpy(), emb_layer.planes)
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    state["planes"].bitwise_not_()
    mod.load_state_dict(state)
    assert np.array_equal(layer.planes, before)  # the Delta is not written through
    x = _x(rng, 3, 40)
    with torch.no_grad():
        torch.testing.assert_close(mod(x).double(), _want(mod, x), atol=1e-5, rtol=1e-5)


def test_loaded_file_model_takes_its_own_state_dict(rng, tmp_path):
    """The planes of a loaded .qdelta file are a read-only map: load_state_dict
    into a view of it was a segfault."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 3))
    ft = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 3))
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)) * 0.02)
    qdelta.compress(base, ft, targets=["0", "2"], bits=2).save(tmp_path / "d.qdelta")
    loaded = qdelta.load(tmp_path / "d.qdelta")
    model = qdelta.apply(base, loaded)
    for name, mod in delta_modules(model).items():
        assert not np.shares_memory(mod.planes.numpy(), loaded.layers[name].planes)
    x = _x(rng, 5, 40)
    with torch.no_grad():
        want = model(x)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


# ---------------------------------------------------------------- merged state dicts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_state_dict_loads_as_merged_and_unmerges_exactly(rng, dtype):
    # Large deltas: subtracting again does not round back, the merge fix is needed.
    mod = _module(rng, dtype=dtype, size=0.5)
    original = mod.base_layer.weight.detach().clone()
    x = _x(rng, 3, 40, dtype=dtype)
    want = _want(mod, x.double(), original.double())
    mod.merge()
    assert mod._merge_fix is not None
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = qdelta.BitDeltaLinear(
        nn.Linear(40, 24).to(dtype), _layer(rng, 24, 40, size=0.5)
    )  # unmerged, other weights
    fresh.load_state_dict(state, strict=True)
    assert fresh.merged
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        got = fresh(x).double()
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    fresh.unmerge()
    assert torch.equal(_bits(fresh.base_layer.weight), _bits(original))


def test_unmerged_state_dict_keeps_its_keys_and_unmerges_a_merged_module(rng):
    mod = _module(rng)
    state = mod.state_dict()
    assert set(state) == {"base_layer.weight", "base_layer.bias", "planes", "scales"}
    target = _module(rng)
    target.merge()
    target.load_state_dict(state, strict=True)  # an old-style checkpoint: no extra state
    assert not target.merged and target._merge_fix is None
    x = _x(rng, 4, 40)
    with torch.no_grad():
        torch.testing.assert_close(target(x).double(), _want(mod, x), atol=1e-5, rtol=1e-5)
    # A plain nn.Linear of the same base takes the base part unchanged.
    plain = nn.Linear(40, 24)
    plain.load_state_dict({k[len("base_layer.") :]: v for k, v in state.items() if "." in k})
    assert torch.equal(plain.weight, mod.base_layer.weight)


def test_partial_load_leaves_the_merged_state(rng):
    mod = _module(rng)
    mod.merge()
    mod.load_state_dict({"scales": mod.scales.detach().clone()}, strict=False)
    assert mod.merged


def test_bad_merged_state_is_a_clear_error(rng):
    mod = _module(rng)
    mod.merge()
    state = mod.state_dict()
    state["_extra_state"] = {"merged": True}
    with pytest.raises(RuntimeError, match="_extra_state: expected the merged state"):
        _module(rng).load_state_dict(state)
    state["_extra_state"] = {
        "merged": True,
        "merge_fix_index": torch.tensor([[99], [0]]),
        "merge_fix_values": torch.zeros(1),
    }
    with pytest.raises(RuntimeError, match=r"does not index a \[24, 40\] weight"):
        _module(rng).load_state_dict(state)


# ---------------------------------------------------------------- the base layer is called


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_decode_batch_calls_base_hooks_and_subclass_forward(rng):
    calls = []
    mod = _module(rng)
    mod.base_layer.register_forward_pre_hook(lambda m, inp: calls.append("pre"))
    mod.base_layer.register_forward_hook(lambda m, inp, out: out * 0.5)
    x = _x(rng, 4, 40)
    d = _dense64(mod.planes, mod.scales.detach(), 40)
    base = mod.base_layer
    want = 0.5 * (x.double() @ base.weight.double().T + base.bias.double()) + x.double() @ d.T
    with torch.no_grad():
        got = mod(x)
    assert calls == ["pre"]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)

    sub = _module(rng, base=_Doubled(40, 24))
    d = _dense64(sub.planes, sub.scales.detach(), 40)
    base = sub.base_layer
    want = 2 * (x.double() @ base.weight.double().T + base.bias.double()) + x.double() @ d.T
    with torch.no_grad():
        torch.testing.assert_close(sub(x).double(), want, atol=1e-5, rtol=1e-5)


def test_global_forward_hook_is_called(rng):
    mod = _module(rng)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, inp, out: seen.append(type(m).__name__)
    )
    try:
        with torch.no_grad():
            mod(_x(rng, 2, 40))
    finally:
        handle.remove()
    assert "Linear" in seen


def test_multitenant_decode_batch_calls_a_hook_added_later(rng):
    base = nn.Linear(40, 24)
    layer = qdelta.MultiTenantLinear(base)
    tid = layer.add_tenant("a", _layer(rng, 24, 40))
    x, ids = _x(rng, 4, 40), torch.tensor([tid] * 4)
    calls = []
    with torch.no_grad():
        layer(x, ids)  # may cache a fused plan for these ids
        base.register_forward_hook(lambda m, inp, out: calls.append(out.shape))
        got = layer(x, ids)
    assert calls == [torch.Size([4, 24])]
    want = x.double() @ base.weight.double().T + base.bias.double()
    planes, scales = layer.planes[0], layer.scales[0]
    want = want + x.double() @ _dense64(planes, scales, 40).T
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- autograd


def test_double_backward_through_the_scales(rng):
    """A gradient penalty: d/dscales of |d out/dx|^2, against dense float64 autograd."""
    mod = _module(rng)
    x = _x(rng, 4, 40).requires_grad_(True)
    (gx,) = torch.autograd.grad(mod(x).pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()

    s64 = mod.scales.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    d64 = (_signs64(mod.planes, 40) * s64[:, :, None]).sum(0)
    w = mod.base_layer.weight.detach().double()
    y64 = x64 @ (w + d64).T + mod.base_layer.bias.detach().double()
    (gx64,) = torch.autograd.grad(y64.pow(2).sum(), x64, create_graph=True)
    gx64.pow(2).sum().backward()
    torch.testing.assert_close(mod.scales.grad.double(), s64.grad, rtol=1e-4, atol=1e-4)


def test_float64_gradcheck_and_gradgradcheck(rng):
    mod = _module(rng, out_f=6, in_f=35).double()
    x = _x(rng, 3, 35, dtype=torch.float64).requires_grad_(True)
    s = mod.scales.detach().clone().requires_grad_(True)

    def f(x, s):
        return torch.func.functional_call(mod, {"scales": s}, (x,))

    assert torch.autograd.gradcheck(f, (x, s))
    assert torch.autograd.gradgradcheck(f, (x, s))


# ---------------------------------------------------------------- tracing


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*deprecated:FutureWarning")
@pytest.mark.parametrize("grad", [False, True])
def test_jit_trace_matches_eager_on_new_inputs(rng, grad):
    """The fused Rust call filling torch.empty was invisible to the tracer."""
    mod = _module(rng)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(mod, _x(rng, 4, 40))
    for rows in (4, 1):
        x = _x(rng, rows, 40)
        with torch.no_grad():
            torch.testing.assert_close(traced(x).double(), _want(mod, x), atol=1e-5, rtol=1e-5)


def test_torch_compile_full_graph(rng):
    mod = _module(rng)
    compiled = torch.compile(mod, backend="eager", fullgraph=True)
    x = _x(rng, 4, 40)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).double(), _want(mod, x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- float64


@pytest.mark.parametrize("rows", [3, 40])
def test_double_module_computes_in_float64(rng, rows):
    mod = _module(rng).double()
    x = _x(rng, rows, 40, dtype=torch.float64)
    with torch.no_grad():
        got = mod(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _want(mod, x), atol=1e-12, rtol=1e-12)
    original = mod.base_layer.weight.detach().clone()
    mod.merge()
    with torch.no_grad():
        torch.testing.assert_close(mod(x), _want(mod, x, original), atol=1e-12, rtol=1e-12)
    mod.unmerge()
    assert torch.equal(mod.base_layer.weight, original)


def test_double_embedding_computes_in_float64(rng):
    emb = qdelta.BitDeltaEmbedding(nn.Embedding(30, 16), _layer(rng, 30, 16)).double()
    ids = torch.from_numpy(rng.integers(0, 30, (2, 5)))
    d = _dense64(emb.planes, emb.scales.detach(), 16)
    want = emb.base_layer.weight.detach() + d
    torch.testing.assert_close(emb(ids), want[ids], atol=1e-12, rtol=1e-12)
