"""Kernel variants switched by module constants give the same results as the originals.

GPU only (skipped without CUDA and cupy). Each variant runs on the same fresh
random inputs as the original it replaces; both are checked against the float64
oracle, and the deterministic ones must match bit for bit.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

cuda_backend = pytest.importorskip("qdelta.kernels.cuda")
if not cuda_backend.available():
    pytest.skip("needs a CUDA device and cupy", allow_module_level=True)

from tests.test_cuda_kernels import (  # noqa: E402
    DEV,
    DTYPES,
    assert_close,
    capture_graph,
    oracle,
    poisoned,
    random_planes,
    random_scales,
)


@pytest.fixture(autouse=True)
def sync_after_each_launch(monkeypatch):
    monkeypatch.setenv("QDELTA_CUDA_SYNC", "1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_planes", [1, 3])
@pytest.mark.parametrize("row", [False, True])
@pytest.mark.parametrize(("n", "k"), [(97, 33), (300, 1000), (70000, 40)])
def test_expand_rows_matches_flat_bit_for_bit(monkeypatch, dtype, n_planes, row, n, k):
    """N = 70000 > 65535 exercises the grid-stride loop over rows."""
    planes = random_planes(1, n_planes, n, k)[0]
    scales = random_scales(1, n_planes, n, row)[0]
    scales[..., ::7] *= -1  # negative alphas flip every sign
    dt = cuda_backend.DTYPE_CODES[dtype]
    got = {}
    for kind in ("flat", "rows"):
        monkeypatch.setattr(cuda_backend, "EXPAND_KERNEL", kind)
        got[kind] = cuda_backend._expand(planes, scales, n_planes, row, dt, dtype, k).clone()
    assert torch.equal(got["rows"], got["flat"]), f"expand rows vs flat N={n} K={k} {dtype}"
    from qdelta.kernels import reference

    want = reference.dense_delta(planes, scales, k).double()
    err = float((got["rows"].double() - want).abs().max() / want.abs().max())
    assert err <= {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "t", "k", "n"), [(5, 3, 4097, 300), (16, 16, 1024, 1100)])
def test_lut_load_variants_match_original(monkeypatch, dtype, m, t, k, n):
    """L2 line fetches and the next-slice prefetch change timing only: bit-identical sums."""
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(t, 2, n, k)
    scales = random_scales(t, 2, n, row=True)
    ids = torch.randint(-1, t, (m,), device=DEV)
    got = {}
    for line in (False, True):
        for prefetch in (False, True):
            monkeypatch.setattr(cuda_backend, "LUT_L2_LINE_LOADS", line)
            monkeypatch.setattr(cuda_backend, "LUT_PREFETCH_NEXT", prefetch)
            got[line, prefetch] = cuda_backend.multi_tenant_delta_matmul(
                x, planes, scales, ids, out=poisoned(m, n, dtype), path="decode"
            )
    first = got[False, False]
    for key, y in got.items():
        assert torch.equal(y, first), f"line, prefetch = {key} changes the sums M={m} {dtype}"
    assert_close(first, oracle(x, planes, scales, ids), f"table decode M={m} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mma_rows", [0, 1])
def test_single_row_auto_path_either_way(monkeypatch, dtype, mma_rows):
    """auto with one row: the mma kernel (default) or the tables (constant set to 0)."""
    monkeypatch.setattr(cuda_backend, "DECODE_MMA_MAX_ROWS", mma_rows)
    k, n = 4096, 1100
    x = torch.randn(1, k, device=DEV).to(dtype)
    planes = random_planes(1, 1, n, k)[0]
    scales = random_scales(1, 1, n, row=False)[0]
    base = torch.randn(1, n, device=DEV).to(dtype)
    y = cuda_backend.delta_matmul(x, planes, scales, base=base, out=poisoned(1, n, dtype))
    ids = torch.zeros(1, dtype=torch.int64, device=DEV)
    assert_close(y, oracle(x, planes[None], scales[None], ids, base), f"M=1 mma_rows={mma_rows}")


def test_kernel_and_stream_caches_follow_the_current_stream():
    """Cached cupy stream views: work on a side stream lands on that stream."""
    m, k, n = 9, 500, 130
    x = torch.randn(m, k, device=DEV).half()
    planes = random_planes(2, 1, n, k)
    scales = random_scales(2, 1, n, row=False)
    ids = torch.randint(0, 2, (m,), device=DEV)
    want = oracle(x, planes, scales, ids)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # inputs were made on the default stream
    for stream in (side, torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            y = cuda_backend.multi_tenant_delta_matmul(
                x, planes, scales, ids, out=poisoned(m, n, x.dtype)
            )
        stream.synchronize()
        assert_close(y, want, "after switching streams")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile_rows", cuda_backend.GEMM_ROW_CHOICES)
@pytest.mark.parametrize(
    ("m", "t", "k", "n", "p"), [(600, 3, 4097, 300, 1), (512, 1, 1024, 4096, 2)]
)
def test_prefill_gemm_matches_the_expand_path(monkeypatch, dtype, tile_rows, m, t, k, n, p):
    """PREFILL_KERNEL = "gemm" (fused, any GEMM_ROWS) against "expand" on the same inputs."""
    monkeypatch.setattr(cuda_backend, "GEMM_ROWS", tile_rows)
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(t, p, n, k)
    scales = random_scales(t, p, n, row=True)
    ids = torch.randint(-1, t, (m,), device=DEV)
    base = torch.randn(m, n, device=DEV).to(dtype)
    want = oracle(x, planes, scales, ids, base)
    got = {}
    for kernel in ("expand", "gemm"):
        monkeypatch.setattr(cuda_backend, "PREFILL_KERNEL", kernel)
        got[kernel] = cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, base=base, out=poisoned(m, n, dtype), path="prefill"
        )
        assert_close(got[kernel], want, f"prefill {kernel} rows={tile_rows} M={m} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("m", "t", "n", "planes_n"), [(512, 1, 4096, 1), (300, 3, 1100, 1), (77, 2, 700, 2)]
)
def test_overlapped_prefill_matches_the_oracle(monkeypatch, dtype, m, t, n, planes_n):
    """PREFILL_KERNEL = "overlap": expansion pieces on the caller's stream, their GEMMs on
    side streams (4 at once at N = 4096); in place (out is base) and with tenants."""
    monkeypatch.delenv("QDELTA_CUDA_SYNC", raising=False)  # keep the streams overlapping
    monkeypatch.setattr(cuda_backend, "PREFILL_KERNEL", "overlap")
    k = 1000
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(t, planes_n, n, k)
    scales = random_scales(t, planes_n, n, row=True)
    ids = None if t == 1 else torch.randint(-1, t, (m,), device=DEV)
    base = torch.randn(m, n, device=DEV).to(dtype)
    want = oracle(x, planes, scales, ids, base)
    for _ in range(3):  # repeated calls reuse the side streams and the freed pieces' blocks
        got = base.clone()
        cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, base=got, out=got, path="prefill"
        )
    torch.cuda.synchronize()
    assert_close(got, want, f"overlapped prefill M={m} T={t} N={n} {dtype}")


def test_overlapped_prefill_in_a_cuda_graph(monkeypatch):
    """The side streams fork from and join the capturing stream, so the call captures."""
    monkeypatch.delenv("QDELTA_CUDA_SYNC", raising=False)
    monkeypatch.setattr(cuda_backend, "PREFILL_KERNEL", "overlap")
    m, k, n = 256, 512, 2048
    x = torch.randn(m, k, device=DEV).half()
    planes = random_planes(1, 1, n, k)
    scales = random_scales(1, 1, n, row=False)
    out = torch.empty(m, n, device=DEV, dtype=x.dtype)

    def step():
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales, None, out=out, path="prefill")

    graph = capture_graph(step)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ids = torch.zeros(m, dtype=torch.long, device=DEV)
    assert_close(out, oracle(x, planes, scales, ids), "overlapped prefill, graph replay")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("m", "k", "offset"), [(1, 4096, 0), (1, 8192, 0), (7, 1001, 1), (64, 520, 2)]
)
def test_mma_direct_x_matches_the_prep_kernel(monkeypatch, dtype, m, k, offset):
    """MMA_DIRECT_X (x fragments from x itself) against qd_prep_x, bit for bit; rows
    that are not 8-byte aligned take the scalar loads."""
    t, n = 3, 1100
    x = torch.randn(m, k + offset, device=DEV).to(dtype)[:, offset:]
    planes = random_planes(t, 2, n, k)
    scales = random_scales(t, 2, n, row=True)
    ids = torch.randint(-1, t, (m,), device=DEV)
    got = {}
    for direct in (False, True):
        monkeypatch.setattr(cuda_backend, "MMA_DIRECT_X", direct)
        got[direct] = cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, out=poisoned(m, n, dtype), path="mma"
        )
    assert torch.equal(got[True], got[False]), f"direct x changes the sums M={m} K={k}"
    assert_close(got[True], oracle(x, planes, scales, ids), f"direct x M={m} K={k} {dtype}")
