"""Bad input: a QDeltaError subclass that says what was expected and found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qdelta


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
