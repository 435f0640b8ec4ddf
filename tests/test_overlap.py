"""The overlapped-expansion prefill (qdelta.kernels.overlap, choice "expand-overlap").

Results run the real expansion kernels under the CPU emulator against the float64
oracle; the stream orchestration (fork after each expansion, join before the
result is used) is checked with a runtime that records it.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.delta_cases import DTYPES, assert_close, oracle, random_planes, random_scales

from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels import overlap


def test_feature_chunks():
    assert overlap.feature_chunks(4096, 1) == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    assert overlap.feature_chunks(1000, 1) == [(0, 384), (384, 768), (768, 1000)]
    assert overlap.feature_chunks(511, 1) == [(0, 511)]
    assert overlap.feature_chunks(4096, 2) == [(0, 4096)]  # planes share the N stride
    for n in (512, 777, 4097, 11008):
        chunks = overlap.feature_chunks(n, 1)
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a % 64 == 0 and b > a for a, b in chunks)
        assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))


def _run(x, planes, scales, ids, base, out, use, row):
    dt = cuda_backend.DTYPE_CODES[x.dtype]
    overlap.run(x, planes, scales, ids, base, out, use, row, dt)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", [False, True])
def test_one_tenant_in_chunks_matches_the_oracle(emulated, gen, dtype, row, monkeypatch):
    m, k, n = 19, 100, 600  # two chunks of N
    x = torch.randn(m, k, generator=gen).to(dtype)
    planes = random_planes(1, 1, n, k, generator=gen)
    scales = random_scales(1, 1, n, row, generator=gen)
    base = torch.randn(m, n, generator=gen).to(dtype)
    expanded = []
    real = cuda_backend._expand
    monkeypatch.setattr(
        cuda_backend, "_expand", lambda p, *a: expanded.append(p.shape[1]) or real(p, *a)
    )
    want = oracle(x, planes, scales, None, base)
    got = _run(x, planes, scales, None, base, base, 1, row)  # in place: out is base
    assert expanded == [320, 280]
    assert_close(got, want, f"one tenant, 2 chunks, {dtype}, row scales {row}")


@pytest.mark.parametrize("use", [1, 2])
def test_tenants_with_unused_and_bad_rows(emulated, gen, use):
    m, k, n, t = 23, 70, 520, 3
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(t, 2, n, k, generator=gen)
    scales = random_scales(t, 2, n, True, generator=gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    ids[0], ids[1] = 1, -1
    base = torch.randn(m, n, generator=gen).half()
    out = torch.full((m, n), math.nan, dtype=torch.float16)
    got = _run(x, planes, scales, ids, base, out, use, True)
    want = oracle(x, planes[:, :use], scales[:, :use], ids, base)
    assert_close(got, want, f"tenants, {use} planes used")
    assert torch.equal(got[1], base[1])  # id -1: the base row, no delta


class RecordingRuntime:
    """Wraps the emulator runtime; records stream forks, joins and which stream runs a GEMM."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log
        self.current = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def current_stream(self, device):
        return Stream("caller", self)

    def side_streams(self, device):
        return [Stream(f"side{i}", self) for i in range(2)]

    def stream_context(self, stream):
        runtime = self

        class Context:
            def __enter__(self):
                runtime.current = stream.name

            def __exit__(self, *exc):
                runtime.current = None

        return Context()


class Stream:
    def __init__(self, name, runtime):
        self.name, self.runtime = name, runtime

    def wait_stream(self, other):
        self.runtime.log.append(("wait", self.name, other.name))


def test_gemms_fork_after_their_expansion_and_join_before_use(emulated, gen, monkeypatch):
    log: list = []
    # Not monkeypatch: its undo would run after the emulated fixture restored the
    # real runtime, and put the emulator back for every later test.
    cuda_backend.RUNTIME = RecordingRuntime(emulated, log)
    try:
        real_expand, real_rows = cuda_backend._expand, cuda_backend._dense_rows
        runtime = cuda_backend.RUNTIME

        def expand(*a):
            log.append(("expand", runtime.current))
            return real_expand(*a)

        def rows(*a):
            log.append(("gemm", runtime.current))
            return real_rows(*a)

        monkeypatch.setattr(cuda_backend, "_expand", expand)
        monkeypatch.setattr(cuda_backend, "_dense_rows", rows)
        real_copy = torch.Tensor.index_copy_
        monkeypatch.setattr(
            torch.Tensor, "index_copy_", lambda s, *a: log.append(("copy",)) or real_copy(s, *a)
        )
        m, k, n, t = 9, 40, 600, 2
        x = torch.randn(m, k, generator=gen).half()
        planes = random_planes(t, 1, n, k, generator=gen)
        scales = random_scales(t, 1, n, False, generator=gen)
        ids = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 0])
        got = _run(x, planes, scales, ids, None, torch.empty(m, n, dtype=torch.float16), 1, False)
        assert_close(got, oracle(x, planes, scales, ids), "recorded run")
        pieces = [("expand", None), ("wait", "side0", "caller"), ("gemm", "side0"),
                  ("expand", None), ("wait", "side1", "caller"), ("gemm", "side1")]  # fmt: skip
        assert log[:6] == pieces and log[6:12] == pieces  # 2 tenants x 2 chunks, streams alternate
        assert log[12:] == [
            ("wait", "caller", "side0"),
            ("wait", "caller", "side1"),
            ("copy",),
            ("copy",),
        ]
    finally:
        cuda_backend.RUNTIME = emulated


def test_auto_and_prefill_switch_reach_it(emulated, gen, monkeypatch):
    calls = []
    monkeypatch.setattr(overlap, "run", lambda *a: calls.append(a[0].shape))
    x = torch.randn(300, 64, generator=gen).half()
    planes = random_planes(1, 1, 32, 64, generator=gen)[0]
    scales = random_scales(1, 1, 32, False, generator=gen)[0]
    monkeypatch.setattr(cuda_backend, "PREFILL_KERNEL", "overlap")
    cuda_backend.delta_matmul(x, planes, scales)
    assert calls == [(300, 64)]
    monkeypatch.setattr(cuda_backend, "PREFILL_KERNEL", "fused")
    with pytest.raises(cuda_backend.ShapeError, match="PREFILL_KERNEL"):
        cuda_backend.delta_matmul(x, planes, scales)
