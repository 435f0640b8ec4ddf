"""The CUDA block kernel and the GPU paths against the float64 math reference (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

import qdelta.ring.block as ring_block
from qdelta import ShapeError
from qdelta.ring import block_attention, cuda_block, virtual_ring_attention
from ring_reference import block_reference, reference_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_block.available(), reason="needs a CUDA device and cupy"),
]

CASES = [
    # causal, q_start, kv_start, segments, hq, hkv, sq, sk
    (False, 0, 0, False, 4, 4, 100, 77),
    (True, 0, 0, False, 4, 2, 130, 130),
    (True, 200, 37, False, 8, 1, 61, 190),
    (True, 0, 50, False, 2, 2, 96, 64),  # first rows see nothing
    (False, 0, 0, True, 4, 2, 70, 129),
    (True, 64, 0, True, 4, 4, 65, 65),
    (True, 40, 0, False, 4, 1, 257, 300),  # several 64-row blocks and key tiles, ragged
    (True, 0, 0, True, 6, 3, 200, 200),  # diagonal with segments across tiles
    (False, 0, 0, False, 2, 2, 128, 128),  # whole tiles: the unmasked fast loop
    (True, 0, 100, False, 2, 2, 150, 77),  # mma2: no row of block 0 sees a key
    (True, 1000, 0, False, 2, 1, 33, 257),  # every key visible, ragged last tile
    (False, 0, 0, False, 2, 1, 1, 1),  # one row, one key
]


def _gpu_inputs(dtype, head_dim, hq, hkv, sq, sk, segs):
    """Fresh random q, k, v on the GPU (batch 2) and sorted segment ids when asked."""
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    q, k, v = rnd(2, hq, sq, head_dim), rnd(2, hkv, sk, head_dim), rnd(2, hkv, sk, head_dim)
    qseg = kseg = None
    if segs:
        qseg = torch.randint(0, 3, (2, sq), device="cuda", generator=gen).sort(-1).values
        kseg = torch.randint(0, 3, (2, sk), device="cuda", generator=gen).sort(-1).values
    return q, k, v, qseg, kseg


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "cuda_mma", "cuda_v1", "sdpa"])
def test_gpu_block_matches_reference(monkeypatch, backend, dtype, head_dim, case):
    """``cuda``: the default kernel (mma2); ``cuda_mma``: the first mma kernel."""
    if backend == "cuda_mma":
        monkeypatch.setattr(cuda_block, "DEFAULT_KERNEL", "mma")
        backend = "cuda"
    causal, q_start, kv_start, segs, hq, hkv, sq, sk = case
    q, k, v, qseg, kseg = _gpu_inputs(dtype, head_dim, hq, hkv, sq, sk, segs)
    out, lse = block_attention(
        q, k, v, causal=causal, q_start=q_start, kv_start=kv_start,
        q_segment_ids=qseg, kv_segment_ids=kseg, backend=backend,
    )  # fmt: skip
    ref_out, ref_lse = block_reference(
        q.cpu(), k.cpu(), v.cpu(), causal, q_start, kv_start,
        None if qseg is None else qseg.cpu(), None if kseg is None else kseg.cpu(),
    )  # fmt: skip
    masked = ref_lse.isneginf()
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(lse.isneginf().cpu(), masked)
    assert not out.isnan().any()
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert (out.cpu().double() - ref_out).abs().max() < tol
    assert (lse.cpu().double() - ref_lse)[~masked].abs().max() < tol


# Sliding window / soft-capping: the CASES fields, then window and softcap.
WINDOW_CASES = [
    (True, 0, 0, False, 4, 2, 130, 130, 7, None),  # window inside a tile
    (True, 250, 0, False, 2, 1, 150, 260, 150, None),  # several tiles, tile 0 skipped
    (True, 300, 0, False, 2, 2, 70, 400, 100, None),  # tiles 0-2 skipped by every block
    (True, 1000, 800, False, 2, 2, 40, 300, 90, None),  # the same with kv_start
    (False, 0, 0, False, 2, 2, 200, 64, 20, None),  # rows >= 83 see no key
    (True, 100, 0, False, 2, 2, 100, 120, 50, None),  # causal + window: rows >= 69 see none
    (True, 0, 0, False, 2, 2, 100, 100, 1, None),  # window 1
    (False, 10, 0, False, 2, 1, 70, 90, 1, None),  # window 1, not causal
    (True, 0, 0, True, 6, 3, 200, 200, 40, None),  # window + segments + GQA
    (False, 150, 0, False, 4, 1, 100, 200, 64, None),  # window without causal
    (True, 0, 0, False, 2, 2, 1000, 1000, 300, None),  # long: many skipped and full tiles
    (False, 0, 0, False, 4, 4, 100, 77, None, 1.0),  # softcap alone
    (True, 64, 0, True, 4, 4, 65, 65, None, 0.7),  # softcap + segments
    (True, 40, 0, False, 4, 1, 257, 300, 50, 1.5),  # softcap + window
    (True, 0, 0, False, 2, 2, 128, 128, None, 50.0),  # Gemma2's cap: unmasked fast loop
]


@pytest.mark.parametrize("case", WINDOW_CASES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["mma2", "mma", "v1"])
def test_gpu_window_and_softcap_match_reference(kernel, dtype, head_dim, case):
    """Keys in tiles wholly before the first row's window are NaN: never read."""
    causal, q_start, kv_start, segs, hq, hkv, sq, sk, window, softcap = case
    q, k, v, qseg, kseg = _gpu_inputs(dtype, head_dim, hq, hkv, sq, sk, segs)
    ref_out, ref_lse = block_reference(
        q.cpu(), k.cpu(), v.cpu(), causal, q_start, kv_start,
        None if qseg is None else qseg.cpu(), None if kseg is None else kseg.cpu(),
        window=window, softcap=softcap,
    )  # fmt: skip
    skipped = cuda_block.window_first_tile(q_start, kv_start, window, sk)
    k[:, :, :skipped] = v[:, :, :skipped] = float("nan")
    out, lse = cuda_block.attention_block(
        q, k, v, head_dim**-0.5, causal, q_start, kv_start, qseg, kseg,
        kernel=kernel, window=window, softcap=softcap,
    )  # fmt: skip
    masked = ref_lse.isneginf()
    assert torch.equal(lse.isneginf().cpu(), masked)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out.cpu()[masked.unsqueeze(-1).expand_as(out)] == 0).all()
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert (out.cpu().double() - ref_out).abs().max() < tol
    assert (lse.cpu().double() - ref_lse)[~masked].abs().max() < tol


def test_gpu_window_and_softcap_through_block_attention():
    """block_attention(backend="cuda") forwards window and softcap to the kernel."""
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = block_attention(
        q, k, v, causal=True, q_start=50, backend="cuda", window=70, softcap=2.0
    )
    ref_out, ref_lse = block_reference(
        q.cpu(), k.cpu(), v.cpu(), True, 50, 0, None, None, window=70, softcap=2.0
    )
    assert (out.cpu().double() - ref_out).abs().max() < 3e-2
    assert (lse.cpu().double() - ref_lse).abs().max() < 3e-2


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_virtual_ring_on_gpu_matches_sdpa(layout):
    q = torch.randn(1, 8, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = virtual_ring_attention(q, k, v, world_size=8, causal=True, layout=layout, backend="cuda")
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - ref).abs().max() < 3e-2
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_virtual_ring_sdpa_takes_only_flash(layout, dtype):
    """Causal ring pairs are fully visible or diagonal: flash only, no mask, no math."""
    q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=dtype) for _ in range(3))
    ring_block.PATH_COUNTS.clear()
    with torch.no_grad():
        out = virtual_ring_attention(
            q, k, v, world_size=8, causal=True, layout=layout, backend="sdpa"
        )
    counts = dict(ring_block.PATH_COUNTS)
    assert set(counts) == {"flash"}, counts
    # Contiguous: 1000 splits evenly over 8 ranks, so each ring step is one call
    # for every rank (ring/virtual_batched.py); zigzag needs a multiple of 16, so
    # it runs rank by rank (3 calls on a rank's own block, 1 per other step).
    assert counts["flash"] == (8 * 3 + 8 * 7 if layout == "zigzag" else 8)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - ref).abs().max() < 3e-2


def test_mma2_kernel_is_the_cuda_default_and_matches_mma_and_v1():
    assert cuda_block.kernel_name("cuda") == "mma2"
    q, k, v = (torch.randn(2, 4, 333, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = block_attention(q, k, v, causal=True, q_start=20, backend="cuda")
    b = block_attention(q, k, v, causal=True, q_start=20, backend="cuda_v1")
    c = cuda_block.attention_block(q, k, v, 128**-0.5, True, 20, 0, None, None, kernel="mma")
    for other in (b, c):
        assert (a[0] - other[0]).abs().max() < 2e-2 and (a[1] - other[1]).abs().max() < 2e-2


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scale", [-0.2, 0.0])
def test_mma2_any_softmax_scale_on_gpu(head_dim, scale):
    q, k, v = (torch.randn(1, 2, 200, head_dim, device="cuda").bfloat16() for _ in range(3))
    out, lse = block_attention(q, k, v, softmax_scale=scale, causal=True, backend="cuda")
    ref_out, ref_lse = block_reference(q.cpu(), k.cpu(), v.cpu(), True, 0, 0, None, None, scale)
    assert (out.cpu().double() - ref_out).abs().max() < 3e-2
    assert (lse.cpu().double() - ref_lse).abs().max() < 3e-2


def test_cuda_block_launch_is_checked():
    """The launch goes through kernels.cuda.launch: a grid CUDA cannot run (batch
    > 65535 in grid z) is a clear ShapeError, not a driver error or a silent no-op.
    (The block API allocates its own out/lse, so there is no buffer to poison.)"""
    q = torch.randn(65536, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ShapeError, match="grid"):
        cuda_block.attention_block(q, q, q, 0.125, False, 0, 0, None, None, kernel="cuda")
