"""qdelta.memory: bad shapes and counts are refused with a clear error."""

from __future__ import annotations

import re

import numpy as np
import pytest

import qdelta
from qdelta.memory import LLAMA_7B, LlamaShape, llama_serving_bytes

SHAPE = LlamaShape(**LLAMA_7B)


def test_llama_7b_numbers_are_sane():
    row = llama_serving_bytes(SHAPE, 4)
    assert row["n"] == 4 and row["delta_bytes"] > 0
    assert row["full_models_bytes"] == 4 * llama_serving_bytes(SHAPE, 1)["full_models_bytes"]
    assert 1 < row["ratio"] < 4
    # numpy ints are ints too.
    assert llama_serving_bytes(LlamaShape(*map(np.int64, LLAMA_7B.values())), np.int64(4)) == row


@pytest.mark.parametrize(
    ("dims", "found"),
    [
        ((0, 0, 0, 0), "layers: expected an int >= 1, found 0"),
        ((32, -4096, 11008, 32000), "hidden: expected an int >= 1, found -4096"),
        ((32, 4096, 11008.0, 32000), "mlp: expected an int >= 1, found 11008.0"),
        ((32, 4096, 11008, True), "vocab: expected an int >= 1, found True"),
    ],
)
def test_bad_shapes_are_refused(dims, found):
    # LlamaShape(0, 0, 0, 0) used to reach a ZeroDivisionError in the ratio.
    with pytest.raises(qdelta.ShapeError, match=re.escape(found)):
        LlamaShape(*dims)


@pytest.mark.parametrize(
    ("kwargs", "found"),
    [
        ({"n": -3}, "n: expected an int >= 1, found -3"),
        ({"n": 0}, "n: expected an int >= 1, found 0"),
        ({"n": 2.5}, "n: expected an int >= 1, found 2.5"),
        ({"n": 1, "bits": -1}, "bits: expected an int in 1..=32, found -1"),
        ({"n": 1, "bits": 0}, "bits: expected an int in 1..=32, found 0"),
        ({"n": 1, "bits": 33}, "bits: expected an int in 1..=32, found 33"),
        ({"n": 1, "dtype_bytes": 0}, "dtype_bytes: expected an int >= 1, found 0"),
    ],
)
def test_bad_counts_are_refused(kwargs, found):
    # n=-3 or bits=-1 used to return negative byte counts.
    with pytest.raises(qdelta.ShapeError, match=re.escape(found)):
        llama_serving_bytes(SHAPE, **kwargs)


def test_shape_must_be_a_llama_shape():
    with pytest.raises(qdelta.ShapeError, match="expected a LlamaShape, found dict"):
        llama_serving_bytes(LLAMA_7B, 1)


@pytest.mark.parametrize("pack_embeddings", [False, True])
def test_odd_shapes_count_the_padded_words_the_packing_writes(pack_embeddings):
    """Rows pad to whole 32-bit words: the arithmetic matches what a real tiny
    Llama's delta takes (hidden 33, mlp 65: neither a multiple of 32)."""
    shape = LlamaShape(layers=2, hidden=33, mlp=65, vocab=10)
    got = llama_serving_bytes(shape, 1, bits=2, pack_embeddings=pack_embeddings)
    h, m, v = shape.hidden, shape.mlp, shape.vocab
    matrices = 2 * ([(h, h)] * 4 + [(m, h)] * 2 + [(h, m)])
    if pack_embeddings:
        matrices += [(v, h)] * 2
    signs = sum(
        qdelta.pack_residual(np.ones(s, np.float32), bits=2, scale="row")[0].nbytes
        for s in matrices
    )
    rows = sum(out for out, _ in matrices)
    whole = 2 * (shape.norm_weights + (0 if pack_embeddings else 2 * v * h))
    assert got["delta_bytes"] == signs + 4 * 2 * rows + whole


def test_memory_report_bits_are_capped_at_the_planes_a_file_holds():
    with pytest.raises(qdelta.ShapeError, match=r"bits: expected an int in \[1, 33\), found 37"):
        qdelta.peft_import.memory_report({"l": (4, 4)}, 2, bits=37)
