"""CUDA kernels vs the torch reference (needs a CUDA device and cupy; skipped otherwise).

Fresh random inputs every run; outputs are NaN-poisoned before each launch so
an element the kernel forgets to write fails the test.
"""

import pytest
import torch
from tests import delta_cases
from tests.delta_cases import DTYPES, assert_close, oracle

from qdelta import QDeltaError, ShapeError
from qdelta.kernels import reference

pytestmark = pytest.mark.gpu

cuda_backend = pytest.importorskip("qdelta.kernels.cuda")
if not cuda_backend.available():
    pytest.skip("needs a CUDA device and cupy", allow_module_level=True)

DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def sync_after_each_launch(monkeypatch):
    monkeypatch.setenv("QDELTA_CUDA_SYNC", "1")


def random_planes(t: int, p: int, n: int, k: int) -> torch.Tensor:
    return delta_cases.random_planes(t, p, n, k, device=DEV)


def random_scales(t: int, p: int, n: int, row: bool) -> torch.Tensor:
    return delta_cases.random_scales(t, p, n, row, device=DEV)


def poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return delta_cases.poisoned(m, n, dtype, DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 31, 33, 1024, 4097])
@pytest.mark.parametrize("m", [1, 5, 64, 65, 600])
def test_multi_tenant_matches_reference(dtype, k, m):
    n_planes = 1 + (k + m) % 3
    row = (k + m) % 2 == 0
    t, n = 3, 80
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(t, n_planes, n, k)
    scales = random_scales(t, n_planes, n, row)
    ids = torch.randint(-1, t, (m,), device=DEV)
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, out=poisoned(m, n, dtype))
    what = f"M={m} K={k} N={n} P={n_planes} {'row' if row else 'matrix'} scales {dtype}"
    assert_close(y, oracle(x, planes, scales, ids), what)


PATHS = ["decode", "prefill", "gemm", "mma"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [7, 130])
def test_every_path_on_same_input(dtype, path, m):
    k, n, t = 300, 97, 4
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(t, 2, n, k)
    scales = random_scales(t, 2, n, row=True)
    ids = torch.randint(-1, t, (m,), device=DEV)
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, out=poisoned(m, n, dtype), path=path
    )
    assert_close(y, oracle(x, planes, scales, ids), f"path={path} M={m} {dtype}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("m", "t", "k", "n"),
    [
        (1, 1, 4096, 1100),  # one row: R = 1, several feature tiles
        (6, 3, 2 * 256 + 33, 70),  # 2 rows per tenant: R = 2, partial last K slice
        (23, 2, 777, 300),  # up to 12 rows per tenant: groups of R = 4
        (64, 64, 1024, 512),  # the decode benchmark's shape, smaller
    ],
)
def test_row_groups_and_slices(path, m, t, k, n):
    """Rows of one tenant share a group (R = 1, 2, 4); ragged K over 256-column slices."""
    x = torch.randn(m, k, device=DEV).half()
    planes = random_planes(t, 3, n, k)
    scales = random_scales(t, 3, n, row=(m % 2 == 0))
    ids = torch.randint(0, t, (m,), device=DEV)
    ids[2::5] = -1
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, bits=2, out=poisoned(m, n, x.dtype), path=path
    )
    want = oracle(x, planes[:, :2], scales[:, :2], ids)
    assert_close(y, want, f"path={path} M={m} T={t} K={k} N={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_one_tenant_paths_with_base(dtype, path):
    m, k, n = 37, 1000, 260
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(1, 2, n, k)[0]
    scales = random_scales(1, 2, n, row=False)[0]
    base = torch.randn(m, n, device=DEV).to(dtype)
    ids = torch.zeros(m, dtype=torch.int64, device=DEV)
    want = oracle(x, planes[None], scales[None], ids, base)
    y = cuda_backend.delta_matmul(
        x, planes, scales, base=base, out=poisoned(m, n, dtype), path=path
    )
    assert_close(y, want, f"one tenant + base, path={path} {dtype}")


def test_large_decode_tiles_with_many_rows_of_one_tenant():
    """ids=None, 16 rows: groups of 4 rows and full 256-feature tiles."""
    m, k, n = 16, 4096, 4096
    x = torch.randn(m, k, device=DEV).bfloat16()
    planes = random_planes(1, 1, n, k)[0]
    scales = random_scales(1, 1, n, row=True)[0]
    y = cuda_backend.delta_matmul(x, planes, scales, out=poisoned(m, n, x.dtype), path="decode")
    ids = torch.zeros(m, dtype=torch.int64, device=DEV)
    assert_close(y, oracle(x, planes[None], scales[None], ids), "decode ids=None M=16 4096^2")


def test_unknown_path_is_refused():
    x = torch.randn(2, 64, device=DEV).half()
    planes = random_planes(1, 1, 8, 64)
    scales = random_scales(1, 1, 8, row=False)
    with pytest.raises(ShapeError, match="path"):
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales, None, path="fast")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 16, 300])
def test_single_tenant_with_bits_subset(dtype, m):
    k, n = 777, 200
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(1, 3, n, k)[0]
    scales = random_scales(1, 3, n, row=False)[0]
    y = cuda_backend.delta_matmul(x, planes, scales, bits=2, out=poisoned(m, n, dtype))
    ids = torch.zeros(m, dtype=torch.int64, device=DEV)
    want = oracle(x, planes[None, :2], scales[None, :2], ids)
    assert_close(y, want, f"bits=2 of 3, M={m} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [3, 200])
@pytest.mark.parametrize("path", ["auto", "mma"])
def test_fused_base_add_in_place(dtype, m, path):
    k, n, t = 4096, 256, 5
    x = torch.randn(m, k, device=DEV).to(dtype)
    planes = random_planes(t, 1, n, k)
    scales = random_scales(t, 1, n, row=False)
    ids = torch.randint(-1, t, (m,), device=DEV)
    base = torch.randn(m, n, device=DEV).to(dtype)
    want = oracle(x, planes, scales, ids, base)
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, base=base, out=base, path=path
    )
    assert y.data_ptr() == base.data_ptr()
    assert_close(y, want, f"in-place base add M={m} path={path} {dtype}")


def test_decode_shape_of_the_benchmark():
    b, n, k = 16, 4096, 4096
    x = torch.randn(b, k, device=DEV).half()
    planes = random_planes(b, 1, n, k)
    scales = random_scales(b, 1, n, row=False)
    ids = torch.arange(b, device=DEV)
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, out=poisoned(b, n, x.dtype))
    assert_close(y, oracle(x, planes, scales, ids), "decode B=16 N=K=4096")


def test_runs_on_torch_current_stream():
    m, k, n = 40, 512, 64
    x = torch.randn(m, k, device=DEV).half()
    planes = random_planes(2, 1, n, k)
    scales = random_scales(2, 1, n, row=True)
    ids = torch.randint(0, 2, (m,), device=DEV)
    out = poisoned(m, n, x.dtype)  # filled on the current stream, before the wait below
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, check_ids=False, out=out)
    side.synchronize()
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, oracle(x, planes, scales, ids), "side stream")


def capture_graph(step) -> torch.cuda.CUDAGraph:
    """``step`` run once on a side stream (compiles, fills the caches), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@pytest.mark.parametrize(("path", "m"), [("decode", 8), ("mma", 1)])
def test_decode_step_replays_from_a_cuda_graph(monkeypatch, path, m):
    """The decode paths make no host sync (check_ids=False): a serving loop can capture
    a step in a CUDA graph and replay it with new inputs copied into the same tensors."""
    monkeypatch.delenv("QDELTA_CUDA_SYNC", raising=False)  # no synchronize while capturing
    k, n, t = 1000, 300, 4
    x = torch.randn(m, k, device=DEV).half()
    planes = random_planes(t, 2, n, k)
    scales = random_scales(t, 2, n, row=True)
    ids = torch.randint(0, t, (m,), device=DEV)
    base = torch.randn(m, n, device=DEV).half()
    out = torch.empty(m, n, device=DEV, dtype=x.dtype)

    def step():
        cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, base=base, out=out, check_ids=False, path=path
        )

    graph = capture_graph(step)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.randint(-1, t, (m,), device=DEV))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, oracle(x, planes, scales, ids, base), f"graph replay path={path}")


@pytest.mark.parametrize("path", ["auto", *PATHS])
def test_out_of_range_tenant_raises_or_poisons_its_row(path):
    m, k, n, t = 6, 64, 32, 2
    x = torch.randn(m, k, device=DEV).half()
    planes = random_planes(t, 1, n, k)
    scales = random_scales(t, 1, n, row=False)
    ids = torch.tensor([0, 1, -1, t, 0, -5], device=DEV)
    with pytest.raises(ShapeError, match="tenant_ids"):
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids)
    good = torch.tensor([0, 1, 2, 4], device=DEV)
    want = oracle(x[good], planes, scales, ids[good])
    # NaN-poisoned out: every valid row must be written.
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, check_ids=False, path=path, out=poisoned(m, n, x.dtype)
    )
    assert_close(y[good], want, "rows with valid ids beside invalid ones")
    # A finite fill: the NaN rows must be the kernel's, not the poison's.
    out = torch.full((m, n), 7.0, dtype=x.dtype, device=DEV)
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, check_ids=False, path=path, out=out
    )
    assert torch.isnan(y[[3, 5]]).all()
    assert_close(y[good], want, "rows with valid ids beside invalid ones (finite fill)")


def test_validation_errors_are_qdelta_errors():
    x = torch.randn(4, 64, device=DEV).half()
    planes = random_planes(1, 1, 8, 64)
    scales = random_scales(1, 1, 8, row=False)
    with pytest.raises(QDeltaError, match="on cuda"):
        cuda_backend.multi_tenant_delta_matmul(x, planes.cpu(), scales, None)
    with pytest.raises(ShapeError, match="W = ceil"):
        cuda_backend.multi_tenant_delta_matmul(x[:, :32], planes, scales, None)
    with pytest.raises(QDeltaError, match="float16, bfloat16 or float32"):
        cuda_backend.multi_tenant_delta_matmul(x.double(), planes, scales, None)
    with pytest.raises(ShapeError, match="scales"):
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales[:, :, None], None)


def test_auto_backend_uses_cuda_for_cuda_tensors():
    # kernels.multi_tenant_delta_matmul takes no out buffer (it allocates its own).
    from qdelta import kernels

    m, k, n = 8, 100, 48
    x = torch.randn(m, k, device=DEV).bfloat16()
    planes = random_planes(2, 2, n, k)
    scales = random_scales(2, 2, n, row=True)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1], device=DEV)
    y = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="auto")
    assert y.is_cuda and y.dtype == torch.bfloat16
    assert_close(y, oracle(x, planes, scales, ids), "backend=auto")


def test_auto_backend_on_cuda_with_gradients_runs_the_reference(monkeypatch):
    """Gradients needed: auto takes the differentiable reference, never the kernels."""
    from qdelta import kernels

    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA kernel ran although gradients were needed")

    m, k, n = 8, 100, 48
    x = torch.randn(m, k, device=DEV, requires_grad=True)
    planes = random_planes(2, 2, n, k)
    scales = random_scales(2, 2, n, row=True).requires_grad_()
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1], device=DEV)
    monkeypatch.setattr(cuda_backend, "multi_tenant_delta_matmul", refuse)
    y = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="auto")
    assert y.requires_grad and y.is_cuda
    dy = torch.randn_like(y)
    gx, gs = torch.autograd.grad((y * dy).sum(), (x, scales))
    ref = reference.multi_tenant_delta_matmul(x, planes, scales, ids)
    wx, ws = torch.autograd.grad((ref * dy).sum(), (x, scales))
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gs, ws)
    with pytest.raises(QDeltaError, match="no backward"):
        kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="cuda")
