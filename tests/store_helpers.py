"""Random deltas for the store tests: ragged shapes, 1-3 planes, both scale
granularities, params in every dtype a fine-tune keeps whole."""

from __future__ import annotations

import numpy as np
import torch

import qdelta


def make_layer(rng: np.random.Generator, out: int, inp: int, bits: int, scale: str):
    dense = rng.standard_normal((out, inp)).astype(np.float32)
    planes, scales = qdelta.pack_residual(dense, bits=bits, scale=scale)
    return qdelta.PackedLayer(planes, scales, (out, inp), transposed=bool(rng.integers(2)))


def make_delta(rng: np.random.Generator, n_layers: int = 3, tenant: str = "t") -> qdelta.Delta:
    layers = {}
    for i in range(n_layers):
        out, inp = (int(v) for v in rng.integers(1, 90, size=2))
        bits = int(rng.integers(1, 4))
        layers[f"model.layers.{i}.proj"] = make_layer(rng, out, inp, bits, ("matrix", "row")[i % 2])
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    params = {
        "model.embed.weight": torch.randn(13, 7, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(7, generator=gen).to(torch.float16),
        "lm_head.bias": torch.randn(5, generator=gen),
        "model.step": torch.tensor(int(rng.integers(1 << 40))),
    }
    base = {"w": torch.randn(4, 4, generator=gen)}
    return qdelta.Delta(
        layers=layers,
        params=params,
        base_fingerprint=qdelta.fingerprint(base),
        tenant=tenant,
        metadata={"source": f"run-{int(rng.integers(1000))}", "ünïcode": "✓"},
    )


def assert_same_delta(a: qdelta.Delta, b: qdelta.Delta) -> None:
    assert a.tenant == b.tenant
    assert a.base_fingerprint == b.base_fingerprint
    assert a.metadata == b.metadata
    assert a.layers.keys() == b.layers.keys()
    for name, la in a.layers.items():
        lb = b.layers[name]
        assert la.shape == lb.shape and la.transposed == lb.transposed, name
        np.testing.assert_array_equal(la.planes, lb.planes)
        np.testing.assert_array_equal(la.scales, lb.scales)
        assert lb.planes.dtype == np.uint32 and lb.scales.dtype == np.float32
    assert a.params.keys() == b.params.keys()
    for name, pa in a.params.items():
        pb = b.params[name]
        assert pa.dtype == pb.dtype and pa.shape == pb.shape, name
        assert torch.equal(pa, pb), name
