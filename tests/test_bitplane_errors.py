"""Bad input: a QDeltaError subclass that says what was expected and found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qdelta
from qdelta import reference


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_finite_names_position(bad, dtype):
    delta = np.ones((4, 50), dtype=dtype)
    delta[3, 41] = bad
    with pytest.raises(qdelta.NonFiniteError, match=r"\[3, 41\]"):
        qdelta.pack_signs(delta)
    with pytest.raises(qdelta.NonFiniteError, match=r"\[3, 41\]"):
        qdelta.pack_residual(delta, bits=2)


def test_non_finite_bfloat16():
    delta = torch.ones(2, 3, dtype=torch.bfloat16)
    delta[1, 2] = float("nan")
    with pytest.raises(qdelta.NonFiniteError, match="bfloat16"):
        qdelta.pack_signs(delta)


@pytest.mark.parametrize(
    ("arr", "exc", "pattern"),
    [
        (np.ones((3,), np.float32), qdelta.ShapeError, "expected a 2-D array, found 1-D"),
        (np.ones((2, 2, 2), np.float32), qdelta.ShapeError, "found 3-D"),
        (np.ones((2, 3), np.float64), qdelta.DTypeError, "found float64"),
        (np.ones((2, 3), np.int32), qdelta.DTypeError, "found int32"),
        (np.ones((0, 3), np.float32), qdelta.ShapeError, "non-empty"),
        (np.ones((4, 6), np.float32)[:, ::2], qdelta.ShapeError, "C-contiguous"),
        (np.ones((4, 6), np.float16)[:, ::2], qdelta.ShapeError, "C-contiguous"),
        ([[1.0, 2.0]], qdelta.DTypeError, "found list"),
        (torch.ones(2, 3, dtype=torch.int64), qdelta.DTypeError, "torch.int64"),
        (torch.ones(4, 6).T, qdelta.ShapeError, "contiguous"),
    ],
)
def test_bad_inputs(arr, exc, pattern):
    with pytest.raises(exc, match=pattern):
        qdelta.pack_signs(arr)


def test_errors_are_one_family():
    for cls in (
        qdelta.ShapeError,
        qdelta.DTypeError,
        qdelta.NonFiniteError,
        qdelta.BaseMismatchError,
    ):
        assert issubclass(cls, qdelta.QDeltaError)


def test_packed_too_short():
    packed = qdelta.pack_signs(np.ones((4, 40), np.float32))
    with pytest.raises(qdelta.ShapeError, match=r"needs packed shape \[5, 2\].*found \[4, 2\]"):
        qdelta.unpack_signs(packed, (5, 40))
    with pytest.raises(qdelta.ShapeError, match="found"):
        qdelta.unpack_scaled(packed, 1.0, (4, 70))
    with pytest.raises(qdelta.DTypeError, match="expected dtype uint32, found int32"):
        qdelta.unpack_signs(packed.view(np.int32), (4, 40))


def test_wrong_scales():
    packed = qdelta.pack_signs(np.ones((4, 40), np.float32))
    with pytest.raises(qdelta.ShapeError, match=r"1 value \(per matrix\) or 4 \(per row\)"):
        qdelta.unpack_scaled(packed, np.ones(3, np.float32), (4, 40))
    planes, scales = qdelta.pack_residual(np.ones((4, 40), np.float32), bits=2, scale="row")
    with pytest.raises(qdelta.ShapeError, match=r"expected shape \[2\].*or \[2, 4\]"):
        qdelta.unpack_residual(planes, scales[:1], (4, 40))
    with pytest.raises(qdelta.NonFiniteError, match="scales"):
        qdelta.unpack_scaled(packed, np.float32("nan"), (4, 40))


def test_scales_as_half_precision_tensors_and_dtype_names():
    import torch

    rng = np.random.default_rng()
    delta = rng.standard_normal((4, 40)).astype(np.float32)
    packed = qdelta.pack_signs(delta)
    want = np.where(delta < 0, -1.0, 1.0) * np.float32(0.375)  # exact in bf16 and fp16
    for dtype in (torch.bfloat16, torch.float16):
        got = qdelta.unpack_scaled(packed, torch.tensor(0.375, dtype=dtype), (4, 40))
        np.testing.assert_array_equal(got, want)
        planes, scales = qdelta.pack_residual(delta, bits=2)
        got = qdelta.unpack_residual(planes, torch.from_numpy(scales).to(dtype), (4, 40))
        ref = qdelta.unpack_residual(planes, torch.from_numpy(scales).to(dtype).float(), (4, 40))
        np.testing.assert_array_equal(got, ref)
    for bad in (None, 3, np.dtype("float32"), "float64"):
        with pytest.raises(qdelta.DTypeError, match=r"dtype: expected one of \['float32'"):
            qdelta.unpack_scaled(packed, 1.0, (4, 40), dtype=bad)
        with pytest.raises(qdelta.DTypeError, match=r"dtype: expected one of"):
            qdelta.unpack_residual(planes, scales, (4, 40), dtype=bad)


def test_bad_bits_and_scale_mode():
    delta = np.ones((2, 8), np.float32)
    with pytest.raises(qdelta.QDeltaError, match=r"bits: expected 1\.\.=32"):
        qdelta.pack_residual(delta, bits=0)
    with pytest.raises(qdelta.QDeltaError, match='"matrix" or "row"'):
        qdelta.pack_residual(delta, bits=1, scale="column")
    planes, scales = qdelta.pack_residual(delta, bits=2)
    with pytest.raises(qdelta.QDeltaError, match=r"bits: expected 1\.\.=2"):
        qdelta.unpack_residual(planes, scales, (2, 8), bits=3)


def test_bad_output_dtype_and_shape():
    packed = qdelta.pack_signs(np.ones((2, 8), np.float32))
    with pytest.raises(qdelta.DTypeError, match="float64"):
        qdelta.unpack_scaled(packed, 1.0, (2, 8), "float64")
    with pytest.raises(qdelta.ShapeError, match="positive"):
        qdelta.unpack_signs(packed, (0, 8))
    with pytest.raises(qdelta.ShapeError, match="rows, cols"):
        qdelta.unpack_signs(packed, (2,))


# --- sizes: always a QDeltaError saying what was expected and found ----------------

BAD_SHAPES = [
    ((2**64, 8), "found 18446744073709551616 \\* 8"),
    ((8, 2**64), "found 8 \\* 18446744073709551616"),
    ((-3, 8), r"positive \(rows, cols\), found \(-3, 8\)"),
    ((8, -1), r"positive \(rows, cols\), found \(8, -1\)"),
    ((-(2**70), 8), "positive"),
    ((2, 8, 1), r"\(rows, cols\), two ints, found \(2, 8, 1\)"),
    ((2,), r"\(rows, cols\), two ints, found \(2,\)"),
    ((2.5, 8), r"two ints, found \(2\.5, 8\)"),
    ((2, 8.0), r"two ints, found \(2, 8\.0\)"),
    (("2", "8"), "two ints, found \\('2', '8'\\)"),
    ((True, 8), r"two ints, found \(True, 8\)"),
    ((None, 8), r"two ints, found \(None, 8\)"),
    (5, "two ints, found 5"),
    (None, "two ints, found None"),
    ("ab", "two ints, found 'ab'"),
]


def _no_builtin_error(excinfo):
    assert isinstance(excinfo.value, qdelta.QDeltaError)
    assert not isinstance(excinfo.value, (OverflowError, TypeError, ValueError, MemoryError))
    message = str(excinfo.value)
    assert ("expected" in message or "needs" in message) and "found" in message


def _packed(rng, rows=2, cols=8):
    delta = rng.standard_normal((rows, cols)).astype(np.float32)
    return delta, qdelta.pack_signs(delta)


@pytest.mark.parametrize(("shape", "pattern"), BAD_SHAPES)
def test_bad_shape_unpack_signs(rng, shape, pattern):
    _, packed = _packed(rng)
    with pytest.raises(qdelta.ShapeError, match=pattern) as excinfo:
        qdelta.unpack_signs(packed, shape)
    _no_builtin_error(excinfo)


@pytest.mark.parametrize(("shape", "pattern"), BAD_SHAPES)
def test_bad_shape_unpack_scaled(rng, shape, pattern):
    _, packed = _packed(rng)
    with pytest.raises(qdelta.ShapeError, match=pattern) as excinfo:
        qdelta.unpack_scaled(packed, np.float32(rng.uniform(0.1, 1.0)), shape)
    _no_builtin_error(excinfo)


@pytest.mark.parametrize(("shape", "pattern"), BAD_SHAPES)
def test_bad_shape_unpack_residual(rng, shape, pattern):
    planes, scales = qdelta.pack_residual(rng.standard_normal((2, 8)).astype(np.float32), bits=2)
    with pytest.raises(qdelta.ShapeError, match=pattern) as excinfo:
        qdelta.unpack_residual(planes, scales, shape)
    _no_builtin_error(excinfo)


@pytest.mark.parametrize(
    "shape",
    [
        (2**40, 2**40),
        (2**32, 2**32),
        (1, 2**62),
        (2**62, 1),
        (2**63, 2**63),
        (2**30, 2**30),
        (2**20, 2**40),
    ],
)
def test_overflowing_sizes_are_a_qdelta_error(rng, shape):
    """Sizes whose product (or packed size) cannot exist: a ShapeError, never a crash
    or a MemoryError. (2**30, 2**30) and (2**20, 2**40) pass the Python product check and
    are refused by the core (packed shape mismatch) before it allocates anything."""
    _, packed = _packed(rng)
    planes, scales = qdelta.pack_residual(rng.standard_normal((2, 8)).astype(np.float32), bits=2)
    calls = [
        lambda: qdelta.unpack_signs(packed, shape),
        lambda: qdelta.unpack_scaled(packed, 0.5, shape),
        lambda: qdelta.unpack_scaled(packed, 0.5, shape, "bfloat16"),
        lambda: qdelta.unpack_residual(planes, scales, shape),
        lambda: qdelta.unpack_residual(planes, scales, shape, "float16", bits=1),
    ]
    for call in calls:
        with pytest.raises(qdelta.ShapeError) as excinfo:
            call()
        _no_builtin_error(excinfo)
        assert str(shape[0]) in str(excinfo.value) and str(shape[1]) in str(excinfo.value)


def test_numpy_integer_shapes_still_work(rng):
    rows, cols = (int(v) for v in rng.integers(1, 80, size=2))
    delta, packed = _packed(rng, rows, cols)
    want = np.where(np.signbit(delta), -1, 1)
    for shape in [(np.int64(rows), np.int32(cols)), np.array([rows, cols]), [rows, cols]]:
        np.testing.assert_array_equal(qdelta.unpack_signs(packed, shape), want)
    alpha = np.float32(rng.uniform(0.1, 1.0))
    np.testing.assert_array_equal(
        qdelta.unpack_scaled(packed, alpha, np.array([rows, cols])), want.astype(np.float32) * alpha
    )


@pytest.mark.parametrize(
    ("bits", "pattern"),
    [
        (-1, r"bits: expected 1\.\.=32, found -1"),
        (0, r"bits: expected 1\.\.=32, found 0"),
        (33, r"bits: expected 1\.\.=32, found 33"),
        (2**64, r"bits: expected 1\.\.=32, found 18446744073709551616"),
        (-(2**64), r"bits: expected 1\.\.=32, found -18446744073709551616"),
        (1.5, r"bits: expected an int in 1\.\.=32, found 1\.5"),
        (2.0, r"bits: expected an int in 1\.\.=32, found 2\.0"),
        ("2", "bits: expected an int in 1\\.\\.=32, found '2'"),
        (None, r"bits: expected an int in 1\.\.=32, found None"),
        (True, r"bits: expected an int in 1\.\.=32, found True"),
    ],
)
def test_bad_bits_pack_residual(rng, bits, pattern):
    delta = rng.standard_normal((3, 40)).astype(np.float32)
    with pytest.raises(qdelta.ShapeError, match=pattern) as excinfo:
        qdelta.pack_residual(delta, bits=bits)
    _no_builtin_error(excinfo)


@pytest.mark.parametrize(
    ("bits", "pattern"),
    [
        (-1, r"bits: expected 1\.\.=2 \(the planes stored\), found -1"),
        (0, r"bits: expected 1\.\.=2 \(the planes stored\), found 0"),
        (3, r"bits: expected 1\.\.=2 \(the planes stored\), found 3"),
        (2**64, r"found 18446744073709551616"),
        (1.5, r"bits: expected an int in 1\.\.=2 \(the planes stored\), found 1\.5"),
        ("1", "bits: expected an int in 1\\.\\.=2 \\(the planes stored\\), found '1'"),
        (False, r"found False"),
    ],
)
def test_bad_bits_unpack_residual(rng, bits, pattern):
    delta = rng.standard_normal((3, 40)).astype(np.float32)
    planes, scales = qdelta.pack_residual(delta, bits=2)
    with pytest.raises(qdelta.ShapeError, match=pattern) as excinfo:
        qdelta.unpack_residual(planes, scales, (3, 40), bits=bits)
    _no_builtin_error(excinfo)


def test_numpy_integer_bits_still_work(rng):
    delta = rng.standard_normal((5, 70)).astype(np.float32)
    planes, scales = qdelta.pack_residual(delta, bits=np.int64(3))
    assert planes.shape[0] == 3
    np.testing.assert_array_equal(
        qdelta.unpack_residual(planes, scales, (5, 70), bits=np.int32(2)),
        qdelta.unpack_residual(planes, scales, (5, 70), bits=2),
    )
    want = reference.unpack_planes(
        torch.from_numpy(planes.view(np.int32)), torch.from_numpy(scales), 70, bits=2
    )
    np.testing.assert_allclose(
        qdelta.unpack_residual(planes, scales, (5, 70), bits=np.int32(2)), want.numpy(), rtol=1e-6
    )


def test_unpack_scaled_packed_not_an_array(rng):
    _, packed = _packed(rng)
    with pytest.raises(
        qdelta.DTypeError, match="packed: expected a uint32 numpy array, found list"
    ):
        qdelta.unpack_scaled(packed.tolist(), 1.0, (2, 8))
