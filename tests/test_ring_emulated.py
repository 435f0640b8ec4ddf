"""The ring block kernels (qdelta/_cuda/attention_block.cu) on the CPU through the emulator.

``attention_block`` (CUDA cores), ``attention_block_mma`` (mma.sync) and
``attention_block_mma2`` (mma.sync with cp.async double buffering and ldmatrix)
run their real host code (qdelta.ring.cuda_block) under
``qdelta.kernels.emulator.emulate()`` and are checked against the float64 math
reference with the GPU tests' tolerances.
"""

from __future__ import annotations

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


def check_against_reference(rng, kernel, dtype, head_dim, case, scale=None):
    causal, q_start, kv_start, segs, hq, hkv, sq, sk = case
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = rnd(2, hq, sq, head_dim), rnd(2, hkv, sk, head_dim), rnd(2, hkv, sk, head_dim)
    qseg = kseg = None
    if segs:
        # Query segment 3 has no keys: those rows must come out 0 with lse -inf.
        qseg = torch.randint(0, 4, (2, sq), generator=gen).sort(-1).values
        kseg = torch.randint(0, 3, (2, sk), generator=gen).sort(-1).values
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_block, "DEFAULT_KERNEL", kernel)
        out, lse = block_attention(
            q, k, v, softmax_scale=scale, causal=causal, q_start=q_start, kv_start=kv_start,
            q_segment_ids=qseg, kv_segment_ids=kseg, backend="cuda",
        )  # fmt: skip
    ref_out, ref_lse = block_reference(q, k, v, causal, q_start, kv_start, qseg, kseg, scale)
    masked = ref_lse.isneginf()
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(lse.isneginf(), masked)
    if (causal and kv_start > q_start) or segs:
        assert masked.any(), "the case should have rows that see no key"
    assert (out[masked.unsqueeze(-1).expand_as(out)] == 0).all()
    assert not out.isnan().any()
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert (out.double() - ref_out).abs().max() < tol
    assert (lse.double() - ref_lse)[~masked].abs().max() < tol


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
