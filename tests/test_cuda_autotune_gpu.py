"""Autotuning on the real GPU: CUDA-event timings pick the kernel, results stay exact.

GPU only (skipped without CUDA and cupy); the CPU tests (tests/test_autotune.py)
cover the decision logic and the cache file with injected timers.
"""

import json
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

cuda_backend = pytest.importorskip("qdelta.kernels.cuda")
if not cuda_backend.available():
    pytest.skip("needs a CUDA device and cupy", allow_module_level=True)

from tests.test_cuda_kernels import (  # noqa: E402
    DEV,
    assert_close,
    oracle,
    random_planes,
    random_scales,
)

from qdelta.kernels import autotune, choices  # noqa: E402


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    cache = autotune.DecisionCache(tmp_path / "tune.json")
    monkeypatch.setattr(autotune, "CACHE", cache)
    monkeypatch.setattr(autotune, "ENABLED", True)
    return cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("m", "t"), [(1, 1), (16, 16), (40, 3), (300, 2)])
def test_tuned_auto_path_is_exact_and_records_real_times(tuning, dtype, m, t):
    k, n = 1000, 700
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(t, 2, n, k)
    scales = random_scales(t, 2, n, row=False)
    ids = torch.randint(-1, t, (m,), device=DEV)
    base = torch.randn(m, n, device=DEV).to(dtype)
    want = oracle(x, planes, scales, ids, base)
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, base=base, out=base)
    assert_close(y, want, f"tuned M={m} {dtype}")
    (entry,) = json.loads(tuning._file_path().read_text())["entries"].values()
    times = {c: v for c, v in entry["us"].items() if v is not None}
    dt = cuda_backend.DTYPE_CODES[dtype]
    assert set(entry["us"]) == set(choices.tuning_candidates(choices.row_bucket(m), dt, 2))
    assert all(math.isfinite(v) and v > 0 for v in times.values())
    assert entry["choice"] == min(times, key=times.get)


def test_capture_of_an_undecided_shape_runs_the_fixed_rule(tuning, monkeypatch):
    monkeypatch.delenv("QDELTA_CUDA_SYNC", raising=False)
    m, k, n, t = 8, 512, 256, 4
    x = torch.randn(m, k, device=DEV).half()
    planes = random_planes(t, 1, n, k)
    scales = random_scales(t, 1, n, row=True)
    ids = torch.randint(0, t, (m,), device=DEV)
    out = torch.empty(m, n, device=DEV, dtype=x.dtype)

    def step():
        cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, out=out, check_ids=False, path="decode"
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture (path="decode": no tuning)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, out=out, check_ids=False)
    assert not tuning._file_path().exists()  # nothing was timed inside the capture
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, oracle(x, planes, scales, ids), "captured auto path")
