"""Rust bit-plane core vs the torch reference, bit-exact, every dtype."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tests.conftest import torch_dtype

import qdelta
from qdelta import reference

DTYPES = ["float32", "float16", "bfloat16"]
SHAPES = [(1, 1), (1, 31), (1, 32), (1, 33), (7, 1), (5, 100), (64, 64), (33, 257), (3, 1000)]


def random_delta(rng: np.random.Generator, shape, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * 1e-2
    return t.to(torch_dtype(dtype))


def as_u32(words: torch.Tensor) -> np.ndarray:
    return words.numpy().view(np.uint32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_signs_matches_reference(rng, dtype, shape):
    delta = random_delta(rng, shape, dtype)
    packed = qdelta.pack_signs(delta)
    assert packed.dtype == np.uint32
    assert packed.shape == (shape[0], qdelta.words_per_row(shape[1]))
    np.testing.assert_array_equal(packed, as_u32(reference.pack_signs(delta)))
    signs = qdelta.unpack_signs(packed, shape)
    assert signs.dtype == np.int8
    np.testing.assert_array_equal(signs, torch.where(torch.signbit(delta), -1, 1).numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_inputs_equal_torch_inputs(rng, dtype):
    delta = random_delta(rng, (9, 70), dtype)
    if dtype == "bfloat16":
        arr = delta.view(torch.int16).numpy().view(np.uint16)
    else:
        arr = delta.numpy()
    np.testing.assert_array_equal(qdelta.pack_signs(arr), qdelta.pack_signs(delta))


def test_zero_and_negative_zero():
    delta = np.array([[0.0, -0.0, 1.0, -1.0]], dtype=np.float32)
    assert qdelta.pack_signs(delta).tolist() == [[0b1010]]
    assert qdelta.unpack_signs(qdelta.pack_signs(delta), (1, 4)).tolist() == [[1, -1, 1, -1]]


def test_tail_padding_is_zero():
    packed = qdelta.pack_signs(-np.ones((2, 40), dtype=np.float32))
    assert packed.tolist() == [[0xFFFFFFFF, 0xFF]] * 2


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_unpack_scaled_matches_reference(rng, out_dtype, per_row):
    shape = (13, 77)
    delta = random_delta(rng, shape, "float32")
    packed = qdelta.pack_signs(delta)
    scales = rng.uniform(0.01, 1.0, size=shape[0] if per_row else 1).astype(np.float32)
    dense = qdelta.as_torch(qdelta.unpack_scaled(packed, scales, shape, out_dtype), out_dtype)
    want = reference.unpack_planes(
        torch.from_numpy(packed.view(np.int32))[None],
        torch.from_numpy(scales.reshape(1, -1) if per_row else scales),
        shape[1],
        dtype=torch_dtype(out_dtype),
    )
    assert dense.dtype == torch_dtype(out_dtype)
    torch.testing.assert_close(dense, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["matrix", "row"])
@pytest.mark.parametrize("shape", [(1, 5), (17, 33), (40, 130)])
def test_pack_residual_matches_reference(rng, dtype, scale, shape):
    delta = random_delta(rng, shape, dtype)
    planes, scales = qdelta.pack_residual(delta, bits=3, scale=scale)
    ref_planes, ref_scales = reference.pack_residual(delta, 3, scale)
    assert planes.shape == (3, shape[0], qdelta.words_per_row(shape[1]))
    assert scales.shape == ((3,) if scale == "matrix" else (3, shape[0]))
    np.testing.assert_array_equal(planes[0], as_u32(ref_planes[0]))
    np.testing.assert_allclose(scales, ref_scales.numpy(), rtol=1e-6)
    # Later planes: identical unless a residual sits within an ulp of zero.
    mismatch = (
        np.unpackbits((planes[1:] ^ as_u32(ref_planes[1:])).view(np.uint8)).sum()
        / planes[1:].size
        / 32
    )
    assert mismatch < 1e-3


@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_residual_error_falls_as_bits_grow(rng, scale):
    shape = (64, 200)
    delta = random_delta(rng, shape, "float32")
    planes, scales = qdelta.pack_residual(delta, bits=6, scale=scale)
    errors = []
    for k in range(1, 7):
        approx = qdelta.unpack_residual(planes, scales, shape, bits=k)
        want = reference.unpack_planes(
            torch.from_numpy(planes.view(np.int32)), torch.from_numpy(scales), shape[1], bits=k
        )
        np.testing.assert_allclose(approx, want.numpy(), rtol=1e-5, atol=1e-7)
        errors.append(float(np.linalg.norm(approx - delta.numpy())))
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.4 * errors[0]


def test_one_residual_plane_is_bitdelta(rng):
    delta = random_delta(rng, (20, 50), "float32")
    planes, scales = qdelta.pack_residual(delta, bits=1)
    np.testing.assert_array_equal(planes[0], qdelta.pack_signs(delta))
    assert scales[0] == pytest.approx(float(delta.abs().double().mean()), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=80),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_property_sign_round_trip(delta):
    signs = qdelta.unpack_signs(qdelta.pack_signs(delta), delta.shape)
    np.testing.assert_array_equal(signs, np.where(np.signbit(delta), -1, 1))


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float16,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70),
        elements=st.floats(-100, 100, width=16),
    ),
    st.integers(1, 4),
    st.sampled_from(["matrix", "row"]),
)
def test_property_residual_reconstruction(delta, bits, scale):
    planes, scales = qdelta.pack_residual(delta, bits=bits, scale=scale)
    approx = qdelta.unpack_residual(planes, scales, delta.shape, "float32")
    want = reference.unpack_planes(
        torch.from_numpy(planes.view(np.int32)), torch.from_numpy(scales), delta.shape[1]
    )
    np.testing.assert_allclose(approx, want.numpy(), rtol=1e-5, atol=1e-6)
    # Never worse than the zero matrix (each plane's greedy step cannot add error).
    d = delta.astype(np.float64)
    assert np.linalg.norm(approx - d) <= np.linalg.norm(d) * (1 + 1e-5) + 1e-6


def _finite_bf16_bits(b: int) -> int:
    """A bfloat16 bit pattern with an all-ones exponent (Inf / NaN) folded to a finite one."""
    return b if (b & 0x7F80) != 0x7F80 else b & 0x807F


BF16_BITS = st.one_of(
    # Any finite pattern: +-0, subnormals, the largest magnitudes.
    st.integers(0, 0xFFFF).map(_finite_bf16_bits),
    # Ordinary delta-sized values.
    st.floats(-1.0, 1.0, width=32).map(
        lambda x: int(torch.tensor([x]).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF
    ),
)


def bf16_arrays(max_side: int):
    return hnp.arrays(
        np.uint16,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=max_side),
        elements=BF16_BITS,
    )


def bf16_tensor(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)


@settings(max_examples=60, deadline=None)
@given(bf16_arrays(80))
def test_property_bfloat16_sign_round_trip(bits):
    delta = bf16_tensor(bits)
    packed = qdelta.pack_signs(delta)
    np.testing.assert_array_equal(packed, as_u32(reference.pack_signs(delta)))
    np.testing.assert_array_equal(qdelta.pack_signs(bits), packed)  # uint16 bits == tensor
    signs = qdelta.unpack_signs(packed, bits.shape)
    np.testing.assert_array_equal(signs, torch.where(torch.signbit(delta), -1, 1).numpy())
    np.testing.assert_array_equal(signs, np.where(bits >> 15, -1, 1))
    alpha = torch.tensor([0.03125], dtype=torch.float32)
    dense = qdelta.as_torch(
        qdelta.unpack_scaled(packed, alpha.numpy(), bits.shape, "bfloat16"), "bfloat16"
    )
    want = reference.unpack_planes(
        torch.from_numpy(packed.view(np.int32))[None], alpha, bits.shape[1], dtype=torch.bfloat16
    )
    assert dense.dtype == torch.bfloat16
    torch.testing.assert_close(dense, want, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(bf16_arrays(70), st.integers(1, 4), st.sampled_from(["matrix", "row"]))
def test_property_bfloat16_residual_round_trip(bits, k, scale):
    delta = bf16_tensor(bits)
    planes, scales = qdelta.pack_residual(delta, bits=k, scale=scale)
    ref_planes, ref_scales = reference.pack_residual(delta, k, scale)
    np.testing.assert_array_equal(planes, as_u32(ref_planes))
    np.testing.assert_allclose(scales, ref_scales.numpy(), rtol=1e-6)
    p32 = torch.from_numpy(planes.view(np.int32))
    # The core sums planes in float32, the reference in float64: allow float32 rounding
    # of the sum (absolute, for cancellation) plus one ulp of the output dtype.
    atol = 4 * 2**-23 * float(np.abs(scales).sum(axis=0).max())
    for out, rtol in (("float32", 2**-22), ("bfloat16", 2**-7)):
        approx = qdelta.as_torch(qdelta.unpack_residual(planes, scales, bits.shape, out), out)
        want = reference.unpack_planes(
            p32, torch.from_numpy(scales), bits.shape[1], dtype=torch_dtype(out)
        )
        assert approx.dtype == torch_dtype(out)
        torch.testing.assert_close(approx.float(), want.float(), rtol=rtol, atol=atol)
        if k == 1:  # one plane: no sum, so exact
            torch.testing.assert_close(approx, want, rtol=0, atol=0)
