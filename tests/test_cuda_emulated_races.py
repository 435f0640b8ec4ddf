"""Schedule-order race check: every kernel gives bit-identical results in every run order.

The emulator runs the threads of a block as fibers that switch only at barriers and
warp collectives, so a race between threads inside one barrier interval (a shared
or global write another thread reads or writes before the next barrier, cp.async
included: the emulator performs it at issue) makes the result depend on the order
in which the fibers run. ``EmulatorRuntime.order`` resumes them in thread order
("forward", the default), in reverse, or in a fresh pseudo-random order every
scheduling round ("shuffle"), lanes of a warp included; the tests below run each
kernel path in all three on the same inputs and compare the output bits (NaN
patterns included). The self-tests show that a racy kernel does fail the check.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import test_cuda_emulated as emulated_suite
from qdelta.kernels import cuda as cuda_backend
from qdelta.ring import block_attention, cuda_block
from test_cuda_emulated import (
    assert_close,
    oracle,
    poisoned,
    ptr,
    random_planes,
    random_scales,
)

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="the CUDA emulator needs g++ on PATH"
)

emulator = pytest.importorskip("qdelta.kernels.emulator")

# The self-test module of tests/test_cuda_emulated.py (gen and emulated: tests/conftest.py).
selftest = emulated_suite.selftest

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture
def shuffle_seed(rng: np.random.Generator) -> int:
    """The shuffle order's seed, fresh every run (the rng seed reproduces it)."""
    return int(rng.integers(2**63))


def orders(seed: int) -> list[tuple[str, int]]:
    return [("forward", 0), ("reverse", 0), ("shuffle", seed)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (so NaN payloads and -0.0 compare too)."""
    t = t.contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def across_orders(runtime, seed: int, run) -> dict[str, list[torch.Tensor]]:
    """``run()`` (returning a tensor or a tuple of tensors) once per run order."""
    got = {}
    try:
        for order, s in orders(seed):
            runtime.order, runtime.seed = order, s
            out = run()
            got[order] = [t.clone() for t in (out if isinstance(out, tuple) else (out,))]
    finally:
        runtime.order, runtime.seed = "forward", 0
    return got


def assert_order_independent(got: dict[str, list[torch.Tensor]], what: str, seed: int) -> None:
    ref = got["forward"]
    for order, outs in got.items():
        for i, (a, b) in enumerate(zip(ref, outs, strict=True)):
            diff = bits(a) != bits(b)
            if diff.any():
                where = diff.nonzero()[:4].tolist()
                pytest.fail(
                    f"{what}: output {i} differs between forward and {order} order (shuffle "
                    f"seed {seed}) in {int(diff.sum())} of {diff.numel()} elements, first at "
                    f"{where}: a race inside a barrier interval"
                )


# ---------------------------------------------------------------------------
# The emulator's orders themselves
# ---------------------------------------------------------------------------


def test_unknown_order_is_an_error(selftest):
    out = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError, match="run order 'backwards'"):
        selftest.get_function("racy_last_writer")(
            (1,), (4,), (ptr(out), np.int32(0)), order="backwards"
        )
    with pytest.raises(cuda_backend.KernelLaunchError, match="expected one of forward"):
        emulator.EmulatorRuntime(order="sideways")


@pytest.mark.parametrize("warp_only", [False, True], ids=["block", "warp"])
def test_a_racy_kernel_fails_the_check(selftest, warp_only):
    """The last writer of one shared int: forward is the highest thread, reverse thread
    0, shuffle differs per block and seed. The check can fail."""
    blocks, n = 16, 32 if warp_only else 96
    fn = selftest.get_function("racy_last_writer")

    def run(order: str, seed: int = 0) -> list[int]:
        out = torch.full((blocks,), -1, dtype=torch.int32)
        fn((blocks,), (n,), (ptr(out), np.int32(warp_only)), order=order, seed=seed)
        return out.tolist()

    assert run("forward") == [n - 1] * blocks
    assert run("reverse") == [0] * blocks
    a, b = run("shuffle", 1), run("shuffle", 2)
    assert all(0 <= v < n for v in a + b)
    assert len(set(a)) > 1 and a != b  # a new order per block and per seed ...
    assert a == run("shuffle", 1)  # ... deterministic for one seed


def test_a_cp_async_race_fails_the_check(selftest, gen):
    n, blocks = 128, 2
    x = torch.randint(0, 1000, (n,), dtype=torch.int32, generator=gen)
    fn = selftest.get_function("racy_cp_async")
    got = {}
    for order in ("forward", "reverse"):
        out = torch.zeros(blocks * n, dtype=torch.int32)
        fn((blocks,), (n,), (ptr(x), ptr(out)), order=order)
        got[order] = out.view(blocks, n)
    assert (got["forward"] == -1).all()  # thread t + 1 had not issued its copy yet
    assert torch.equal(got["reverse"][:, :-1], x[1:].expand(blocks, -1))


@pytest.mark.parametrize("order", emulator.ORDERS)
def test_race_free_kernels_and_collectives_agree_in_every_order(selftest, gen, order):
    x = torch.randint(-1000, 1000, (3 * 256,), dtype=torch.int32, generator=gen)
    out = torch.zeros_like(x)
    selftest.get_function("reverse_block")((3,), (256,), (ptr(x), ptr(out)), order=order, seed=7)
    assert torch.equal(out.view(3, 256), x.view(3, 256).flip(1))
    n, live = 64, 20
    out = torch.full((2, n), -7, dtype=torch.int32)
    selftest.get_function("exited_lanes")((1,), (n,), (ptr(out), np.int32(live)), order=order)
    alive = torch.arange(n) % 32 < live
    assert torch.equal(out[0][alive], (torch.arange(n) ^ 1)[alive].int())
    assert (out[1][alive] == (1 << live) - 1).all() and (out[:, ~alive] == -7).all()
    out = torch.full((32,), -1, dtype=torch.int32)
    selftest.get_function("partial_masks")((1,), (32,), (ptr(out),), order=order, seed=3)
    odd_votes = sum(1 << i for i in range(17, 32, 2))
    assert out.tolist() == [odd_votes - 2**32 if i & 1 else 40 for i in range(32)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", emulator.ORDERS)
def test_deadlocks_and_divergent_barriers_are_found_in_every_order(selftest, order):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(cuda_backend.KernelLaunchError) as info:
        selftest.get_function("deadlock")((3,), (64,), (ptr(out),), order=order, seed=11)
    msg = str(info.value)
    assert "deadlock" in msg and "block (1, 0, 0)" in msg, msg
    assert "32 threads wait at __syncthreads" in msg and "32 threads wait at __shfl_sync" in msg
    with pytest.raises(cuda_backend.KernelLaunchError, match="divergent __syncthreads"):
        selftest.get_function("divergent_barrier")((1,), (64,), (ptr(out),), order=order, seed=5)
    d = torch.zeros(32)
    with pytest.raises(cuda_backend.KernelLaunchError, match="needs all 32 lanes"):
        selftest.get_function("mma_with_exited_lanes")((1,), (32,), (ptr(d),), order=order)


def test_emulate_takes_the_order():
    with emulator.emulate(order="shuffle", seed=9) as runtime:
        assert (runtime.order, runtime.seed) == ("shuffle", 9)
    with emulator.emulate() as runtime:
        assert (runtime.order, runtime.seed) == ("forward", 0)


# ---------------------------------------------------------------------------
# qdelta/_cuda/delta_matmul.cu
# ---------------------------------------------------------------------------

DELTA_CASES = {
    # path[-variant]: (m, tenants, k, n, planes, row scales); ids mixed over -1..T-1
    # decode: R = 4 groups, 3 K slices, 2 feature blocks
    "decode": (7, 3, 600, 150, 2, True),
    # prefill (qd_expand_rows): ragged K and N
    "prefill": (9, 3, 300, 97, 2, False),
    # gemm (64-row tiles): 3 tenants' tiles x 2 feature blocks, 5 pipeline stages, W = 17
    "gemm": (40, 3, 530, 140, 2, True),
    # gemm (128-row tiles): 2 tenants' tiles x 2 feature blocks, 8 stages, W = 32
    "gemm-128": (70, 2, 1000, 130, 1, False),
    # mma, decode tile (M <= 64, K split over warps, the shared reduction)
    "mma": (10, 3, 300, 70, 2, True),
    # mma, prefill tile (M > 64)
    "mma-prefill": (66, 2, 121, 50, 1, False),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("path", list(DELTA_CASES))
def test_delta_paths_do_not_depend_on_the_order(
    emulated, gen, monkeypatch, shuffle_seed, dtype, path
):
    m, t, k, n, p, row = DELTA_CASES[path]
    monkeypatch.setattr(cuda_backend, "GEMM_ROWS", 128 if path == "gemm-128" else 64)
    x = torch.randn(m, k, generator=gen).to(dtype)
    planes = random_planes(t, p, n, k, gen)
    scales = random_scales(t, p, n, row, gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    ids[:t] = torch.arange(t)  # every tenant has a row
    base = torch.randn(m, n, generator=gen).to(dtype)

    def run():
        return cuda_backend.multi_tenant_delta_matmul(
            x, planes, scales, ids, base=base, out=poisoned(m, n, dtype), path=path.split("-")[0]
        )

    got = across_orders(emulated, shuffle_seed, run)
    assert_close(got["forward"][0], oracle(x, planes, scales, ids, base), f"{path} {dtype}")
    assert_order_independent(got, f"path={path} {DELTA_CASES[path]} {dtype}", shuffle_seed)


def test_decode_k_split_does_not_depend_on_the_order(emulated, gen, shuffle_seed):
    """132 SMs: the decode kernel splits K over grid z, qd_lut_finish sums the chunks."""
    m, k, n, t = 3, 2100, 64, 2
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(t, 2, n, k, gen)
    scales = random_scales(t, 2, n, True, gen)
    ids = torch.tensor([1, 0, 1])
    assert cuda_backend.lut_plan(m, n, planes.shape[-1], 2, t, 132)["kch"] > 1
    with emulator.emulate(sm_count=132) as runtime:
        got = across_orders(
            runtime,
            shuffle_seed,
            lambda: cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, path="decode"),
        )
    assert_close(got["forward"][0], oracle(x, planes, scales, ids), "decode K split")
    assert_order_independent(got, "decode K split", shuffle_seed)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["rows", "flat"])
def test_expansion_kernels_do_not_depend_on_the_order(
    emulated, gen, monkeypatch, shuffle_seed, dtype, kind
):
    k, n, p = 300, 45, 2
    planes = random_planes(1, p, n, k, gen)[0]
    scales = random_scales(1, p, n, True, gen)[0]
    monkeypatch.setattr(cuda_backend, "EXPAND_KERNEL", kind)
    dt = cuda_backend.DTYPE_CODES[dtype]
    got = across_orders(
        emulated,
        shuffle_seed,
        lambda: cuda_backend._expand(planes, scales, p, True, dt, dtype, k),
    )
    assert_order_independent(got, f"qd_expand ({kind}) {dtype}", shuffle_seed)


# ---------------------------------------------------------------------------
# qdelta/_cuda/attention_block.cu (the ring block kernels)
# ---------------------------------------------------------------------------

RING_CASES = [
    # causal, q_start, kv_start, segments, hq, hkv, sq, sk
    (True, 40, 0, False, 4, 2, 129, 140),  # causal with an offset, GQA 2:1, 3 query blocks
    (True, 64, 0, True, 2, 1, 70, 100),  # segments (rows that see no key), GQA, ragged tiles
]


@pytest.mark.parametrize("case", RING_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize(
    ("dtype", "d"), [(torch.bfloat16, 64), (torch.float16, 128)], ids=["bf16-64", "f16-128"]
)
@pytest.mark.parametrize("kernel", list(cuda_block.KERNELS))
def test_ring_block_kernels_do_not_depend_on_the_order(
    emulated, gen, monkeypatch, shuffle_seed, kernel, dtype, d, case
):
    causal, q_start, kv_start, segs, hq, hkv, sq, sk = case
    q = torch.randn(1, hq, sq, d, generator=gen).to(dtype)
    k = torch.randn(1, hkv, sk, d, generator=gen).to(dtype)
    v = torch.randn(1, hkv, sk, d, generator=gen).to(dtype)
    qseg = kseg = None
    if segs:
        qseg = torch.randint(0, 4, (1, sq), generator=gen).sort(-1).values
        kseg = torch.randint(0, 3, (1, sk), generator=gen).sort(-1).values
    monkeypatch.setattr(cuda_block, "DEFAULT_KERNEL", kernel)

    def run():
        return block_attention(
            q, k, v, causal=causal, q_start=q_start, kv_start=kv_start,
            q_segment_ids=qseg, kv_segment_ids=kseg, backend="cuda",
        )  # fmt: skip

    got = across_orders(emulated, shuffle_seed, run)
    out, lse = got["forward"]
    assert not out.isnan().any() and lse.isfinite().any() and lse.isneginf().any() == segs
    assert_order_independent(got, f"ring {kernel} {case}", shuffle_seed)
