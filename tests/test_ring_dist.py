"""Ring attention over real gloo process groups against SDPA on the full sequence.

One spawned job of 4 ranks runs every case on sub-rings of 1, 2, 3 and 4 ranks
(process groups made with new_group), so spawning is paid once.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.distributed as dist

import qdelta.ring.attention as ring_attention_module
from qdelta.ring import RingError, ring_attention, shard, unshard
from qdelta.ring.launch import run_ring, spawn_ring
from ring_reference import random_segments, reference_attention

WORLD_SIZES = (1, 2, 3, 4)
# (dtype, causal, layout, segments, q heads, kv heads, seq_len, batch)
CASES = [
    ("float64", False, "contiguous", False, 4, 4, 29, 2),
    ("float64", True, "contiguous", False, 4, 2, 31, 1),
    ("float64", True, "zigzag", False, 2, 1, 27, 2),
    ("float64", True, "zigzag", True, 4, 2, 33, 2),
    ("float64", False, "contiguous", True, 2, 2, 25, 1),
    ("float32", True, "contiguous", True, 4, 1, 30, 1),
    ("float32", True, "zigzag", False, 4, 2, 23, 1),
    ("float32", False, "zigzag", True, 2, 2, 21, 2),
    # Segment ids (first_masked_segments) that leave query rows with no visible key
    # in the first block call they get: zigzag's late chunk against the rank's own
    # early chunk, whose segments it does not share. Math and fused backward.
    ("float64", True, "zigzag", "first-masked", 4, 2, 26, 2),
    ("float32", True, "zigzag", "first-masked", 2, 1, 23, 2),
    # Sliding windows (the ring turns fewer steps: at 3 and 4 ranks the dK/dV
    # accumulators take the one-hop way home; window 1: no step past the first)
    # and soft-capped logits, through the extra options of a case.
    ("float64", True, "contiguous", False, 4, 2, 31, 1, {"window": 5}),
    ("float64", True, "zigzag", True, 4, 2, 29, 2, {"window": 9}),
    ("float32", True, "contiguous", True, 2, 1, 30, 2, {"window": 1}),
    ("float64", True, "contiguous", False, 2, 2, 27, 1, {"window": 12, "softcap": 2.0}),
    ("float32", True, "zigzag", False, 4, 2, 23, 1, {"softcap": 1.5}),
]
TOL = {"float64": 1e-10, "float32": 1e-5}
HEAD_DIM = 8


def options(case) -> dict:
    """A case's extra ring_attention arguments (window, softcap)."""
    return case[8] if len(case) > 8 else {}


def first_masked_segments(seq_len: int, batch: int) -> torch.Tensor:
    """Packed-sequence ids whose early half shares no segment with later rows.

    Row 0: segment 0 up to just past the middle, then 1, the last two tokens 2.
    Row 1: token 0 alone, then one segment, the last token alone. Under zigzag
    with any world size, rank 0's late chunk (the sequence's end) holds rows
    whose segment is absent from its early chunk, the first block they meet.
    """
    half = seq_len // 2 + 1
    a = torch.zeros(seq_len, dtype=torch.int64)
    a[half:] = 1
    a[-2:] = 2
    b = torch.ones(seq_len, dtype=torch.int64)
    b[0] = 0
    b[-1] = 2
    return torch.stack([a, b][:batch] + [a] * max(0, batch - 2))


def case_inputs(seed: int, case) -> dict:
    """The full-sequence inputs of one case, the same in every process."""
    dtype, _causal, _layout, segs, hq, hkv, seq_len, batch = case[:8]
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    return {
        "q": rnd(batch, hq, seq_len, HEAD_DIM),
        "k": rnd(batch, hkv, seq_len, HEAD_DIM),
        "v": rnd(batch, hkv, seq_len, HEAD_DIM),
        "dout": rnd(batch, hq, seq_len, HEAD_DIM),
        "dlse": rnd(batch, hq, seq_len),
        "seg": (
            first_masked_segments(seq_len, batch)
            if segs == "first-masked"
            else random_segments(seq_len, gen, batch)
            if segs
            else None
        ),
    }


def _uses_dlse(i: int) -> bool:
    """Half the cases also differentiate through lse (math backward); the rest use
    the fused CPU backward, which applies only without an lse gradient."""
    return i % 2 == 0


def _ring_case(rank, ws, group, seed, case, with_dlse):
    _, causal, layout, *_ = case
    x = case_inputs(seed, case)

    def sh(t, dim=-2):
        return None if t is None else shard(t, ws, rank, layout=layout, dim=dim)

    q, k, v = (sh(x[n]).requires_grad_() for n in ("q", "k", "v"))
    out, lse = ring_attention(
        q, k, v, causal=causal, segment_ids=sh(x["seg"], -1), group=group, layout=layout,
        return_lse=True, timeout=60, **options(case),
    )  # fmt: skip
    loss = (out * sh(x["dout"])).sum()
    if with_dlse:
        loss = loss + (lse * sh(x["dlse"], -1)).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def _all_cases_worker(rank, world_size, seed):
    results = {}
    for ws in WORLD_SIZES:
        group = dist.new_group(list(range(ws)))  # collective: every rank calls it
        if rank < ws:
            for i, case in enumerate(CASES):
                results[(ws, i)] = _ring_case(rank, ws, group, seed, case, _uses_dlse(i))
    return results


def _reference(seed, case, with_dlse):
    _, causal, *_ = case
    x = case_inputs(seed, case)
    q, k, v = (x[n].to(torch.float64).requires_grad_() for n in ("q", "k", "v"))
    out, lse = reference_attention(q, k, v, causal=causal, segment_ids=x["seg"], **options(case))
    loss = (out * x["dout"].double()).sum()
    if with_dlse:
        loss = loss + (lse * x["dlse"].double()).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


@pytest.mark.parametrize("case", [c for c in CASES if c[3] == "first-masked"])
def test_first_masked_cases_mask_whole_rows_of_the_first_block(case):
    """The premise of the first-masked cases, for rank 0 at every world size: in
    the first block call each query row takes part in (ring step 0), some rows of
    either batch row see no key, so their merge starts from an empty partial."""
    _, causal, layout, _, _, _, seq_len, batch = case[:8]
    seg = first_masked_segments(seq_len, batch)
    for ws in WORLD_SIZES:
        plan = ring_attention_module._Plan(seq_len, ws, layout, causal, 1.0, "auto")
        local = shard(seg, ws, 0, layout=layout, dim=-1)
        first_masked = torch.zeros(batch, local.shape[-1], dtype=torch.bool)
        seen = torch.zeros(local.shape[-1], dtype=torch.bool)
        for qs, qc, ks, kc, pair_causal in ring_attention_module._pairs(plan, 0, 0):
            visible = local[:, qs, None] == local[:, None, ks]
            if pair_causal:
                qpos = torch.arange(qc.start, qc.stop)[:, None]
                visible = visible & (qpos >= torch.arange(kc.start, kc.stop)[None, :])
            new = ~seen[qs]  # rows meeting their first block here
            first_masked[:, qs] |= new & ~visible.any(-1)
            seen[qs] = True
        assert seen.all()
        assert first_masked[0].any() and first_masked[1].any(), (ws, first_masked)


@pytest.mark.timeout(400)
def test_ring_matches_sdpa_at_every_world_size():
    seed = random.randrange(2**31)
    per_rank = spawn_ring(_all_cases_worker, max(WORLD_SIZES), (seed,), timeout=360, pg_timeout=120)
    for i, case in enumerate(CASES):
        dtype, _, layout, *_ = case
        ref = _reference(seed, case, _uses_dlse(i))
        full_by_ws = {}
        for ws in WORLD_SIZES:
            full = {}
            for name in ref:
                dim = -1 if name == "lse" else -2
                full[name] = unshard(
                    [per_rank[r][(ws, i)][name] for r in range(ws)], layout=layout, dim=dim
                )
                assert full[name].dtype == (
                    torch.float32 if name == "lse" and dtype == "float32" else getattr(torch, dtype)
                )
                err = (full[name].double() - ref[name]).abs().max().item()
                assert err < TOL[dtype], f"seed {seed} case {case} world {ws} {name}: error {err}"
            full_by_ws[ws] = full
        for ws in WORLD_SIZES[1:]:
            for name in ref:
                diff = (
                    (full_by_ws[ws][name].double() - full_by_ws[1][name].double())
                    .abs()
                    .max()
                    .item()
                )
                assert diff < TOL[dtype], (
                    f"seed {seed} case {case}: world {ws} vs 1 differ in {name} by {diff}"
                )


def _dies_after_forward(rank, world_size):
    q, k, v = (torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))
    out = ring_attention(q, k, v, causal=True, timeout=20)
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        out.sum().backward()
    except RingError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None}


def _hangs_before_start(rank, world_size):
    if rank == 1:
        time.sleep(600)
    start = time.monotonic()
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    try:
        ring_attention(q, k, v, timeout=10)
    except RingError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.timeout(200)
def test_a_dead_rank_fails_its_peer_with_a_clear_error():
    outcomes = run_ring(_dies_after_forward, 2, timeout=150, pg_timeout=20)
    assert not outcomes[1].ok and "exit code 3" in outcomes[1].error
    assert outcomes[0].ok, outcomes[0].error
    msg = outcomes[0].value["error"]
    assert msg is not None and "ring rank 0/2" in msg and "peer rank died" in msg, msg
    # It names the exchange that failed: the backward's first step (of 2 over 2 ranks).
    assert "(backward, step 1 of 2)" in msg, msg
    assert outcomes[0].value["seconds"] < 30


@pytest.mark.timeout(200)
def test_a_hung_rank_fails_its_peer_within_the_timeout():
    outcomes = run_ring(_hangs_before_start, 2, timeout=150, pg_timeout=10, grace=1)
    assert outcomes[0].ok, outcomes[0].error
    msg = outcomes[0].value["error"]
    assert msg is not None and "ring rank 0/2" in msg, msg
    assert outcomes[0].value["seconds"] < 30
    assert not outcomes[1].ok and "hung" in outcomes[1].error
