"""pack_signs / unpack_scaled vs numpy packbits and a plain copy (bandwidth ceiling).

Run with `make bench`; the report script turns the JSON into ratios.
"""

from __future__ import annotations

import numpy as np
import pytest

import qdelta

SIZES = [4096, 8192]


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}x{n}")
def delta(request) -> np.ndarray:
    n = request.param
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, n), dtype=np.float32) * 1e-3).astype(np.float16)


def _group(benchmark, delta, what):
    benchmark.group = f"{what}-{delta.shape[0]}x{delta.shape[1]}-float16"
    benchmark.extra_info["bytes_in"] = delta.nbytes


def test_pack_qdelta(benchmark, delta):
    _group(benchmark, delta, "pack")
    benchmark(qdelta.pack_signs, delta)


def test_pack_numpy_packbits(benchmark, delta):
    _group(benchmark, delta, "pack")
    # The comparison is part of the work: numpy has no sign-bit packer.
    benchmark(lambda: np.packbits(delta >= 0, axis=-1, bitorder="little"))


def test_pack_copy_ceiling(benchmark, delta):
    _group(benchmark, delta, "pack")
    benchmark(np.copy, delta)


def test_unpack_scaled_qdelta(benchmark, delta):
    _group(benchmark, delta, "unpack")
    packed = qdelta.pack_signs(delta)
    benchmark(qdelta.unpack_scaled, packed, np.float32(1e-3), delta.shape, "float16")


def test_unpack_numpy_unpackbits(benchmark, delta):
    _group(benchmark, delta, "unpack")
    packed = np.packbits(delta >= 0, axis=-1, bitorder="little")
    alpha = np.float16(1e-3)

    def numpy_unpack():
        bits = np.unpackbits(packed, axis=-1, bitorder="little")
        return np.where(bits.astype(bool), alpha, -alpha)

    benchmark(numpy_unpack)


def test_unpack_copy_ceiling(benchmark, delta):
    _group(benchmark, delta, "unpack")
    benchmark(np.copy, delta)
