"""The real CUDA kernels and host code on the CPU, through the emulator (no GPU needed).

qdelta.kernels.emulator compiles qdelta/_cuda/delta_matmul.cu with g++ against
qdelta/_cuda/emu/cuda_emu.h; under ``emulate()`` the host code of qdelta.kernels.cuda
runs every path ("decode", "prefill", "gemm", "mma") on CPU tensors. Checked against
the float64 oracle of tests/delta_cases.py with the GPU tests' tolerances, on fresh
random data, NaN-poisoned outputs. The first part tests the emulator itself with
the small kernels of tests/emu_selftest.cu.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests import delta_cases
from tests.delta_cases import DTYPES, assert_close, oracle, poisoned

from qdelta import QDeltaError, ShapeError
from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels import reference

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="the CUDA emulator needs g++ on PATH"
)

emulator = pytest.importorskip("qdelta.kernels.emulator")

SELFTEST = Path(__file__).with_name("emu_selftest.cu")
SELFTEST_KERNELS = [
    "warp_ops",
    "wide_shuffles",
    "exited_lanes",
    "partial_masks",
    "byte_perm",
    "bit_intrinsics",
    "convert",
    "mma_fragments",
    "dynamic_shared",
    "reverse_block",
    "deadlock",
    "divergent_barrier",
    "mma_with_exited_lanes",
    "three_args",
    "bad_width",
    "ldmatrix_x4",
    "racy_last_writer",
    "racy_cp_async",
]
PATHS = ["decode", "prefill", "gemm", "mma"]


def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


@pytest.fixture(scope="module")
def selftest():
    return emulator.module(SELFTEST, SELFTEST_KERNELS)


# ---------------------------------------------------------------------------
# The emulator itself
# ---------------------------------------------------------------------------


def expected_warp_ops(n: int, src: int, delta: int, width: int) -> np.ndarray:
    """What CUDA's warp intrinsics return, computed lane by lane."""
    v = np.arange(n) * 7 + 3
    out = np.zeros((8, n), dtype=np.int64)
    for tid in range(n):
        warp, lane = divmod(tid, 32)
        seg = lane & ~(width - 1)

        def at(lane_: int, warp: int = warp) -> int:
            return int(v[warp * 32 + lane_])

        out[0, tid] = at(seg + (src & (width - 1)))
        out[1, tid] = at(lane - delta) if lane - delta >= seg else at(lane)
        out[2, tid] = at(lane + delta) if lane + delta < seg + width else at(lane)
        out[3, tid] = at(lane ^ delta) if (lane ^ delta) < seg + width else at(lane)
        bits = sum(1 << i for i in range(32) if at(i) % 3 == 0)
        out[4, tid] = np.int32(np.uint32(bits).view(np.int32))
        out[5, tid] = int(warp * 32 <= 5 < warp * 32 + 32)
        out[6, tid] = 1
        out[7, tid] = int(not (warp * 32 <= 7 < warp * 32 + 32))
    return out


@pytest.mark.parametrize(
    ("src", "delta", "width"), [(5, 1, 32), (37, 3, 32), (2, 2, 8), (7, 5, 16), (1, 1, 4)]
)
def test_shuffles_and_votes(selftest, src, delta, width):
    n = 64
    out = torch.full((8, n), -1, dtype=torch.int32)
    selftest.get_function("warp_ops")(
        (1,), (n,), (ptr(out), np.int32(src), np.int32(delta), np.int32(width))
    )
    np.testing.assert_array_equal(out.numpy(), expected_warp_ops(n, src, delta, width))


def test_float_and_64_bit_shuffles_keep_every_bit(selftest, gen):
    f = torch.randn(32, generator=gen)
    f[4] = float("nan")
    q = torch.randint(-(2**62), 2**62, (32,), generator=gen)
    fo, qo = torch.zeros(32), torch.zeros(32, dtype=torch.int64)
    selftest.get_function("wide_shuffles")((1,), (32,), (ptr(f), ptr(q), ptr(fo), ptr(qo)))
    lanes = torch.arange(32)
    assert torch.equal(fo.view(torch.int32), f.view(torch.int32)[lanes ^ 3])
    down = torch.where(lanes + 1 < 32, lanes + 1, lanes)
    assert torch.equal(qo, q[down])


def test_exited_lanes_leave_barriers_and_collectives(selftest):
    n, live = 64, 20
    out = torch.full((2, n), -7, dtype=torch.int32)
    selftest.get_function("exited_lanes")((1,), (n,), (ptr(out), np.int32(live)))
    lane = torch.arange(n) % 32
    alive = lane < live
    assert torch.equal(out[0][alive], (torch.arange(n) ^ 1)[alive].int())
    assert (out[1][alive] == (1 << live) - 1).all()
    assert (out[:, ~alive] == -7).all()


def test_partial_masks_form_separate_groups(selftest):
    out = torch.full((32,), -1, dtype=torch.int32)
    selftest.get_function("partial_masks")((1,), (32,), (ptr(out),))
    odd_votes = sum(1 << i for i in range(17, 32, 2))
    want = [odd_votes - 2**32 if i & 1 else 40 for i in range(32)]
    assert out.tolist() == want


def prmt(x: int, y: int, s: int) -> int:
    """PTX prmt.b32 default mode, written from the ISA's table."""
    v = (y << 32) | x
    r = 0
    for i in range(4):
        sel = (s >> (4 * i)) & 0xF
        b = (v >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            b = 0xFF if b & 0x80 else 0
        r |= b << (8 * i)
    return r


def run_u32(selftest, name: str, *arrays: np.ndarray, extra=(), out_len=None, grid=3):
    ts = [torch.from_numpy(a.astype(np.uint32).view(np.int32).copy()) for a in arrays]
    n = out_len or len(arrays[0])
    out = torch.zeros(n, dtype=torch.int32)
    selftest.get_function(name)((grid,), (128,), (*map(ptr, ts), ptr(out), *extra))
    return out.numpy().view(np.uint32)


def test_byte_perm_is_ptx_prmt(selftest, rng):
    fixed = [
        (0x33221100, 0x77665544, 0x3210, 0x33221100),
        (0x33221100, 0x77665544, 0x7654, 0x77665544),
        (0x33221100, 0x77665544, 0x0123, 0x00112233),
        (0x33221100, 0x77665544, 0x4441, 0x44444411),  # the table kernel's byte pick
        (0x007F80FF, 0, 0x2A98, 0x7F00FFFF),  # sign replication (bit 3 of a selector)
        (0x12345678, 0x9ABCDEF0, 0x76C4, 0x9ABCFFF0),
    ]
    x = np.array([f[0] for f in fixed] + list(rng.integers(0, 2**32, 2000)), dtype=np.uint64)
    y = np.array([f[1] for f in fixed] + list(rng.integers(0, 2**32, 2000)), dtype=np.uint64)
    s = np.array([f[2] for f in fixed] + list(rng.integers(0, 2**16, 2000)), dtype=np.uint64)
    got = run_u32(selftest, "byte_perm", x, y, s, extra=(np.int32(len(x)),))
    want = [prmt(int(a), int(b), int(c)) for a, b, c in zip(x, y, s, strict=True)]
    assert [int(g) for g in got[: len(fixed)]] == [f[3] for f in fixed]
    np.testing.assert_array_equal(got, np.array(want, dtype=np.uint32))


def test_bit_intrinsics(selftest, rng):
    x = np.concatenate([[0, 1, 0x80000000, 0xFFFFFFFF], rng.integers(0, 2**32, 500)]).astype(
        np.uint32
    )
    xt = torch.from_numpy(x.view(np.int32).copy())
    out = torch.zeros(4 * len(x), dtype=torch.int32)
    selftest.get_function("bit_intrinsics")((2,), (64,), (ptr(xt), ptr(out), np.int32(len(x))))
    got = out.numpy().reshape(-1, 4)
    for i, v in enumerate(int(a) for a in x):
        ffs = (v & -v).bit_length()
        clz = 32 - v.bit_length()
        brev = int(f"{v:032b}"[::-1], 2)
        assert list(got[i].view(np.uint32)) == [bin(v).count("1"), ffs, clz, brev], hex(v)


def interesting_f32(rng: np.random.Generator) -> np.ndarray:
    """Random floats plus ties, subnormals, overflow edges, inf and NaN (as u32 bits)."""
    h = np.arange(0x7C00, dtype=np.uint32)  # every finite positive half
    f = h.astype(np.uint16).view(np.float16).astype(np.float32)
    nxt = (h + 1).astype(np.uint16).view(np.float16).astype(np.float32)
    mid = ((f.astype(np.float64) + nxt.astype(np.float64)) / 2).astype(np.float32)  # exact ties
    bf_ties = (rng.integers(0, 2**16, 4000).astype(np.uint32) << 16) | 0x8000  # bf16 ties
    special = np.array(
        [0.0, 65504.0, 65519.996, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001,
         2.0**-26, 1e-45, 2.0**-14, 3.4e38, np.inf, np.nan],
        dtype=np.float32,
    )  # fmt: skip
    parts = [
        rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
        f.view(np.uint32),
        mid.view(np.uint32),
        np.nextafter(mid, np.float32(np.inf)).view(np.uint32),
        np.nextafter(mid, np.float32(0)).view(np.uint32),
        bf_ties,
        bf_ties + 1,
        bf_ties - 1,
        special.view(np.uint32),
        np.array([0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x00000001, 0x007FFFFF], dtype=np.uint32),
    ]
    bits = np.concatenate(parts).astype(np.uint32)
    return np.concatenate([bits, bits ^ 0x80000000])  # both signs


def assert_half_bits(got: np.ndarray, want: np.ndarray, src_nan: np.ndarray, what: str) -> None:
    got16, want16 = got.astype(np.uint16), want.astype(np.uint16)
    ok = (got16 == want16) | src_nan
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        pytest.fail(
            f"{what}: {int((~ok).sum())} mismatches, first {got16[i]:#06x} != {want16[i]:#06x}"
        )
    assert (got[src_nan] == 0x7FFF).all(), f"{what}: NaN must become the canonical 0x7FFF"


def test_f32_to_f16_and_bf16_are_bit_exact(selftest, rng):
    bits = interesting_f32(rng)
    f = bits.view(np.float32)
    nan = np.isnan(f)
    got = run_u32(selftest, "convert", bits, extra=(np.int32(len(bits)), np.int32(0)), grid=8)
    with np.errstate(over="ignore"):
        assert_half_bits(got, f.astype(np.float16).view(np.uint16), nan, "f32 -> f16")
    got = run_u32(selftest, "convert", bits, extra=(np.int32(len(bits)), np.int32(1)), grid=8)
    want = torch.from_numpy(f.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert_half_bits(got, want, nan, "f32 -> bf16")


def test_f16_and_bf16_to_f32_are_exact(selftest):
    h = np.arange(2**16, dtype=np.uint32)
    got = run_u32(selftest, "convert", h, extra=(np.int32(len(h)), np.int32(2)), grid=8)
    want = h.astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got.view(np.float32)[nan]).all()
    got = run_u32(selftest, "convert", h, extra=(np.int32(len(h)), np.int32(3)), grid=8)
    np.testing.assert_array_equal(got, h << 16)


def test_packed_conversions_put_lo_in_the_low_half(selftest, rng):
    lo = rng.standard_normal(300).astype(np.float32)
    hi = rng.standard_normal(300).astype(np.float32) * 100
    both = np.concatenate([lo, hi]).view(np.uint32)
    n = np.int32(300)
    got = run_u32(selftest, "convert", both, extra=(n, np.int32(4)), out_len=300)
    want = lo.astype(np.float16).view(np.uint16).astype(np.uint32) | (
        hi.astype(np.float16).view(np.uint16).astype(np.uint32) << 16
    )
    np.testing.assert_array_equal(got, want)
    got = run_u32(selftest, "convert", both, extra=(n, np.int32(5)), out_len=300)
    bf = lambda a: torch.from_numpy(a).bfloat16().view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    np.testing.assert_array_equal(got, bf(lo).astype(np.uint32) | (bf(hi).astype(np.uint32) << 16))


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
def test_mma_fragment_layout_matches_a_matmul(selftest, rng, bf16):
    """A (16x16, row), B (16x8, col) and C/D fragments as the PTX ISA draws them."""
    dt = torch.bfloat16 if bf16 else torch.float16
    a = torch.from_numpy(rng.standard_normal((16, 16)).astype(np.float32)).to(dt)
    b = torch.from_numpy(rng.standard_normal((16, 8)).astype(np.float32)).to(dt)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    a16 = a.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    b16 = b.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)

    def pair(m, r, col):  # (m[r, col], m[r, col + 1]), lower column in the low bits
        return m[r, col] | (m[r, col + 1] << 16)

    afrag = np.zeros((32, 4), np.uint32)
    bfrag = np.zeros((32, 2), np.uint32)
    cfrag = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        afrag[lane] = [pair(a16, g, 2 * t), pair(a16, g + 8, 2 * t),
                       pair(a16, g, 2 * t + 8), pair(a16, g + 8, 2 * t + 8)]  # fmt: skip
        bt = b16.T  # B[k, n] -> (n, k): the pairs run along k
        bfrag[lane] = [pair(bt, g, 2 * t), pair(bt, g, 2 * t + 8)]
        cfrag[lane] = [c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]]
    at, bt_, ct = (torch.from_numpy(x.view(np.int32) if x.dtype == np.uint32 else x) for x in
                   (afrag, bfrag, cfrag))  # fmt: skip
    d = torch.full((32, 4), float("nan"))
    selftest.get_function("mma_fragments")(
        (1,), (32,), (ptr(at), ptr(bt_), ptr(ct), ptr(d), np.int32(int(bf16)))
    )
    want = (a.double() @ b.double()).numpy() + c.astype(np.float64)
    got = np.zeros((16, 8))
    for lane in range(32):
        g, t = divmod(lane, 4)
        got[g, 2 * t], got[g, 2 * t + 1], got[g + 8, 2 * t], got[g + 8, 2 * t + 1] = d[
            lane
        ].tolist()
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_x4_fragments_and_cp_async_zero_fill(selftest, rng, trans):
    """Lanes 8j..8j+7 address the rows of matrix j; lane (g, t) gets (row g, cols 2t,
    2t+1) of each, or with .trans (rows 2t, 2t+1, col g); the lower index in the low
    half. Rows staged by cp.async past live_rows are zero."""
    m = rng.integers(0, 2**16, (32, 8), dtype=np.uint16)
    rows = rng.permutation(32).astype(np.int32)
    live = 27
    out = torch.zeros(32 * 4, dtype=torch.int32)
    mt, rt = torch.from_numpy(m.view(np.int16).copy()), torch.from_numpy(rows)
    selftest.get_function("ldmatrix_x4")(
        (1,), (32,), (ptr(mt), ptr(rt), np.int32(int(trans)), np.int32(live), np.int32(0),
                      ptr(out))
    )  # fmt: skip
    staged = m.astype(np.uint32)
    staged[live:] = 0
    got = out.numpy().view(np.uint32).reshape(32, 4)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for j in range(4):
            mat = staged[rows[8 * j : 8 * j + 8]]  # matrix j: its rows as the lanes address them
            lo, hi = (
                (mat[2 * t, g], mat[2 * t + 1, g]) if trans else (mat[g, 2 * t], mat[g, 2 * t + 1])
            )
            assert got[lane, j] == lo | (hi << 16), (lane, j)


def test_ldmatrix_rows_must_be_16_byte_aligned(selftest):
    m = torch.zeros(32 * 8, dtype=torch.int16)
    rows = torch.arange(32, dtype=torch.int32)
    out = torch.zeros(32 * 4, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError, match="not 16-byte aligned"):
        selftest.get_function("ldmatrix_x4")(
            (1,), (32,), (ptr(m), ptr(rows), np.int32(0), np.int32(32), np.int32(1), ptr(out))
        )


def test_dynamic_shared_memory_is_poisoned_at_every_block(selftest):
    n, blocks = 96, 3
    out = torch.zeros(blocks * 2 * n, dtype=torch.int32)
    selftest.get_function("dynamic_shared")((blocks,), (n,), (ptr(out),), shared_mem=4 * n)
    got = out.view(blocks, 2, n).numpy().view(np.uint32)
    assert (got[:, 0] == 0xFFFFFFFF).all()
    for b in range(blocks):
        assert list(got[b, 1]) == [1000 * b + (i + 1) % n for i in range(n)]


@pytest.mark.skipif(
    bool(os.environ.get(emulator.SANITIZE_ENV)),
    reason="under AddressSanitizer the store is its report (tests/test_cuda_emulated_asan.py)",
)
def test_write_past_dynamic_shared_memory_is_reported(selftest):
    """One word short: the last thread's store lands in the canary after the buffer."""
    n = 96
    out = torch.zeros(2 * n, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError, match="past its end"):
        selftest.get_function("dynamic_shared")((1,), (n,), (ptr(out),), shared_mem=4 * n - 4)


def test_static_shared_memory_and_block_barrier(selftest, gen):
    x = torch.randint(-1000, 1000, (3 * 256,), dtype=torch.int32, generator=gen)
    out = torch.zeros_like(x)
    selftest.get_function("reverse_block")((3,), (256,), (ptr(x), ptr(out)))
    assert torch.equal(out.view(3, 256), x.view(3, 256).flip(1))


@pytest.mark.timeout(60)
def test_deadlock_is_reported_not_a_hang(selftest):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError) as info:
        selftest.get_function("deadlock")((3,), (64,), (ptr(out),))
    msg = str(info.value)
    assert "deadlock" in msg and "block (1, 0, 0)" in msg, msg
    assert "32 threads wait at __syncthreads" in msg and "32 threads wait at __shfl_sync" in msg, (
        msg
    )
    # The emulator is usable after an aborted launch.
    x = torch.arange(256, dtype=torch.int32)
    y = torch.zeros_like(x)
    selftest.get_function("reverse_block")((1,), (256,), (ptr(x), ptr(y)))
    assert torch.equal(y, x.flip(0))


@pytest.mark.timeout(60)
def test_divergent_barrier_is_reported(selftest):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError, match="divergent __syncthreads"):
        selftest.get_function("divergent_barrier")((1,), (64,), (ptr(out),))


def test_mma_needs_the_whole_warp(selftest):
    d = torch.zeros(32)  # (kept alive: the kernel gets a raw pointer)
    with pytest.raises(cuda_backend.KernelLaunchError, match="needs all 32 lanes"):
        selftest.get_function("mma_with_exited_lanes")((1,), (32,), (ptr(d),))


def test_shuffle_width_must_be_a_power_of_two(selftest):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError, match="width 12 is not a power of two"):
        selftest.get_function("bad_width")((1,), (32,), (ptr(out),))


def test_argument_sizes_and_counts_are_checked(selftest):
    out = torch.zeros(4, dtype=torch.int32)
    fn = selftest.get_function("three_args")
    with pytest.raises(
        cuda_backend.KernelLaunchError, match="argument 1: expected 8 bytes, found 4"
    ):
        fn((1,), (4,), (ptr(out), np.int32(1), np.int32(2)))
    with pytest.raises(cuda_backend.KernelLaunchError, match="expected 3 arguments, found 2"):
        fn((1,), (4,), (ptr(out), np.int64(1)))
    with pytest.raises(cuda_backend.KernelLaunchError, match="numpy scalar"):
        fn((1,), (4,), (ptr(out), 1, np.int32(2)))
    fn((1,), (4,), (ptr(out), np.int64(40), np.int32(2)))
    assert out.tolist() == [42] * 4


def test_shared_memory_above_48_kb_needs_the_opt_in(selftest):
    fn = emulator.module(SELFTEST, SELFTEST_KERNELS).get_function("dynamic_shared")
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError, match="max_dynamic_shared_size_bytes"):
        fn((1,), (32,), (ptr(out),), shared_mem=64 * 1024)


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "qdelta-no-such-compiler")
    with pytest.raises(QDeltaError, match="C\\+\\+17 compiler"):
        emulator.compiler()


def test_emulate_swaps_the_runtime_back():
    before = cuda_backend.RUNTIME
    with emulator.emulate() as runtime:
        assert cuda_backend.RUNTIME is runtime and runtime.emulated
    assert cuda_backend.RUNTIME is before and not before.emulated


# ---------------------------------------------------------------------------
# qdelta/_cuda/delta_matmul.cu through the real host code
# ---------------------------------------------------------------------------


def random_planes(t: int, p: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return delta_cases.random_planes(t, p, n, k, generator=gen)


def random_scales(t: int, p: int, n: int, row: bool, gen: torch.Generator) -> torch.Tensor:
    return delta_cases.random_scales(t, p, n, row, generator=gen)


CASES = [
    # m, tenants, k, n, planes, row scales; ids in -1..T-1
    (7, 4, 300, 97, 2, True),  # mixed tenants, ragged K and N
    (5, 3, 33, 70, 1, False),  # K one past a word
    (6, 3, 561, 33, 2, False),  # ~2 rows per tenant: table groups R = 2; K % 32 = 17
    (23, 2, 777, 40, 3, True),  # ~12 rows per tenant: R = 4 (128 KB shared, the opt-in)
    (65, 3, 121, 50, 1, False),  # mma's prefill tile (M > 64); K % 32 = 25
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "m{}-t{}-k{}-n{}-p{}-{}".format(*c[:5], "row" if c[5] else "mat")
)
def test_every_path_matches_the_oracle(emulated, gen, dtype, path, case):
    m, t, k, n, p, row = case
    x = torch.randn(m, k, generator=gen).to(dtype)
    planes = random_planes(t, p, n, k, gen)
    scales = random_scales(t, p, n, row, gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    ids[0] = -1
    out, untouched_outside = delta_cases.guarded(m, n, dtype)
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, out=out, path=path)
    untouched_outside()
    assert_close(y, oracle(x, planes, scales, ids), f"path={path} {case} {dtype}")
    assert (y[0] == 0).all(), "a row with id -1 and no base is 0"


@pytest.mark.parametrize("path", ["auto", *PATHS])
@pytest.mark.parametrize("m", [1, 9])
def test_one_tenant_without_ids(emulated, gen, path, m):
    k, n = 31, 16
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(1, 1, n, k, gen)[0]
    scales = random_scales(1, 1, n, True, gen)[0]
    y = cuda_backend.delta_matmul(x, planes, scales, out=poisoned(m, n, x.dtype), path=path)
    ids = torch.zeros(m, dtype=torch.int64)
    assert_close(y, oracle(x, planes[None], scales[None], ids), f"ids=None path={path} M={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_base_added_and_out_aliasing_base(emulated, gen, dtype, path):
    m, k, n, t = 9, 200, 37, 3
    x = torch.randn(m, k, generator=gen).to(dtype)
    planes = random_planes(t, 3, n, k, gen)
    scales = random_scales(t, 3, n, False, gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    base = torch.randn(m, n, generator=gen).to(dtype)
    want = oracle(x, planes[:, :2], scales[:, :2], ids, base)
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, bits=2, base=base, out=poisoned(m, n, dtype), path=path
    )
    assert_close(y, want, f"base, bits=2 of 3, path={path} {dtype}")
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, bits=2, base=base, out=base, path=path
    )
    assert y.data_ptr() == base.data_ptr()
    assert_close(y, want, f"out is base, path={path} {dtype}")


@pytest.mark.parametrize("path", PATHS)
def test_a_transposed_x_is_taken_as_the_cpu_takes_it(emulated, gen, path):
    """x = a.T (stride 1 along M, not K): the CPU backends take it, so must the GPU's
    (it was a ShapeError there: one program, two behaviours by device)."""
    m, k, n, t = 5, 70, 24, 2
    x = torch.randn(k, m, generator=gen).half().T
    assert x.stride(1) != 1
    planes, scales = random_planes(t, 2, n, k, gen), random_scales(t, 2, n, False, gen)
    ids = torch.tensor([1, 0, -1, 1, 0])
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path=path)
    assert_close(y, oracle(x, planes, scales, ids), f"transposed x, path={path}")


@pytest.mark.parametrize("path", PATHS)
def test_bad_tenant_id_raises_or_poisons_its_row(emulated, gen, path):
    m, k, n, t = 6, 64, 32, 2
    x = torch.randn(m, k, generator=gen).bfloat16()
    planes = random_planes(t, 1, n, k, gen)
    scales = random_scales(t, 1, n, False, gen)
    ids = torch.tensor([0, 1, -1, t, 0, -5])
    with pytest.raises(ShapeError, match="tenant_ids"):
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path=path)
    good = torch.tensor([0, 1, 2, 4])
    want = oracle(x[good], planes, scales, ids[good])
    out = torch.full((m, n), 7.0, dtype=x.dtype)  # finite: the NaN rows must be the kernel's
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, check_ids=False, path=path, out=out
    )
    assert torch.isnan(y[[3, 5]]).all()
    assert_close(y[good], want, f"valid rows beside invalid ones, path={path}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_decode_plan_that_splits_k(gen, dtype):
    """132 SMs and few rows: lut_plan splits K over grid z, qd_lut_finish sums the chunks."""
    m, k, n, t = 3, 2100, 64, 2
    x = torch.randn(m, k, generator=gen).to(dtype)
    planes = random_planes(t, 2, n, k, gen)
    scales = random_scales(t, 2, n, True, gen)
    ids = torch.tensor([1, 0, 1])
    plan = cuda_backend.lut_plan(m, n, planes.shape[-1], 2, t, 132)
    assert plan["kch"] > 1
    with emulator.emulate(sm_count=132):
        y = cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, out=poisoned(m, n, dtype), path="decode"
        )
    assert_close(y, oracle(x, planes, scales, ids), f"K split {plan} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_planes", [1, 2])
def test_expansion_kernels_are_bit_identical(emulated, gen, monkeypatch, dtype, n_planes):
    k, n = 100, 45
    planes = random_planes(1, n_planes, n, k, gen)[0]
    scales = random_scales(1, n_planes, n, True, gen)[0]
    got = {}
    for kind in ("rows", "flat"):
        monkeypatch.setattr(cuda_backend, "EXPAND_KERNEL", kind)
        dt = cuda_backend.DTYPE_CODES[dtype]
        got[kind] = cuda_backend._expand(planes, scales, n_planes, True, dt, dtype, k).clone()
    assert torch.equal(got["rows"].view(torch.uint8), got["flat"].view(torch.uint8))
    want = reference.dense_delta(planes, scales, k).double()
    assert_close(got["rows"], want, f"expansion P={n_planes} {dtype}")


@pytest.mark.parametrize(("l2", "prefetch"), [(False, False), (False, True), (True, True)])
def test_decode_load_variants_are_bit_identical(emulated, gen, monkeypatch, l2, prefetch):
    """L2 line fetches and the next-slice prefetch change timing only (K = 600: 3 slices
    per block, so the prefetch runs across slices; the last slice ends past W)."""
    m, k, n, t = 5, 600, 70, 2
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(t, 2, n, k, gen)
    scales = random_scales(t, 2, n, False, gen)
    ids = torch.randint(0, t, (m,), generator=gen)
    default = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path="decode")
    monkeypatch.setattr(cuda_backend, "LUT_L2_LINE_LOADS", l2)
    monkeypatch.setattr(cuda_backend, "LUT_PREFETCH_NEXT", prefetch)
    assert cuda_backend.lut_plan(m, n, planes.shape[-1], 2, t, 4)["spc"] == 3
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path="decode")
    assert torch.equal(y.view(torch.int16), default.view(torch.int16))


def test_grid_check_and_device_check_still_apply(emulated, gen):
    x = torch.randn(2, 64, generator=gen).half()
    planes = random_planes(1, 1, 8, 64, gen)
    scales = random_scales(1, 1, 8, False, gen)
    with pytest.raises(ShapeError, match="grid"):
        cuda_backend.launch(None, x.device, "qd_expand<0>", (1, 70000), (32,), ())
    with pytest.raises(QDeltaError, match="on cpu"):
        cuda_backend.multi_tenant_delta_matmul(x, planes.to("meta"), scales, None)


# ---------------------------------------------------------------------------
# The fused prefill GEMM (qd_delta_gemm, path="gemm")
# ---------------------------------------------------------------------------


def launched(monkeypatch) -> list[str]:
    """The kernel names the host code launches from here on."""
    names: list[str] = []
    real = cuda_backend._launch

    def spy(device, name, *args, **kwargs):
        names.append(name)
        return real(device, name, *args, **kwargs)

    monkeypatch.setattr(cuda_backend, "_launch", spy)
    return names


GEMM_CASES = [
    # m, tenants, k, n, planes, row scales, x row offset (breaks 16-byte alignment)
    (300, 2, 1000, 200, 1, True, 0),  # 2+ row tiles per tenant, 8 pipeline stages, W % 4 = 0
    (150, 3, 520, 130, 3, False, 0),  # three planes share the accumulators; N = 128 + 2
    (260, 1, 129, 257, 2, True, 1),  # unaligned x rows (padded copy); W = 5, not a multiple of 4
]


@pytest.mark.parametrize("tile_rows", cuda_backend.GEMM_ROW_CHOICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "m{}-t{}-k{}-n{}-p{}".format(*c[:5]))
def test_gemm_tiles_stages_and_layouts(emulated, gen, monkeypatch, dtype, case, tile_rows):
    m, t, k, n, p, row, offset = case
    monkeypatch.setattr(cuda_backend, "GEMM_ROWS", tile_rows)
    names = launched(monkeypatch)
    wide = torch.randn(m, k + 8, generator=gen).to(dtype)
    x = wide[:, offset : offset + k]  # row stride k + 8; offset 1 is 2 bytes off alignment
    planes = random_planes(t, p, n, k, gen)
    scales = random_scales(t, p, n, row, gen)
    scales[..., ::5] *= -1  # negative alphas flip the signs (XOR into the A fragments)
    ids = torch.randint(-1, t, (m,), generator=gen)
    base = torch.randn(m, n, generator=gen).to(dtype)
    want = oracle(x, planes, scales, ids, base)
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, base=base, out=base, path="gemm"
    )
    assert names == [f"qd_delta_gemm<{cuda_backend.DTYPE_CODES[dtype]}, {tile_rows // 16}>"]
    assert_close(y, want, f"gemm {case} {dtype}")


def test_gemm_one_tenant_many_tiles_in_several_launches(emulated, gen, monkeypatch):
    """More tiles than grid y holds go out in several launches (limit lowered to 2)."""
    monkeypatch.setattr(cuda_backend, "MAX_GRID_Y", 2)
    names = launched(monkeypatch)
    m, k, n = 5 * cuda_backend.GEMM_ROWS + 3, 64, 40
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(1, 1, n, k, gen)[0]
    scales = random_scales(1, 1, n, False, gen)[0]
    out, untouched_outside = delta_cases.guarded(m, n, x.dtype)
    y = cuda_backend.delta_matmul(x, planes, scales, out=out, path="gemm")
    untouched_outside()
    assert names == ["qd_delta_gemm<0, 8>"] * 3  # 6 tiles, 2 per launch
    ids = torch.zeros(m, dtype=torch.int64)
    assert_close(y, oracle(x, planes[None], scales[None], ids), "6 tiles in 3 launches")


def test_gemm_expands_for_fp32_and_too_many_planes(emulated, gen, monkeypatch):
    names = launched(monkeypatch)
    m, k, n, t = 20, 70, 24, 2
    ids = torch.randint(0, t, (m,), generator=gen)
    for dtype, p in ((torch.float32, 1), (torch.float16, cuda_backend.GEMM_MAX_PLANES + 1)):
        names.clear()
        x = torch.randn(m, k, generator=gen).to(dtype)
        planes = random_planes(t, p, n, k, gen)
        scales = random_scales(t, p, n, False, gen)
        y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path="gemm")
        assert names and all(name.startswith("qd_expand") for name in names), names
        assert_close(y, oracle(x, planes, scales, ids), f"gemm fallback {dtype} P={p}")


@pytest.mark.parametrize("kernel", ["expand", "gemm"])
def test_prefill_kernel_switch(emulated, gen, monkeypatch, kernel):
    monkeypatch.setattr(cuda_backend, "PREFILL_KERNEL", kernel)
    names = launched(monkeypatch)
    m, k, n, t = 70, 96, 33, 2  # 70 rows > DECODE_MAX_ROWS: auto takes the prefill path
    x = torch.randn(m, k, generator=gen).bfloat16()
    planes = random_planes(t, 1, n, k, gen)
    scales = random_scales(t, 1, n, True, gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids)
    assert {name.split("<")[0] for name in names} == (
        {"qd_delta_gemm"} if kernel == "gemm" else {"qd_expand_rows"}
    )
    assert_close(y, oracle(x, planes, scales, ids), f"auto prefill with {kernel}")


def test_gemm_tiles_cover_each_tenant_in_order():
    rows = cuda_backend.GEMM_ROWS
    assert cuda_backend.gemm_tiles([0, 3, 0, 2 * rows + 1]) == [
        (1, 0, 3),
        (3, 3, rows),
        (3, 3 + rows, rows),
        (3, 3 + 2 * rows, 1),
    ]
    assert cuda_backend.gemm_tiles([0, 0]) == []
    assert cuda_backend.gemm_tiles([130], 64) == [(0, 0, 64), (0, 64, 64), (0, 128, 2)]
    # One plane fits two blocks per H200 SM (228 KB); eight planes still fit sm_80 (163 KB).
    assert 2 * (cuda_backend.gemm_shared_bytes(1) + 1024 + 512) <= 228 * 1024
    assert cuda_backend.gemm_shared_bytes(cuda_backend.GEMM_MAX_PLANES) <= 163 * 1024


def test_gemm_with_no_row_for_any_tenant_writes_base_and_nan(emulated, gen, monkeypatch):
    names = launched(monkeypatch)
    x = torch.randn(4, 40, generator=gen).half()
    planes = random_planes(2, 1, 16, 40, gen)
    scales = random_scales(2, 1, 16, False, gen)
    base = torch.randn(4, 16, generator=gen).half()
    ids = torch.tensor([-1, 2, -1, -1])
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, base=base, check_ids=False, path="gemm"
    )
    assert names == []  # no tile: nothing to launch
    assert torch.isnan(y[1]).all() and torch.equal(y[[0, 2, 3]], base[[0, 2, 3]])


def test_plans_fit_the_shared_memory_of_a_99_kb_card(emulated, gen, monkeypatch):
    """sm_86/89 cards opt in to 99 KB a block: four 32 KB decode tables or 128-row gemm
    tiles would fail to launch there (the emulator enforces the limit given)."""
    emulated._shared_limit = 99 * 1024
    names = launched(monkeypatch)
    m, k, n = 16, 70, 24  # 16 rows of one tenant: R = 4 (128 KB) on a 227 KB card
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(1, 1, n, k, gen)
    scales = random_scales(1, 1, n, False, gen)
    ids = torch.zeros(m, dtype=torch.int64)
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path="decode")
    assert [name for name in names if name.startswith("qd_delta_lut")] == ["qd_delta_lut<0, 2, 0>"]
    assert_close(y, oracle(x, planes, scales, ids), "decode with R capped at 2")
    names.clear()
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path="gemm")
    assert names == ["qd_delta_gemm<0, 4>"]  # 64-row tiles (128 rows need 111104 bytes)
    assert_close(y, oracle(x, planes, scales, ids), "gemm with 64-row tiles")
    assert cuda_backend.lut_max_rows(227 * 1024 - 1024) == 4
    emulated._shared_limit = 20 * 1024
    with pytest.raises(ShapeError, match="expected at least 32768 bytes of shared memory"):
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path="decode")


def test_gemm_refuses_too_little_shared_memory(emulated, gen, monkeypatch):
    """The kernel checks the launch against its layout (under the emulator)."""
    monkeypatch.setattr(cuda_backend, "gemm_shared_bytes", lambda use, rows=128: 1024)
    x = torch.randn(4, 64, generator=gen).half()
    planes = random_planes(1, 1, 8, 64, gen)[0]
    scales = random_scales(1, 1, 8, False, gen)[0]
    with pytest.raises(cuda_backend.KernelLaunchError, match="dynamic shared memory"):
        cuda_backend.delta_matmul(x, planes, scales, path="gemm")


@pytest.mark.parametrize("k", [8300, 8200, 1500])  # W = 260 (16-byte loads), 257, 47
@pytest.mark.parametrize("m", [1, 3, 66])  # the one-row tile (8 words a load) and the wide one
def test_mma_long_k_loads_every_word_group(emulated, gen, k, m):
    """Per-warp K shares of several 8-word load groups (the last partial), with and
    without 16-byte loads; M = 66 takes the wide tile's 4-word prefetch."""
    t, n = 2, 24
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(t, 1, n, k, gen)
    scales = random_scales(t, 1, n, True, gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    y = cuda_backend.multi_tenant_delta_matmul(
        x, planes, scales, ids, out=poisoned(m, n, x.dtype), path="mma"
    )
    assert_close(y, oracle(x, planes, scales, ids), f"mma M={m} K={k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "k", "offset"), [(1, 300, 0), (5, 33, 0), (3, 301, 1), (64, 520, 2)])
def test_mma_direct_x_is_bit_identical_to_prep(emulated, gen, monkeypatch, dtype, m, k, offset):
    """The one-row tile's x fragments read from x itself equal qd_prep_x's, bit for bit:
    8-byte loads (K = 300), the scalar tail (K = 33, 301), rows not 8-byte aligned
    (x a view at an odd element offset)."""
    t, n = 3, 40
    storage = torch.randn(m, k + offset, generator=gen).to(dtype)
    x = storage[:, offset:]
    planes = random_planes(t, 2, n, k, gen)
    scales = random_scales(t, 2, n, True, gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    got = {}
    for direct in (False, True):
        monkeypatch.setattr(cuda_backend, "MMA_DIRECT_X", direct)
        got[direct] = cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, out=poisoned(m, n, dtype), path="mma"
        )
    assert torch.equal(got[True].view(torch.int16), got[False].view(torch.int16))
    assert_close(got[True], oracle(x, planes, scales, ids), f"direct x M={m} K={k}")
