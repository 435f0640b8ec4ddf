"""Numerics of the Rust CPU delta kernels (src/gemv.rs, src/fused.rs) on every
path that runs them, against float64 references computed from the definition:

``y[r] = x[r] @ W^T + b + sum_p alpha_p * (x[r] . S_p)`` (no base for the bare
delta), ``S = 1 - 2 * bit`` with the bits unpacked by ``np.unpackbits``.

- Infinities in ``x`` give what float64 math on those terms gives: ``+-inf``,
  NaN only where ``+inf`` and ``-inf`` meet (an earlier kernel formed
  ``sum(x) - 2 * sum(x where bit = 1)``: ``inf - inf``, NaN for every ``-1``).
- Huge finite activations (``1e37``, float32 and bfloat16) give the finite
  result, not an overflow of ``sum(x)`` or ``2 * ...``.
- Activations with a non-zero mean are summed as accurately as torch's float32
  dense matmul sums them (the earlier kernel cancelled two sums of size
  ``K * mean``: 10 to 50 times less accurate).

Paths: ``kernels.delta_matmul`` / ``multi_tenant_delta_matmul`` with
``backend="cpu"`` (float32, float16, bfloat16), ``BitDeltaLinear``'s fused call
and ``MultiTenantLinear``'s fused (<= 16 rows) and unfused (> 16 rows) calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qdelta
from qdelta import kernels
from qdelta.kernels import cpu
from qdelta.multitenant import FUSED_MAX_ROWS

AVX512 = cpu.ISA == "avx512"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DELTA_PATHS = ["delta_matmul", "multi_tenant"]
MODULE_PATHS = ["bitdelta_fused", "multitenant_fused", "multitenant_unfused"]
#: Rows each path is called with: the fused ones take at most FUSED_MAX_ROWS.
ROWS = {"multitenant_unfused": FUSED_MAX_ROWS + 4}


def random_planes(rng: np.random.Generator, p: int, n: int, k: int) -> np.ndarray:
    """uint32 ``[p, n, ceil(k/32)]`` random sign planes, padding bits clear."""
    words = -(-k // 32)
    planes = rng.integers(0, 2**32, size=(p, n, words), dtype=np.uint32)
    if k % 32:
        planes[..., -1] &= np.uint32((1 << (k % 32)) - 1)
    return planes


def signs(planes: np.ndarray, k: int) -> np.ndarray:
    """float64 ``[..., n, k]``: ``+1`` where the bit is clear, ``-1`` where set."""
    bits = np.unpackbits(planes.view(np.uint8), axis=-1, bitorder="little")[..., :k]
    return 1.0 - 2.0 * bits.astype(np.float64)


def dot64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a [m, k] @ b [n, k]^T`` elementwise in float64, IEEE throughout (no
    BLAS: inf * w and inf + -inf as the standard has them)."""
    with np.errstate(invalid="ignore"):
        return (a[:, None, :] * b[None, :, :]).sum(-1)


def delta64(x64: np.ndarray, planes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """One tenant's delta by the definition, plane by plane."""
    s = signs(planes, x64.shape[-1])
    alpha = scales.astype(np.float64)
    y = np.zeros((x64.shape[0], planes.shape[1]))
    for p in range(planes.shape[0]):
        a = alpha[p] if alpha.ndim == 2 else np.full(planes.shape[1], alpha[p])
        with np.errstate(invalid="ignore"):
            y += a[None, :] * dot64(x64, s[p])
    return y


class Case:
    """A layer (float32 base ``W``, ``b``), tenants' packed deltas (``P`` planes,
    matrix or row scales) and a batch ``x`` with one tenant id per row."""

    def __init__(self, rng, n, k, x, tenants=2, planes=2, mode="row", scale=0.05):
        self.n, self.k, self.x = n, k, x
        self.layers = []
        for _ in range(tenants):
            pl = random_planes(rng, planes, n, k)
            shape = (planes, n) if mode == "row" else (planes,)
            sc = (scale * (0.5 + rng.random(shape))).astype(np.float32)
            self.layers.append((pl, sc))
        self.weight = (rng.standard_normal((n, k)) * 1e-3).astype(np.float32)
        self.bias = rng.standard_normal(n).astype(np.float32)
        rows = x.shape[0]
        self.ids = np.array([(r % (tenants + 1)) - 1 if tenants > 1 else 0 for r in range(rows)])

    def one_tenant(self) -> Case:
        self.layers = self.layers[:1]
        self.ids = np.zeros(self.x.shape[0], dtype=np.int64)
        return self

    def x64(self) -> np.ndarray:
        return self.x.to(torch.float64).numpy()

    def want(self, base: bool) -> np.ndarray:
        x64 = self.x64()
        y = np.zeros((x64.shape[0], self.n))
        if base:
            y += dot64(x64, self.weight.astype(np.float64)) + self.bias
        for t, (pl, sc) in enumerate(self.layers):
            rows = self.ids == t
            if rows.any():
                with np.errstate(invalid="ignore"):
                    y[rows] += delta64(x64[rows], pl, sc)
        return y

    def magnitude(self, base: bool) -> np.ndarray:
        """Per output, what its float32 rounding scales with: the same sums of
        ``|terms|`` over the finite ``x``."""
        a = np.where(np.isfinite(self.x64()), np.abs(self.x64()), 0.0)
        m = a @ np.abs(self.weight.astype(np.float64)).T + np.abs(self.bias) if base else 0.0
        m = m + np.zeros((a.shape[0], self.n))
        for t, (_, sc) in enumerate(self.layers):
            rows = self.ids == t
            alpha = np.abs(sc.astype(np.float64)).reshape(sc.shape[0], -1).sum(0)
            m[rows] += a[rows].sum(-1, keepdims=True) * alpha[None, :]
        return m

    def linear(self) -> torch.nn.Linear:
        lin = torch.nn.Linear(self.k, self.n)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(self.weight))
            lin.bias.copy_(torch.from_numpy(self.bias))
        return lin

    def packed(self, t: int) -> qdelta.PackedLayer:
        pl, sc = self.layers[t]
        return qdelta.PackedLayer(pl.copy(), sc.copy(), (self.n, self.k))

    def run(self, path: str) -> tuple[np.ndarray, torch.dtype]:
        """The path's output as float64, and the dtype it came in: x's, but
        float32 for ``multi_tenant`` (``out=``: the kernel's own float32)."""
        x = self.x
        with torch.no_grad():
            if path == "delta_matmul":
                pl, sc = self.layers[0]
                planes = torch.from_numpy(pl.view(np.int32).copy())
                y = kernels.delta_matmul(x, planes, torch.from_numpy(sc), backend="cpu")
            elif path == "multi_tenant":
                planes = torch.from_numpy(np.stack([p for p, _ in self.layers]).view(np.int32))
                scales = torch.from_numpy(np.stack([s for _, s in self.layers]))
                ids = torch.from_numpy(self.ids.astype(np.int64))
                if x.dtype == torch.float32:
                    y = kernels.multi_tenant_delta_matmul(x, planes, scales, ids, backend="cpu")
                else:
                    out = torch.zeros(x.shape[0], self.n)
                    y = cpu.multi_tenant_delta_matmul(x, planes, scales, ids, out=out)
                    return y.to(torch.float64).numpy(), torch.float32
            elif path == "bitdelta_fused":
                module = qdelta.BitDeltaLinear(self.linear(), self.packed(0), backend="cpu")
                assert module._fuses(x) == AVX512
                y = module(x)
            else:
                module = qdelta.MultiTenantLinear(self.linear(), backend="cpu")
                for t in range(len(self.layers)):
                    module.add_tenant(t, self.packed(t))
                y = module(x, torch.from_numpy(self.ids.astype(np.int64)))
                fused = module._plan is not None
                assert fused == (AVX512 and path == "multitenant_fused")
        assert y.dtype == x.dtype
        return y.to(torch.float64).numpy(), y.dtype


def make_case(path: str, rng, n: int, k: int, x: torch.Tensor, **kw) -> Case:
    case = Case(rng, n, k, x, **kw)
    return case.one_tenant() if path in ("delta_matmul", "bitdelta_fused") else case


#: Rounding of a result to its dtype, relative.
OUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_like(got, want: np.ndarray, scale: np.ndarray, rtol: float) -> None:
    """Same NaN and infinities as ``want``; elsewhere within ``rtol * scale``
    (plus the rounding to the output's dtype). ``got``: what ``Case.run`` gives."""
    got, dtype = got
    rtol_out = OUT_ROUNDING[dtype]
    assert got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg="NaN where the definition has none")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg="infinities differ")
    fin = ~(nan | inf)
    assert np.isfinite(got[fin]).all(), "non-finite where the definition is finite"
    err = np.abs(got[fin] - want[fin])
    bad = err > rtol * scale[fin] + rtol_out * np.abs(want[fin]) + 1e-30
    assert not bad.any(), f"error {err[bad].max():.3g} > {rtol:g} * scale at {bad.sum()} outputs"


def paths_and_dtypes():
    for path in DELTA_PATHS:
        for dt in DTYPES:
            yield pytest.param(path, dt, id=f"{path}-{str(dt)[6:]}")
    for path in MODULE_PATHS:
        yield pytest.param(path, torch.float32, id=f"{path}-float32")


@pytest.mark.parametrize("path, dtype", list(paths_and_dtypes()))
@pytest.mark.parametrize("k", [70, 96])
def test_infinities_meet_only_where_float64_has_them_meet(path, dtype, k, rng):
    rows = ROWS.get(path, 7)
    x = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32) + 0.5)
    for r in range(0, rows, 7):
        x[r, 3] = float("inf")  # one +inf
        if r + 1 < rows:
            x[r + 1, k - 1] = float("-inf")  # one -inf, in the last (partial) word
        if r + 2 < rows:
            x[r + 2, 5], x[r + 2, 40] = float("inf"), float("-inf")  # both: NaN
        if r + 3 < rows:
            x[r + 3, 33] = float("nan")
        if r + 5 < rows:
            x[r + 5, 1], x[r + 5, k - 6] = float("inf"), float("inf")
        # row r + 4 (and r + 6) finite, beside the others in one kernel tile
    case = make_case(path, rng, 37, k, x.to(dtype))
    base = path in MODULE_PATHS
    want = case.want(base)
    assert np.isposinf(want).any() and np.isneginf(want).any() and np.isnan(want).any()
    assert_like(case.run(path), want, case.magnitude(base), 2e-6)


@pytest.mark.parametrize(
    "path, dtype",
    [p for p in paths_and_dtypes() if p.values[1] != torch.float16],  # 1e37: not a float16
)
@pytest.mark.parametrize("k", [64, 70])
def test_huge_finite_activations_give_the_finite_result(path, dtype, k, rng):
    rows = ROWS.get(path, 4)
    x = torch.zeros(rows, k)
    x[0::4] = 1e37  # x . S reaches 64e37 (past float32's range), alpha * x . S does not
    x[1::4, 0] = 2e38  # 2 * x overflows
    x[2::4, ::3] = -3e38
    x[3::4] = torch.from_numpy(rng.standard_normal((len(x[3::4]), k)).astype(np.float32)) * 1e36
    x = x.to(dtype)
    case = make_case(path, rng, 20, k, x, mode="matrix", scale=0.01)
    for pl, _ in case.layers:
        # Features of one sign throughout, and alternating: sums of equal terms.
        pl[:, 0] = 0
        pl[:, 1] = 0xFFFFFFFF
        pl[:, 2] = 0x55555555
        if k % 32:
            pl[:, :, -1] &= np.uint32((1 << (k % 32)) - 1)
    base = path in MODULE_PATHS
    want = case.want(base)
    assert np.isfinite(want).all() and np.abs(want).max() < 3e38
    assert_like(case.run(path), want, case.magnitude(base), 1e-6)


def torch_error(case: Case, base: bool, want: np.ndarray) -> float:
    """max |y - y64| / max |y64| of torch's float32 dense math on the same data."""
    x = case.x.to(torch.float32)
    y = torch.zeros(x.shape[0], case.n)
    if base:
        y = F.linear(x, torch.from_numpy(case.weight), torch.from_numpy(case.bias))
    for t, (pl, sc) in enumerate(case.layers):
        rows = torch.from_numpy(case.ids == t)
        s = signs(pl, case.k)
        a = sc.astype(np.float64).reshape(sc.shape[0], -1)
        dense = torch.from_numpy((a[:, :, None] * s).sum(0).astype(np.float32))
        y[rows] += x[rows] @ dense.T
    return float(np.abs(y.double().numpy() - want).max() / np.abs(want).max())


@pytest.mark.parametrize("path, dtype", list(paths_and_dtypes()))
@pytest.mark.parametrize("k", [4096, 4000])
@pytest.mark.parametrize("mean", [10.0, 1000.0])
def test_non_zero_mean_is_summed_as_accurately_as_float32_dense(path, dtype, k, mean, rng):
    rows = ROWS.get(path, 4)
    x = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32) + mean).to(dtype)
    case = make_case(path, rng, 64, k, x, planes=1, mode="matrix")
    base = path in MODULE_PATHS
    want = case.want(base)
    got, out_dtype = case.run(path)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    reference = torch_error(case, base, want) + OUT_ROUNDING[out_dtype]
    assert err <= 4 * reference + 1e-7, f"error {err:.2e}, torch float32 dense {reference:.2e}"


def test_zero_scale_planes_are_skipped_even_for_nan():
    """Documented (docs/CPU_KERNEL.md): a plane whose scales are all zero is
    skipped, so NaN in x does not reach the output through it; the dense
    reference gives NaN (NaN * 0). In a layer the base term carries the NaN."""
    k = 64
    planes = torch.zeros(1, 4, 2, dtype=torch.int32)
    x = torch.ones(1, k)
    x[0, 3] = float("nan")
    got = kernels.delta_matmul(x, planes, torch.zeros(1), backend="cpu")
    assert torch.equal(got, torch.zeros(1, 4))
    lin = torch.nn.Linear(k, 4)
    layer = qdelta.PackedLayer(planes.numpy().view(np.uint32), np.zeros(1, np.float32), (4, k))
    with torch.no_grad():
        assert torch.isnan(qdelta.BitDeltaLinear(lin, layer, backend="cpu")(x)).all()
