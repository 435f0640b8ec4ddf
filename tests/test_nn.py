"""BitDeltaLinear against a float64 dense reference: forward, gradients, merge, state dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import torch_dtype
from torch import nn
from transformers.pytorch_utils import Conv1D

import qdelta


def _layer(rng, out_f, in_f, bits, scale, transposed=False):
    delta = rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.02
    planes, scales = qdelta.pack_residual(delta, bits=bits, scale=scale)
    return qdelta.PackedLayer(planes, scales, (out_f, in_f), transposed=transposed)


def _dense64(layer: qdelta.PackedLayer, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Independent decode: numpy bit unpacking, float64 sums."""
    words = layer.planes.astype("<u4").view(np.uint8)
    bits = np.unpackbits(words, axis=-1, bitorder="little")[..., : layer.shape[1]]
    signs = torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))
    s = torch.from_numpy(layer.scales.astype(np.float64)) if scales is None else scales.double()
    s = s[:, None, None] if s.dim() == 1 else s[:, :, None]
    return (signs * s).sum(0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("out_f", "in_f", "bits", "scale"),
    [(7, 33, 1, "matrix"), (40, 70, 3, "row"), (5, 32, 2, "row")],
)
def test_forward_matches_reference(rng, dtype, out_f, in_f, bits, scale):
    dt = torch_dtype(dtype)
    base = nn.Linear(in_f, out_f).to(dt)
    layer = _layer(rng, out_f, in_f, bits, scale)
    mod = qdelta.BitDeltaLinear(base, layer)
    x = torch.from_numpy(rng.standard_normal((2, 3, in_f)).astype(np.float32)).to(
        dt
    )  # leading dims
    w = base.weight.double() + _dense64(layer)
    want = x.double() @ w.T + base.bias.double()
    got = mod(x)
    assert got.dtype == dt and got.shape == (2, 3, out_f)
    tol = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 3e-3}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_conv1d_wrapping(rng):
    base = Conv1D(19, 45)  # nf=19 outputs, nx=45 inputs, weight [45, 19]
    torch.nn.init.normal_(base.weight, std=0.1)
    layer = _layer(rng, 19, 45, 2, "matrix", transposed=True)
    mod = qdelta.BitDeltaLinear(base, layer)
    x = torch.from_numpy(rng.standard_normal((4, 45)).astype(np.float32))
    want = x.double() @ (base.weight.double() + _dense64(layer).T) + base.bias.double()
    torch.testing.assert_close(mod(x).double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(qdelta.ModelMismatchError, match="Linear"):
        qdelta.BitDeltaLinear(base, _layer(rng, 19, 45, 1, "matrix", transposed=False))


@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_gradients_match_autograd_reference(rng, scale):
    base = nn.Linear(37, 11)
    layer = _layer(rng, 11, 37, 3, scale)
    mod = qdelta.BitDeltaLinear(base, layer)
    x = torch.from_numpy(rng.standard_normal((5, 37))).float().requires_grad_(True)
    g = torch.from_numpy(rng.standard_normal((5, 11))).float()
    (mod(x) * g).sum().backward()
    s64 = torch.from_numpy(layer.scales.astype(np.float64)).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y64 = x64 @ (base.weight.double() + _dense64(layer, s64)).T
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(mod.scales.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    assert base.weight.grad is not None  # the base stays an ordinary layer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_unmerge_reversible(rng, dtype):
    dt = torch_dtype(dtype)
    base = nn.Linear(70, 9).to(dt)
    original = base.weight.detach().clone()
    mod = qdelta.BitDeltaLinear(base, _layer(rng, 9, 70, 2, "row"))
    x = torch.from_numpy(rng.standard_normal((3, 70)).astype(np.float32)).to(dt)
    unmerged = mod(x)
    mod.merge()
    assert mod.merged and "merged=True" in repr(mod)
    tol = 1e-5 if dtype == "float32" else 3e-2
    torch.testing.assert_close(mod(x), unmerged, atol=tol, rtol=tol)
    mod.merge()  # idempotent
    mod.unmerge()
    eps = torch.finfo(dt).eps
    assert (base.weight - original).abs().max() <= 2 * eps * original.abs().max() + 1e-12
    torch.testing.assert_close(mod(x), unmerged, atol=tol, rtol=tol)


def test_base_layer_is_shared_not_copied(rng):
    base = nn.Linear(33, 8)
    layer = _layer(rng, 8, 33, 2, "matrix")
    mod = qdelta.BitDeltaLinear(base, layer)
    assert mod.base_layer is base and mod.base_layer.weight.data_ptr() == base.weight.data_ptr()
    # The planes buffer is the module's own copy (int32 bits of the uint32 planes):
    # load_state_dict writes into it, never into the caller's (or a mapped file's) arrays.
    assert mod.planes.dtype == torch.int32
    assert not np.shares_memory(mod.planes.numpy(), layer.planes)
    assert np.array_equal(mod.planes.numpy().view(np.uint32), layer.planes)
    assert isinstance(mod.scales, nn.Parameter) and mod.scales.requires_grad


def test_state_dict_round_trip_and_repr(rng):
    layer = _layer(rng, 12, 50, 3, "row")
    mod = qdelta.BitDeltaLinear(nn.Linear(50, 12), layer)
    with torch.no_grad():
        mod.scales.mul_(1.5)
    state = mod.state_dict()
    assert set(state) == {"base_layer.weight", "base_layer.bias", "planes", "scales"}
    fresh = qdelta.BitDeltaLinear(nn.Linear(50, 12), _layer(rng, 12, 50, 3, "row"))
    fresh.load_state_dict(state)
    x = torch.from_numpy(rng.standard_normal((2, 50)).astype(np.float32))
    torch.testing.assert_close(fresh(x), mod(x), rtol=0, atol=0)
    text = repr(mod)
    nbytes = 3 * 12 * 2 * 4 + 3 * 12 * 4  # planes [3, 12, ceil(50/32)] u32 + scales [3, 12] f32
    assert "bits=3" in text and "scale=row" in text and f"delta_size={nbytes:.1f} B" in text


def test_shape_mismatch_names_expectation(rng):
    with pytest.raises(qdelta.ShapeError, match=r"expected a \[8, 33\].*found \[8, 34\]"):
        qdelta.BitDeltaLinear(nn.Linear(33, 8), _layer(rng, 8, 34, 1, "matrix"))


@pytest.mark.parametrize(
    ("out_f", "in_f", "bits", "scale", "rows"),
    [(7, 33, 1, "matrix", 1), (40, 70, 3, "row", 16), (130, 64, 2, "row", 5)],
)
def test_decode_sized_inference_takes_the_fused_call(rng, out_f, in_f, bits, scale, rows):
    """No gradients, float32, at most 16 rows: one Rust pass (src/fused.rs) that must
    equal the float64 reference, follow in-place scale edits, and leave training
    (gradients on) on the differentiable path."""
    from qdelta.kernels import cpu

    base = nn.Linear(in_f, out_f)
    layer = _layer(rng, out_f, in_f, bits, scale)
    mod = qdelta.BitDeltaLinear(base, layer)
    x = torch.from_numpy(rng.standard_normal((rows, 1, in_f)).astype(np.float32))
    with torch.no_grad():
        assert mod._fuses(x) == (cpu.ISA == "avx512")
        for factor in (1.0, -0.5):  # an in-place scale edit is seen at once
            mod.scales.mul_(factor)
            got = mod(x)
            w = base.weight.double() + _dense64(layer, mod.scales.detach())
            want = x.double() @ w.T + base.bias.double()
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not mod._fuses(x)  # gradients on
    assert mod(x).requires_grad
    assert not mod._fuses(torch.zeros(17, in_f))  # more than 16 rows
