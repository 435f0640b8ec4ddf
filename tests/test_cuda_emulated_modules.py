"""The modules' CUDA path, run by the CPU emulator: MultiTenantLinear and BitDeltaLinear
hand their rows to the CUDA kernels (qdelta/_cuda/delta_matmul.cu through the real host code),
and the results match the per-tenant dense reference in float64."""

from __future__ import annotations

import shutil

import pytest
import torch
from tests.test_multitenant import assert_close, dense_reference, packed, seeded

import qdelta
from qdelta.kernels import cuda as cuda_backend

if shutil.which("g++") is None and shutil.which("c++") is None:
    pytest.skip("the CUDA emulator needs a C++17 compiler (g++)", allow_module_level=True)

from qdelta.kernels import emulator


@pytest.fixture
def launched(monkeypatch):
    """Emulated kernels; the names of the kernels launched."""
    names: list[str] = []
    real = cuda_backend._launch

    def spy(device, name, *args, **kwargs):
        names.append(name.split("<")[0])
        return real(device, name, *args, **kwargs)

    monkeypatch.setattr(cuda_backend, "_launch", spy)
    with emulator.emulate():
        yield names


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("rows", "prefill", "kernels"),
    [
        (2, "expand", {"qd_delta_lut", "qd_lut_finish"}),  # decode: 2 x 3 rows
        (30, "expand", {"qd_expand_rows"}),  # 90 rows: the prefill path
        (30, "gemm", {"qd_delta_gemm"}),
    ],
)
def test_multi_tenant_linear_on_the_cuda_path(launched, monkeypatch, dtype, rows, prefill, kernels):
    monkeypatch.setattr(cuda_backend, "PREFILL_KERNEL", prefill)
    gen = seeded()
    n, k = 40, 100
    base = torch.nn.Linear(k, n).to(dtype)
    module = qdelta.MultiTenantLinear(base)
    layers = {}
    for key, bits, scale in (("a", 1, "matrix"), ("b", 2, "row"), ("c", 1, "row")):
        layer = packed(n, k, bits, scale, gen)
        layers[module.add_tenant(key, layer)] = layer
    x = torch.randn(3, rows, k, generator=gen).to(dtype)
    ids = torch.tensor([2, -1, 0])
    with torch.no_grad():
        got = module(x, ids)
    assert set(launched) == kernels
    assert got.shape == (3, rows, n) and got.dtype == dtype
    assert_close(got, dense_reference(base, layers, x, ids), dtype)


@pytest.mark.parametrize("rows", [1, 9])
def test_bitdelta_linear_on_the_cuda_path(launched, rows):
    gen = seeded()
    n, k = 24, 70
    base = torch.nn.Linear(k, n).half()
    layer = packed(n, k, 1, "matrix", gen)
    module = qdelta.BitDeltaLinear(base, layer)
    x = torch.randn(rows, k, generator=gen).half()
    with torch.no_grad():
        got = module(x)
    assert launched, "the CUDA kernels ran"
    assert_close(
        got,
        dense_reference(base, {0: layer}, x, torch.zeros(rows, dtype=torch.long)),
        torch.float16,
    )
