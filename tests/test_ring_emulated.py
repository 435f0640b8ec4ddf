"""The ring block kernels (qdelta/_cuda/attention_block.cu) on the CPU through the emulator.

``attention_block`` (CUDA cores), ``attention_block_mma`` (mma.sync) and
``attention_block_mma2`` (mma.sync with cp.async double buffering and ldmatrix)
run their real host code (qdelta.ring.cuda_block) under
``qdelta.kernels.emulator.emulate()`` and are checked against the float64 math
reference with the GPU tests' tolerances, with and without a sliding window and
logit soft-capping.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from qdelta.ring import block_attention, cuda_block
from ring_reference import block_reference

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="the CUDA emulator needs g++ on PATH"
)

emulator = pytest.importorskip("qdelta.kernels.emulator")

CASES = [
    # causal, q_start, kv_start, segments, hq, hkv, sq, sk
    (False, 0, 0, False, 2, 2, 40, 77),  # ragged key tile
    (True, 0, 50, False, 4, 2, 70, 64),  # GQA; the first 50 rows see no key
    (True, 64, 0, True, 2, 1, 65, 65),  # segments (some rows match no key), GQA 2:1
    (True, 40, 0, False, 2, 2, 129, 140),  # several query blocks and key tiles
    (False, 0, 0, False, 1, 1, 128, 128),  # whole tiles: the mma kernel's unmasked loop
]
# Extra cases for mma2 only (its per-warp tile skips and masks, odd sizes).
MMA2_CASES = [
    (True, 0, 0, False, 3, 1, 200, 200),  # the diagonal, GQA 3:1, a ragged last block
    (True, 0, 100, False, 2, 2, 150, 77),  # no row of block 0 sees a key; warps skip tiles
    (True, 0, 0, True, 2, 2, 130, 131),  # segments across tiles on the diagonal
    (False, 0, 0, False, 2, 1, 1, 1),  # one row, one key
    (True, 1000, 0, False, 1, 1, 33, 257),  # every key visible: unmasked but the ragged tile
]


# Sliding window / soft-capping cases for every kernel: the CASES fields, then window
# and softcap. Keys in tiles wholly before the first row's window are NaN-poisoned
# (check_window_softcap): a kernel that read a tile it must skip would return NaN.
WINDOW_CASES = [
    (True, 0, 0, False, 2, 1, 130, 130, 7, None),  # window inside a tile, GQA 2:1
    (True, 250, 0, False, 1, 1, 150, 260, 150, None),  # window over several tiles
    (True, 300, 0, False, 2, 2, 70, 400, 100, None),  # tiles 0-2 skipped by every block
    (True, 1000, 800, False, 1, 1, 40, 300, 90, None),  # the same with kv_start
    (False, 0, 0, False, 2, 2, 200, 64, 20, None),  # rows >= 83 see no key (blocks 2, 3 none)
    (True, 100, 0, False, 1, 1, 100, 120, 50, None),  # causal + window: rows >= 69 see none
    (True, 0, 0, False, 2, 2, 100, 100, 1, None),  # window 1: each row sees itself only
    (False, 10, 0, False, 1, 1, 70, 90, 1, None),  # window 1, not causal: keys >= the query
    (True, 0, 0, True, 4, 2, 150, 150, 40, None),  # window + segments + GQA
    (False, 150, 0, False, 2, 1, 100, 200, 64, None),  # window without causal
    (False, 0, 0, False, 2, 2, 70, 77, None, 1.0),  # softcap alone, ragged key tile
    (True, 64, 0, True, 2, 1, 65, 65, None, 0.7),  # softcap + causal + segments
    (True, 40, 0, False, 2, 2, 129, 140, 50, 1.5),  # softcap + window
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["mma2", "mma", "v1"])
def test_block_kernel_matches_reference(emulated, rng, kernel, dtype, head_dim, case):
    check_against_reference(rng, kernel, dtype, head_dim, case)


@pytest.mark.parametrize("case", MMA2_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma2_kernel_matches_reference(emulated, rng, dtype, head_dim, case):
    check_against_reference(rng, "mma2", dtype, head_dim, case)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
def test_mma2_any_softmax_scale(emulated, rng, scale):
    """mma2 folds a negative scale into Q's signs and a zero one into Q = 0."""
    check_against_reference(rng, "mma2", torch.bfloat16, 64, CASES[3], scale=scale)


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["mma2", "mma", "v1"])
def test_window_and_softcap_match_reference(emulated, rng, kernel, dtype, head_dim, case):
    check_window_softcap(rng, kernel, dtype, head_dim, case)


@pytest.mark.parametrize("scale", [-0.3, 2.0])
def test_mma2_softcap_with_any_softmax_scale(emulated, rng, scale):
    """Capping works on the sign-folded Q of mma2 (negative scale) and at large scales."""
    check_window_softcap(rng, "mma2", torch.bfloat16, 64, WINDOW_CASES[-1], scale=scale)


def random_inputs(rng, dtype, head_dim, case, batch=2):
    segs, hq, hkv, sq, sk = case[3:8]
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = (
        rnd(batch, hq, sq, head_dim),
        rnd(batch, hkv, sk, head_dim),
        rnd(batch, hkv, sk, head_dim),
    )
    qseg = kseg = None
    if segs:
        # Query segment 3 has no keys: those rows must come out 0 with lse -inf.
        qseg = torch.randint(0, 4, (batch, sq), generator=gen).sort(-1).values
        kseg = torch.randint(0, 3, (batch, sk), generator=gen).sort(-1).values
    return q, k, v, qseg, kseg


def check_against_reference(rng, kernel, dtype, head_dim, case, scale=None):
    causal, q_start, kv_start, segs = case[:4]
    q, k, v, qseg, kseg = random_inputs(rng, dtype, head_dim, case)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_block, "DEFAULT_KERNEL", kernel)
        out, lse = block_attention(
            q, k, v, softmax_scale=scale, causal=causal, q_start=q_start, kv_start=kv_start,
            q_segment_ids=qseg, kv_segment_ids=kseg, backend="cuda",
        )  # fmt: skip
    ref_out, ref_lse = block_reference(q, k, v, causal, q_start, kv_start, qseg, kseg, scale)
    if (causal and kv_start > q_start) or segs:
        assert ref_lse.isneginf().any(), "the case should have rows that see no key"
    assert_matches(out, lse, ref_out, ref_lse, dtype)


def check_window_softcap(rng, kernel, dtype, head_dim, case, scale=None):
    causal, q_start, kv_start, sk, window, softcap = *case[:3], *case[7:]
    # Batch 1 keeps the emulator time down (batched segment ids: the CASES above).
    q, k, v, qseg, kseg = random_inputs(rng, dtype, head_dim, case, batch=1)
    ref_out, ref_lse = block_reference(
        q, k, v, causal, q_start, kv_start, qseg, kseg, scale, window=window, softcap=softcap
    )
    if softcap is not None:  # the cap must change the result, or the case checks nothing
        plain, _ = block_reference(q, k, v, causal, q_start, kv_start, qseg, kseg, scale, window)
        assert (plain - ref_out).abs().max() > 0.1
    # NaN in every key of the tiles no query block may visit: they must not be read.
    skipped = cuda_block.window_first_tile(q_start, kv_start, window, sk)
    k[:, :, :skipped] = v[:, :, :skipped] = float("nan")
    scale = head_dim**-0.5 if scale is None else scale
    out, lse = cuda_block.attention_block(
        q, k, v, scale, causal, q_start, kv_start, qseg, kseg,
        kernel=kernel, window=window, softcap=softcap,
    )  # fmt: skip
    assert_matches(out, lse, ref_out, ref_lse, dtype)


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    masked = ref_lse.isneginf()
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(lse.isneginf(), masked)
    assert (out[masked.unsqueeze(-1).expand_as(out)] == 0).all()
    assert not out.isnan().any() and not lse.isnan().any()
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert (out.double() - ref_out).abs().max() < tol
    assert (lse.double() - ref_lse)[~masked].abs().max() < tol


def test_window_cases_cover_what_they_claim():
    """Some window cases have rows that see no key, some skip whole tiles."""
    hidden, skipping = 0, 0
    for causal, q_start, kv_start, _, _, _, sq, sk, window, _ in WINDOW_CASES:
        if window is None:
            continue
        d = torch.arange(q_start, q_start + sq)[:, None] - torch.arange(kv_start, kv_start + sk)
        vis = (d < window) & ((d >= 0) if causal else True)
        hidden += int((~vis.any(1)).any())
        skipping += cuda_block.window_first_tile(q_start, kv_start, window, sk) > 0
    assert hidden >= 2 and skipping >= 4


@pytest.mark.parametrize("kernel", ["mma2", "mma", "v1"])
def test_window_that_hides_nothing_or_everything(emulated, kernel):
    """A window wider than every distance is no window (the fast path, same bits); one
    narrower than every distance gives out = 0 and lse = -inf without a launch."""
    q, k, v = (torch.randn(1, 2, 70, 64).bfloat16() for _ in range(3))
    args = (q, k, v, 0.125, True, 10, 0, None, None)
    plain = cuda_block.attention_block(*args, kernel=kernel)
    wide = cuda_block.attention_block(*args, kernel=kernel, window=80)
    assert all(torch.equal(a, b) for a, b in zip(plain, wide, strict=True))
    far = cuda_block.attention_block(q, k, v, 0.125, False, 200, 0, None, None, window=131)
    assert (far[0] == 0).all() and far[1].isneginf().all()


def test_softcap_extremes(emulated, rng):
    """A huge cap is no cap; a tiny one flattens the scores (out = mean of V, lse =
    log Sk): the kernel takes softcap clamped to cuda_block.SOFTCAP_RANGE."""
    q, k, v, _, _ = random_inputs(rng, torch.bfloat16, 64, (False, 0, 0, False, 1, 1, 40, 40), 1)
    args = (q, k, v, 0.125, False, 0, 0, None, None)
    ref = block_reference(*args[:3], False, 0, 0, None, None, 0.125)
    assert_matches(*cuda_block.attention_block(*args, softcap=1e300), *ref, torch.bfloat16)
    out, lse = cuda_block.attention_block(*args, softcap=1e-300)
    assert (out - v.float().mean(2, keepdim=True)).abs().max() < 1e-2
    assert (lse - math.log(40)).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["cuda", "cuda_v1"])
def test_segment_ids_beyond_int32_keep_their_identity(emulated, rng, backend):
    """64-bit document ids: 2**32 + 1 is not 1 (the kernels compare int32)."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    q, k, v = (torch.randn(1, 2, 20, 64, generator=g).half() for _ in range(3))
    qseg = torch.tensor([2**32 + 1] * 10 + [7] * 10)
    kseg = torch.tensor([1] * 12 + [7] * 4 + [2**40] * 4)
    args = dict(q_segment_ids=qseg, kv_segment_ids=kseg)
    want_out, want_lse = block_attention(q, k, v, **args, backend="math")
    out, lse = block_attention(q, k, v, **args, backend=backend)
    assert want_lse[..., :10].isneginf().all()  # rows 0-9 match no key
    assert torch.equal(lse.isneginf(), want_lse.isneginf())
    torch.testing.assert_close(out, want_out.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse[..., 10:], want_lse[..., 10:].float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("q_rows", "kv_rows"), [(None, 2), (1, 2), (2, None), (2, 1), (2, 2), (None, None)]
)
@pytest.mark.parametrize("backend", ["cuda", "cuda_v1"])
def test_segment_ids_of_mixed_batch_shapes_broadcast(emulated, rng, backend, q_rows, kv_rows):
    """One id array [L] or [1, L], the other [B, L]: the kernels read both per batch row
    (they took the batch from the query ids alone: the keys' row 0 for every row, or
    reads past the end). sk == B, the case where the old check could not tell."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    b, sq, sk = 2, 9, 2
    q = torch.randn(b, 2, sq, 64, generator=g).half()
    k, v = (torch.randn(b, 1, sk, 64, generator=g).half() for _ in range(2))

    def ids(rows, length):
        per_row = torch.randint(0, 2, (b, length), generator=g)
        per_row[:, 0] = torch.arange(b)  # rows differ
        return per_row[0] if rows is None else per_row[:rows]

    args = dict(q_segment_ids=ids(q_rows, sq), kv_segment_ids=ids(kv_rows, sk))
    want_out, want_lse = block_attention(q.float(), k.float(), v.float(), **args, backend="math")
    out, lse = block_attention(q, k, v, **args, backend=backend)
    assert torch.equal(lse.isneginf(), want_lse.isneginf())
    seen = ~want_lse.isneginf()
    torch.testing.assert_close(out, want_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse[seen], want_lse[seen], atol=2e-3, rtol=2e-3)


def test_mma2_mma_and_v1_agree(emulated):
    assert cuda_block.kernel_name("cuda") == "mma2"
    q, k, v = (torch.randn(1, 2, 90, 128).bfloat16() for _ in range(3))
    a = cuda_block.attention_block(q, k, v, 128**-0.5, True, 20, 0, None, None, kernel="cuda")
    for other in ("mma", "cuda_v1"):
        b = cuda_block.attention_block(q, k, v, 128**-0.5, True, 20, 0, None, None, kernel=other)
        assert (a[0] - b[0]).abs().max() < 2e-2 and (a[1] - b[1]).abs().max() < 2e-2


def test_mma2_checks_its_dynamic_shared_memory(emulated, monkeypatch):
    """The kernel (under emulation) refuses a launch with less dynamic shared memory than
    its layout needs: cuda_block.shared_bytes must match Mma2Shape::kSmemBytes."""
    from qdelta.kernels.cuda import KernelLaunchError

    assert [cuda_block.shared_bytes("mma2", d) for d in (64, 128)] == [37376, 70144]
    q = torch.randn(1, 1, 8, 64).bfloat16()
    real = cuda_block.shared_bytes
    monkeypatch.setattr(cuda_block, "shared_bytes", lambda kernel, d: real(kernel, d) - 4)
    with pytest.raises(KernelLaunchError, match="expected 37376 bytes of dynamic shared memory"):
        cuda_block.attention_block(q, q, q, 0.125, False, 0, 0, None, None, kernel="mma2")


def test_launch_is_checked_under_emulation(emulated):
    """The ring kernel goes through kernels.cuda.launch: grid z > 65535 is a ShapeError."""
    from qdelta import ShapeError

    q = torch.randn(65536, 1, 1, 64).bfloat16()
    with pytest.raises(ShapeError, match="grid"):
        cuda_block.attention_block(q, q, q, 0.125, False, 0, 0, None, None, kernel="cuda")


@pytest.mark.parametrize(
    ("layout", "window", "softcap"),
    [
        ("contiguous", 70, None),
        ("zigzag", 45, None),
        ("contiguous", 90, 3.0),
        ("zigzag", None, 2.0),
    ],
)
def test_virtual_ring_on_the_cuda_blocks_with_window_and_softcap(
    emulated, rng, layout, window, softcap
):
    """The ring's plan (pairs out of reach skipped, masked pairs given the window,
    the turn cut short) on the emulated kernels, against the float64 full sequence."""
    from qdelta.ring import virtual_ring_attention
    from ring_reference import reference_attention

    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    q, k, v = (torch.randn(1, h, 203, 64, generator=gen).bfloat16() for h in (4, 2, 2))
    out, lse = virtual_ring_attention(
        q, k, v, world_size=4, causal=True, layout=layout, backend="cuda", return_lse=True,
        window=window, softcap=softcap,
    )  # fmt: skip
    ref_out, ref_lse = reference_attention(
        q.double(), k.double(), v.double(), causal=True, window=window, softcap=softcap
    )
    assert (out.double() - ref_out).abs().max() < 3e-2
    assert (lse.double() - ref_lse).abs().max() < 3e-2


def test_auto_backend_soft_caps_with_the_cuda_kernel_where_it_runs(emulated, rng):
    """torch's fused kernels do not cap: on the kernel's device, fp16/bf16 and head
    dims 64/128, ``auto`` runs the cuda kernel (which does), else ``math``."""
    from qdelta.ring.block import PATH_COUNTS

    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    q, k, v = (torch.randn(1, h, 70, 64, generator=gen).bfloat16() for h in (4, 2, 2))
    PATH_COUNTS.clear()
    out, lse = block_attention(q, k, v, causal=True, softcap=2.0, window=30, backend="auto")
    assert PATH_COUNTS["cuda"] == 1 and PATH_COUNTS["math"] == 0
    ref_out, ref_lse = block_reference(q, k, v, True, 0, 0, None, None, window=30, softcap=2.0)
    assert (out.double() - ref_out).abs().max() < 3e-2
    assert (lse.double() - ref_lse).abs().max() < 3e-2
    PATH_COUNTS.clear()
    block_attention(q[..., :32], k[..., :32], v[..., :32], softcap=2.0, backend="auto")
    assert PATH_COUNTS["math"] == 1 and PATH_COUNTS["cuda"] == 0  # head dim 32: no kernel
