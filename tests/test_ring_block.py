"""Block attention backends, the exact merge, layouts, the virtual ring and the blockwise FFN."""

from __future__ import annotations

import pytest
import torch

import qdelta.ring.attention as ring_attention_module
import qdelta.ring.block as ring_block_module
from qdelta.errors import QDeltaError, ShapeError
from qdelta.ring import (
    RingError,
    block_attention,
    block_attention_backward,
    blockwise_feedforward,
    merge,
    position_ids,
    ring_attention,
    shard,
    unshard,
    virtual_ring_attention,
)
from qdelta.ring.merge import empty_partial, merge_fused_
from ring_reference import block_reference, full_mask, random_segments, reference_attention

NEG_INF = float("-inf")


def rnd(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)


# ------------------------------------------------------------------- merge


def test_merge_of_two_key_blocks_equals_attention_over_all_keys():
    q, k, v = rnd(2, 3, 7, 16), rnd(2, 3, 19, 16), rnd(2, 3, 19, 16)
    full_out, full_lse = block_reference(q, k, v, False, 0, 0, None, None)
    a = block_attention(q, k[:, :, :8], v[:, :, :8])
    b = block_attention(q, k[:, :, 8:], v[:, :, 8:])
    for first, second in ((a, b), (b, a)):
        out, lse = merge(*first, *second)
        assert (out - full_out).abs().max() < 1e-12
        assert (lse - full_lse).abs().max() < 1e-12


@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e6, 2e7])
def test_merge_is_stable_for_large_lse(magnitude):
    # The weights come from the lse difference: the rounding of a large new lse
    # (eps * |lse|) used to go straight into them (2e7 in fp32: a 90% error).
    gen = torch.Generator().manual_seed(3)
    lse_a = magnitude + torch.randn(4, 16, generator=gen, dtype=torch.float64)
    lse_b = magnitude + torch.randn(4, 16, generator=gen, dtype=torch.float64)
    out_a, out_b = (torch.randn(4, 16, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    f32 = [t.float() for t in (out_a, lse_a, out_b, lse_b)]
    out_a, lse_a, out_b, lse_b = (t.double() for t in f32)  # the truth of the fp32 inputs
    w = torch.sigmoid(lse_b - lse_a)[..., None]
    expected = out_a * (1 - w) + out_b * w
    out, _ = merge(*f32)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    fused_out, fused_lse = f32[0].clone(), f32[1].clone()
    merge_fused_(fused_out, fused_lse, f32[2], f32[3])
    torch.testing.assert_close(fused_out.double(), expected, rtol=0, atol=1e-6)


def test_merge_never_makes_nan_from_fully_masked_rows():
    out = rnd(5, 4)
    lse = torch.tensor([NEG_INF, NEG_INF, 0.3, 1.0, NEG_INF], dtype=torch.float64)
    out[lse.isneginf()] = 0
    blk_out = rnd(5, 4)
    blk_lse = torch.tensor([NEG_INF, 2.0, NEG_INF, 700.0, NEG_INF], dtype=torch.float64)
    blk_out[blk_lse.isneginf()] = 0
    new_out, new_lse = merge(out, lse, blk_out, blk_lse)
    assert not new_out.isnan().any() and not new_lse.isnan().any()
    assert new_lse[0] == NEG_INF and new_lse[4] == NEG_INF
    assert (new_out[0] == 0).all() and (new_out[4] == 0).all()
    assert torch.equal(new_out[1], blk_out[1]) and new_lse[1] == 2.0
    assert torch.equal(new_out[2], out[2]) and new_lse[2] == lse[2]
    assert torch.allclose(new_out[3], blk_out[3]) and new_lse[3] == 700.0  # no overflow


def test_merge_gradients_are_finite_for_rows_that_saw_nothing():
    lse = torch.tensor([NEG_INF, NEG_INF, 0.3, 1.0], dtype=torch.float64, requires_grad=True)
    blk_lse = torch.tensor([NEG_INF, 2.0, NEG_INF, 0.5], dtype=torch.float64, requires_grad=True)
    out, blk_out = rnd(4, 3).requires_grad_(), rnd(4, 3).requires_grad_()
    new_out, new_lse = merge(out, lse, blk_out, blk_lse)
    (new_out.sum() + new_lse[1:].sum()).backward()
    for t in (lse, blk_lse, out, blk_out):
        assert torch.isfinite(t.grad).all(), t.grad
    assert lse.grad[0] == 0 and blk_lse.grad[0] == 0 and (out.grad[0] == 0).all()
    # Where a row has seen something the gradients are the closed form's.
    w = torch.sigmoid(lse.detach()[3] - blk_lse.detach()[3])
    want = w * (1 - w) * (out.detach()[3] - blk_out.detach()[3]).sum() + w
    torch.testing.assert_close(lse.grad[3], want)


def test_merging_into_the_empty_partial_gives_the_block():
    o, lse = empty_partial((2, 3, 4), torch.float32, "cpu")
    bo, bl = rnd(2, 3, 4, dtype=torch.float32), rnd(2, 3, dtype=torch.float32)
    mo, ml = merge(o, lse, bo, bl)
    assert torch.equal(mo, bo) and torch.equal(ml, bl)


# ------------------------------------------------------------ block backends

BLOCK_CASES = [
    # causal, q_start, kv_start, segments, hq, hkv
    (False, 0, 0, False, 4, 4),
    (True, 10, 3, False, 4, 2),  # partly masked: diagonal crosses the block
    (True, 5, 5, False, 2, 1),  # the diagonal block (MQA)
    (True, 0, 9, False, 4, 4),  # rows 0..8 fully masked, later ones partly
    (False, 0, 0, True, 4, 2),
    (True, 7, 2, True, 3, 1),
]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_block_backends_match_float64_reference(backend, case, dtype):
    causal, q_start, kv_start, segs, hq, hkv = case
    q, k, v = (
        rnd(2, hq, 13, 16, dtype=dtype),
        rnd(2, hkv, 11, 16, dtype=dtype),
        rnd(2, hkv, 11, 16, dtype=dtype),
    )
    qseg = torch.tensor([[0] * 6 + [1] * 4 + [3] * 3, [2] * 13])
    kseg = torch.tensor([[0] * 3 + [1] * 5 + [2] * 3, [2] * 4 + [5] * 7])
    if not segs:
        qseg = kseg = None
    out, lse = block_attention(
        q, k, v, causal=causal, q_start=q_start, kv_start=kv_start,
        q_segment_ids=qseg, kv_segment_ids=kseg, backend=backend, softmax_scale=0.3,
    )  # fmt: skip
    ref_out, ref_lse = block_reference(q, k, v, causal, q_start, kv_start, qseg, kseg, scale=0.3)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    masked = ref_lse.isneginf()
    assert torch.equal(lse.isneginf(), masked)
    assert not out.isnan().any() and (out[masked] == 0).all()
    assert (out.double() - ref_out).abs().max() < tol
    assert (lse.double() - ref_lse)[~masked].abs().max() < tol


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_backward_matches_autograd(case):
    causal, q_start, kv_start, segs, hq, hkv = case
    qseg = torch.tensor([0] * 5 + [1] * 4) if segs else None
    kseg = torch.tensor([0] * 2 + [1] * 5) if segs else None
    q, k, v = (t.requires_grad_() for t in (rnd(2, hq, 9, 8), rnd(2, hkv, 7, 8), rnd(2, hkv, 7, 8)))
    out, lse = block_reference(q, k, v, causal, q_start, kv_start, qseg, kseg)
    dout, dlse = rnd(*out.shape), rnd(*lse.shape)
    seen = ~lse.isneginf()
    loss = (out * dout).sum() + (torch.where(seen, lse, 0.0) * dlse).sum()
    ref = torch.autograd.grad(loss, (q, k, v))
    got = block_attention_backward(
        q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dout, dlse,
        causal=causal, q_start=q_start, kv_start=kv_start, q_segment_ids=qseg, kv_segment_ids=kseg,
    )  # fmt: skip
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max() < 1e-12


def test_block_rejects_bad_inputs():
    q = rnd(1, 3, 4, 8)
    with pytest.raises(ShapeError, match="multiple"):
        block_attention(q, rnd(1, 2, 4, 8), rnd(1, 2, 4, 8))
    with pytest.raises(ShapeError, match="head_dim"):
        block_attention(q, rnd(1, 3, 4, 4), rnd(1, 3, 4, 4))
    with pytest.raises(ShapeError, match="kv_segment_ids"):
        block_attention(
            q, q, q, q_segment_ids=torch.zeros(4).long(), kv_segment_ids=torch.zeros(5).long()
        )
    with pytest.raises(RingError, match="backend"):
        block_attention(q, q, q, backend="fast")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ShapeError, match="finite softmax_scale"):
            block_attention(q, q, q, softmax_scale=bad)
    assert issubclass(RingError, QDeltaError)


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("seq_len,world", [(17, 3), (8, 4), (5, 2), (3, 2), (30, 4)])
def test_shard_unshard_round_trip_and_positions(layout, seq_len, world):
    x = torch.arange(seq_len * 2).reshape(2, seq_len)
    parts = [shard(x, world, r, layout=layout, dim=-1) for r in range(world)]
    assert torch.equal(unshard(parts, layout=layout, dim=-1), x)
    for r, part in enumerate(parts):
        assert torch.equal(part[0], position_ids(seq_len, world, r, layout))
    with pytest.raises(ShapeError, match="expected rank 0's shard to hold"):
        unshard([x[:, :2], x[:, :5]], layout=layout, dim=-1)


def test_zigzag_balances_causal_work():
    seq_len, world = 64, 4
    work = [
        sum(int(p) + 1 for p in position_ids(seq_len, world, r, "zigzag")) for r in range(world)
    ]
    assert max(work) == min(work)


# ------------------------------------------------------------- virtual ring

VIRTUAL_CASES = [
    # world, causal, layout, segments, hq, hkv, seq_len
    (1, True, "contiguous", False, 2, 2, 9),
    (2, False, "zigzag", True, 4, 2, 17),
    (3, True, "contiguous", True, 4, 1, 20),
    (4, True, "zigzag", False, 2, 2, 19),
    (5, True, "zigzag", True, 4, 2, 23),
    # Even splits: every rank's blocks of a step in one call (virtual_batched.py).
    (2, True, "zigzag", True, 4, 2, 24),
    (4, True, "contiguous", True, 2, 1, 20),
    (3, False, "contiguous", True, 2, 2, 18),
    (4, True, "zigzag", False, 4, 2, 32),
    (3, False, "zigzag", False, 2, 2, 18),
]


@pytest.mark.parametrize("case", [c for c in VIRTUAL_CASES if c[6] % (2 * c[0]) == 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_step_batched_virtual_ring_equals_rank_by_rank(case, dtype, monkeypatch):
    from qdelta.ring import virtual_batched

    world, causal, layout, segs, hq, hkv, seq_len = case
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    seg = random_segments(seq_len, gen, 2) if segs else None
    q, k, v = (rnd(2, h, seq_len, 8, dtype=dtype, gen=gen) for h in (hq, hkv, hkv))
    args = dict(world_size=world, causal=causal, segment_ids=seg, layout=layout,
                backend="sdpa", return_lse=True)  # fmt: skip
    monkeypatch.setattr(virtual_batched, "BATCH_ON_CPU", True)
    assert virtual_batched.applies(
        ring_attention_module._Plan(seq_len, world, layout, causal, 1.0, "sdpa"),
        seq_len,
        q.device,
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fast = virtual_ring_attention(*leaves, **args)
    g_out, g_lse = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
                    for t in fast)  # fmt: skip
    fast_grads = torch.autograd.grad((fast[0] * g_out).sum() + (fast[1] * g_lse).sum(), leaves)
    monkeypatch.setattr(virtual_batched, "BATCH_ON_CPU", False)
    slow = virtual_ring_attention(*leaves, **args)
    slow_grads = torch.autograd.grad((slow[0] * g_out).sum() + (slow[1] * g_lse).sum(), leaves)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip((*fast, *fast_grads), (*slow, *slow_grads), strict=True):
        assert (a.double() - b.double()).abs().max() < tol * (1 + b.double().abs().max())


@pytest.mark.parametrize("batched", [False, True], ids=["by-rank", "step-batched"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("case", VIRTUAL_CASES)
def test_virtual_ring_matches_sdpa_forward_and_backward(backend, case, batched, monkeypatch):
    from qdelta.ring import virtual_batched

    monkeypatch.setattr(virtual_batched, "BATCH_ON_CPU", batched)  # even splits only
    monkeypatch.setattr(ring_block_module, "BACKWARD_ROWS", 3)  # several math backward tiles
    world, causal, layout, segs, hq, hkv, seq_len = case
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    seg = random_segments(seq_len, gen, 2) if segs else None
    q, k, v = (rnd(2, h, seq_len, 8).requires_grad_() for h in (hq, hkv, hkv))
    out, lse = virtual_ring_attention(
        q, k, v, world_size=world, causal=causal, segment_ids=seg, layout=layout,
        backend=backend, return_lse=True,
    )  # fmt: skip
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, segment_ids=seg)
    dout, dlse = rnd(*out.shape), rnd(*lse.shape)
    got = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    assert (out - ref_out).abs().max() < 1e-10 and (lse - ref_lse).abs().max() < 1e-10
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max() < 1e-10


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_causal_attention_with_a_zero_or_negative_scale(backend, scale):
    """torch's fused causal kernel gives NaN rows for such scales: the diagonal
    block must take the explicit mask (the ring runs every diagonal that way)."""
    q, k, v = (rnd(2, h, 9, 8).requires_grad_() for h in (4, 2, 2))
    out, lse = block_attention(
        q.detach(), k.detach(), v.detach(), causal=True, softmax_scale=scale, backend=backend
    )
    ref_out, ref_lse = block_reference(q, k, v, True, 0, 0, None, None, scale=scale)
    assert (out - ref_out).abs().max() < 1e-12 and (lse - ref_lse).abs().max() < 1e-12
    out, lse = virtual_ring_attention(
        q, k, v, world_size=3, causal=True, softmax_scale=scale, backend=backend, return_lse=True
    )
    ref_out, ref_lse = reference_attention(q, k, v, causal=True, scale=scale)
    assert (out - ref_out).abs().max() < 1e-10 and (lse - ref_lse).abs().max() < 1e-10
    dout = rnd(*out.shape)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * dout).sum(), (q, k, v))
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max() < 1e-10


def test_ring_attention_refuses_double_backward(one_rank):
    """K/V from other ranks arrive without a graph: a second derivative would
    silently miss their share, so it is refused."""
    q, k, v = (rnd(1, 2, 6, 4).requires_grad_() for _ in range(3))
    out = ring_attention(q, k, v, backend="math", timeout=30)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()


def test_ring_attention_needs_a_process_group():
    q = rnd(1, 2, 4, 8)
    with pytest.raises(RingError, match="process group"):
        ring_attention(q, q, q)


def test_full_mask_helper_is_causal_and_segmented():
    m = full_mask(4, True, torch.tensor([0, 0, 1, 1]))
    assert m[0, 0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


# -------------------------------------------------------------- blockwise FFN


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_blockwise_feedforward_equals_ffn(chunk):
    ffn = torch.nn.Sequential(
        torch.nn.Linear(6, 24), torch.nn.GELU(), torch.nn.Linear(24, 6)
    ).double()
    x = rnd(2, 11, 6).requires_grad_()
    out = blockwise_feedforward(ffn, x, chunk)
    ref = ffn(x)
    assert (out - ref).abs().max() < 1e-12
    g = rnd(*out.shape)
    got = torch.autograd.grad((out * g).sum(), (x, *ffn.parameters()))
    want = torch.autograd.grad((ref * g).sum(), (x, *ffn.parameters()))
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() < 1e-12
    with pytest.raises(RingError):
        blockwise_feedforward(ffn, x, 0)


@pytest.mark.parametrize("case", VIRTUAL_CASES[1:])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_virtual_ring_fused_cpu_backward_without_lse_gradient(case, dtype):
    world, causal, layout, segs, hq, hkv, seq_len = case
    seg = random_segments(seq_len, torch.Generator().manual_seed(7), 2) if segs else None
    q, k, v = (rnd(2, h, seq_len, 8, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv))
    out = virtual_ring_attention(
        q, k, v, world_size=world, causal=causal, segment_ids=seg, layout=layout, backend="sdpa"
    )
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qd, kd, vd, causal=causal, segment_ids=seg)
    dout = rnd(*out.shape, dtype=dtype)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    want = torch.autograd.grad((ref * dout.double()).sum(), (qd, kd, vd))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (out.double() - ref).abs().max() < tol
    for g, r in zip(got, want, strict=True):
        assert (g.double() - r).abs().max() < tol


def test_block_backward_fused_matches_math():
    q, k, v = rnd(2, 4, 9, 8), rnd(2, 2, 13, 8), rnd(2, 2, 13, 8)
    seg_q, seg_k = torch.tensor([0] * 4 + [1] * 5), torch.tensor([0] * 6 + [1] * 7)
    # final out/lse of a query block that also saw other keys: merge two blocks
    o1, l1 = block_attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_k)
    o2, l2 = block_attention(q, rnd(2, 2, 5, 8), rnd(2, 2, 5, 8))
    out, lse = merge(o1, l1, o2, l2)
    dout = rnd(*out.shape)
    kw = {"q_segment_ids": seg_q, "kv_segment_ids": seg_k, "causal": True, "q_start": 6}
    fused = block_attention_backward(q, k, v, out, lse, dout, backend="sdpa", **kw)
    math_ = block_attention_backward(q, k, v, out, lse, dout, backend="math", **kw)
    for a, b in zip(fused, math_, strict=True):
        assert (a - b).abs().max() < 1e-12


# ------------------------------------------------------------ the fast ring path


def test_merge_fused_equals_merge_and_never_makes_nan():
    lse = torch.tensor([NEG_INF, NEG_INF, 0.3, 1.0, NEG_INF, -2.0], dtype=torch.float64)
    blk_lse = torch.tensor([NEG_INF, 2.0, NEG_INF, 700.0, NEG_INF, 1.5], dtype=torch.float64)
    out, blk_out = rnd(6, 5), rnd(6, 5)
    out[lse.isneginf()] = 0
    blk_out[blk_lse.isneginf()] = 0
    want_out, want_lse = merge(out, lse, blk_out, blk_lse)
    buf_out, buf_lse = rnd(6, 9), rnd(6, 3)  # merge into views of larger buffers
    buf_out[:, 2:7], buf_lse[:, 1] = out, lse
    merge_fused_(buf_out[:, 2:7], buf_lse[:, 1], blk_out, blk_lse)
    assert not buf_out.isnan().any() and not buf_lse.isnan().any()
    assert (buf_out[:, 2:7] - want_out).abs().max() < 1e-13
    assert torch.equal(buf_lse[:, 1].isneginf(), want_lse.isneginf())
    finite = want_lse.isfinite()
    assert (buf_lse[finite, 1] - want_lse[finite]).abs().max() < 1e-13


def test_merge_fused_reads_a_bf16_block_into_fp32_partials():
    out, lse = empty_partial((2, 7, 16), torch.float32, "cpu")
    blocks = [(rnd(2, 7, 16).bfloat16(), rnd(2, 7, dtype=torch.float32)) for _ in range(3)]
    want_out, want_lse = out.clone(), lse.clone()
    for bo, bl in blocks:
        merge_fused_(out, lse, bo, bl)
        want_out, want_lse = merge(want_out, want_lse, bo.float(), bl)
    assert out.dtype == torch.float32
    assert (out - want_out).abs().max() < 1e-5 and (lse - want_lse).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("seq_len", [64, 67])
def test_causal_ring_pairs_are_full_or_diagonal_and_coalesced(layout, seq_len):
    world = 4
    plan = ring_attention_module._Plan(seq_len, world, layout, True, 1.0, "sdpa")
    calls = 0
    for r in range(world):
        for src in range(world):
            pairs = ring_attention_module._pairs(plan, r, src)
            calls += len(pairs)
            for p in pairs:
                if p.masked:  # the diagonal: flash with is_causal, never a mask
                    assert p.qc == p.kc and r == src
            if layout == "zigzag":
                assert len(pairs) == (3 if r == src else 1)
    want = (
        world * 3 + world * (world - 1) if layout == "zigzag" else world + world * (world - 1) // 2
    )
    assert calls == want


def test_coalesced_pairs_cover_every_visible_query_key_pair_once():
    for layout, world, seq_len, causal in [("zigzag", 3, 29, True), ("zigzag", 2, 10, False),
                                            ("contiguous", 3, 11, True)]:  # fmt: skip
        plan = ring_attention_module._Plan(seq_len, world, layout, causal, 1.0, "sdpa")
        pos = [
            torch.cat([torch.arange(c.start, c.stop) for c in plan.chunks(r)]) for r in range(world)
        ]
        for r in range(world):
            for src in range(world):
                hits = torch.zeros(len(pos[r]), len(pos[src]), dtype=torch.int64)
                for p in ring_attention_module._pairs(plan, r, src):
                    hits[p.qs, p.ks] += 1
                want = torch.ones_like(hits, dtype=torch.bool)
                if causal:
                    want = pos[r][:, None] >= pos[src][None, :]
                # every visible pair computed exactly once; no pair is wholly invisible
                assert (hits[want] == 1).all() and (hits <= 1).all()


@pytest.mark.parametrize("batched", [False, True], ids=["by-rank", "step-batched"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_virtual_ring_sdpa_takes_no_masked_or_math_path(layout, batched, monkeypatch):
    from qdelta.ring import virtual_batched

    monkeypatch.setattr(virtual_batched, "BATCH_ON_CPU", batched)
    q, k, v = (rnd(1, 2, 40, 8, dtype=torch.float32) for _ in range(3))
    ring_block_module.PATH_COUNTS.clear()
    out = virtual_ring_attention(q, k, v, world_size=4, causal=True, layout=layout, backend="sdpa")
    counts = dict(ring_block_module.PATH_COUNTS)
    assert counts.get("math", 0) == 0 and counts.get("cpu_flash_masked", 0) == 0, counts
    # Rank by rank: coalesced chunk pairs. Step-batched (even splits): one call per
    # step for every rank, contiguous W calls, zigzag 3 + 2 (W - 1).
    if batched:
        assert counts["cpu_flash"] == (9 if layout == "zigzag" else 4)
    else:
        assert counts["cpu_flash"] == (24 if layout == "zigzag" else 10)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - ref).abs().max() < 1e-5


def test_fast_path_switch_restores_per_chunk_pairs(monkeypatch):
    q, k, v = (rnd(1, 2, 32, 8) for _ in range(3))
    fast = virtual_ring_attention(
        q, k, v, world_size=2, causal=True, layout="zigzag", backend="sdpa"
    )
    monkeypatch.setattr(ring_attention_module, "FAST_PATH", False)
    ring_block_module.PATH_COUNTS.clear()
    slow = virtual_ring_attention(
        q, k, v, world_size=2, causal=True, layout="zigzag", backend="sdpa"
    )
    assert ring_block_module.PATH_COUNTS["cpu_flash"] == 10  # one call per chunk pair
    assert (fast - slow).abs().max() < 1e-12
