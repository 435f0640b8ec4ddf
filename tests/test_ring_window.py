"""Sliding windows and soft-capped logits in the ring: block backends, the pair
and step plan, and the virtual ring, against float64 references."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import qdelta.ring.attention as ring_attention_module
import qdelta.ring.block as ring_block_module
from qdelta.ring import RingBackendWarning, RingError, block_attention, virtual_ring_attention
from qdelta.ring.block import PATH_COUNTS, effective_window
from ring_reference import block_reference, random_segments, reference_attention

Plan = ring_attention_module._Plan


def rnd(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)


# (causal, q_start, kv_start, sq, sk, window, softcap, segments)
BLOCK_CASES = [
    (True, 0, 0, 37, 37, 5, None, False),  # the diagonal block, a narrow window
    (True, 40, 0, 20, 50, 17, None, False),  # queries ahead: the window cuts the keys' start
    (False, 0, 0, 9, 13, 3, None, False),  # no causality: a lower bound on keys only
    (True, 0, 0, 30, 30, None, 2.5, False),  # soft-cap alone
    (True, 10, 0, 33, 41, 8, 1.7, True),  # both, with segment ids
    (True, 100, 0, 5, 10, 3, None, False),  # every key out of reach: an empty partial
    (True, 0, 0, 16, 16, 1, None, False),  # window 1: each query sees itself only
    (True, 7, 0, 12, 9, 30, None, False),  # a window wider than the block: no mask
]


@pytest.fixture(params=[128, 2], ids=["whole-blocks", "query-tiles"])
def tile_rows(request, monkeypatch):
    """The default tiling (these blocks are too small to tile) and tiles of a few rows
    (every windowed block tiled: each query tile against the keys it reaches)."""
    monkeypatch.setattr(ring_block_module, "WINDOW_TILE_MIN", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_window_and_softcap_match_the_reference(case, backend, dtype, tile_rows):
    causal, q_start, kv_start, sq, sk, window, softcap, segs = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    q = rnd(2, 4, sq, 8, dtype=dtype, gen=gen).requires_grad_()
    k, v = (rnd(2, 2, sk, 8, dtype=dtype, gen=gen).requires_grad_() for _ in range(2))
    qseg = kseg = None
    if segs:
        qseg = torch.randint(0, 3, (2, sq), generator=gen).sort(-1).values
        kseg = torch.randint(0, 3, (2, sk), generator=gen).sort(-1).values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RingBackendWarning)  # sdpa + softcap: math
        out, lse = block_attention(
            q, k, v, causal=causal, q_start=q_start, kv_start=kv_start, q_segment_ids=qseg,
            kv_segment_ids=kseg, backend=backend, window=window, softcap=softcap,
        )  # fmt: skip
    ref_out, ref_lse = block_reference(
        q, k, v, causal, q_start, kv_start, qseg, kseg, window=window, softcap=softcap
    )
    seen = ~ref_lse.isneginf()
    assert torch.equal(lse.isneginf(), ~seen) and not out.isnan().any()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (out.double() - ref_out).abs().max() < tol
    if seen.any():
        assert (lse.double() - ref_lse)[seen].abs().max() < tol
    g_out, g_lse = rnd(*out.shape, gen=gen), rnd(*lse.shape, gen=gen) * seen
    got = torch.autograd.grad(
        (out.double() * g_out).sum() + (torch.where(seen, lse.double(), 0) * g_lse).sum(),
        (q, k, v),
    )
    want = torch.autograd.grad(
        (ref_out * g_out).sum() + (torch.where(seen, ref_lse, 0) * g_lse).sum(), (q, k, v)
    )
    for a, b in zip(got, want, strict=True):
        assert (a.double() - b).abs().max() < tol * 10


def test_window_tiles_cover_every_visible_pair_and_only_reachable_keys():
    from qdelta.ring.block import window_tiles

    for causal, q_start, kv_start, sq, sk, window in [
        (True, 0, 0, 1000, 1000, 256),
        (True, 1000, 0, 1000, 1000, 300),
        (False, 600, 0, 400, 900, 200),  # no causality: keys behind the window only
        (True, 64, 0, 517, 611, 129),
    ]:
        tiles = window_tiles(sq, sk, causal, q_start, kv_start, window)
        assert tiles is not None
        qpos = torch.arange(sq)[:, None] + q_start
        kpos = torch.arange(sk)[None, :] + kv_start
        visible = ((qpos >= kpos) | (not causal)) & (qpos - kpos < window)
        hits = torch.zeros(sq, sk, dtype=torch.int64)
        for qs, ks in tiles:
            hits[qs, ks] += 1
        assert (hits[visible] == 1).all() and (hits <= 1).all()
        assert hits.sum() <= 0.75 * sq * sk  # the point: a fraction of the block's work
    assert window_tiles(1000, 1000, True, 0, 0, None) is None
    assert window_tiles(100, 100, True, 0, 0, 50) is None  # one tile: nothing to cut
    assert window_tiles(1000, 1000, False, 0, 0, 900) is None  # most keys reachable anyway


def test_effective_window_drops_windows_that_hide_nothing_or_everything():
    assert effective_window(None, 4, 4, 0, 0) is None
    assert effective_window(4, 4, 4, 0, 0) is None  # farthest pair: distance 3
    assert effective_window(3, 4, 4, 0, 0) == 3
    assert effective_window(5, 4, 4, 20, 0) == 0  # nearest pair: distance 17
    assert effective_window(18, 4, 4, 20, 0) == 18


def test_sdpa_window_blocks_take_the_fused_masked_path():
    q = rnd(1, 2, 24, 8)
    PATH_COUNTS.clear()
    block_attention(q, q, q, causal=True, window=5, backend="sdpa")
    assert PATH_COUNTS["cpu_flash_masked"] == 1 and PATH_COUNTS["math"] == 0


def test_softcap_runs_the_math_backend_on_auto_without_a_warning_and_warns_on_sdpa():
    q = rnd(1, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block_attention(q, q, q, softcap=3.0, backend="auto")
    ring_block_module._warned.discard("softcap")
    with pytest.warns(RingBackendWarning, match="softcap"):
        block_attention(q, q, q, softcap=3.0, backend="sdpa")


# ------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    ("seq_len", "world", "layout", "window", "steps"),
    [
        (64, 4, "contiguous", None, 4),  # no window: the full turn
        (64, 4, "contiguous", 1, 1),  # each rank's own block only
        (64, 4, "contiguous", 16, 2),  # chunks of 16: one neighbour
        (64, 4, "contiguous", 17, 2),  # the nearest key two chunks back: 17 away
        (64, 4, "contiguous", 18, 3),  # ... and in reach of window 18
        (64, 4, "zigzag", 16, 4),  # zigzag: the far chunk's neighbour is a full turn away
        (30, 3, "contiguous", 1, 1),
        (31, 4, "contiguous", 5, 2),
        (4096, 8, "contiguous", 1000, 3),
    ],
)
def test_the_ring_turns_only_as_far_as_the_window_reaches(seq_len, world, layout, window, steps):
    assert Plan(seq_len, world, layout, True, 1.0, "sdpa", window).steps() == steps


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("layout", "world", "seq_len", "window"),
    [
        ("contiguous", 4, 31, 5),
        ("zigzag", 3, 29, 7),
        ("contiguous", 3, 11, 1),
        ("zigzag", 2, 10, 3),
    ],
)
def test_window_pairs_cover_every_visible_query_key_pair_once(layout, world, seq_len, window, fast):
    ring_attention_module.FAST_PATH, before = fast, ring_attention_module.FAST_PATH
    try:
        plan = Plan(seq_len, world, layout, True, 1.0, "sdpa", window)
        pos = [
            torch.cat([torch.arange(c.start, c.stop) for c in plan.chunks(r)]) for r in range(world)
        ]
        for r, step in itertools.product(range(world), range(world)):
            src = (r - step) % world
            hits = torch.zeros(len(pos[r]), len(pos[src]), dtype=torch.int64)
            pairs = ring_attention_module._pairs(plan, r, src)
            for p in pairs:
                hits[p.qs, p.ks] += 1
                dist = pos[r][p.qs, None] - pos[src][None, p.ks]
                if not p.masked:  # an unmasked pair must be wholly visible
                    assert ((dist >= 0) & (dist < window)).all()
            d = pos[r][:, None] - pos[src][None, :]
            want = (d >= 0) & (d < window)
            assert (hits[want] == 1).all() and (hits <= 1).all()
            if step >= plan.steps():
                assert not pairs
    finally:
        ring_attention_module.FAST_PATH = before


# ----------------------------------------------------------------- virtual ring

VIRTUAL = [
    # world, layout, seq_len, window, softcap
    (1, "contiguous", 19, 4, None),
    (2, "zigzag", 24, 5, None),
    (3, "contiguous", 29, 1, None),
    (3, "contiguous", 30, 10, None),  # exactly one chunk
    (4, "contiguous", 32, 9, 3.0),  # one key past a chunk, capped
    (4, "zigzag", 32, 12, None),
    (5, "zigzag", 27, 3, None),
    (3, "zigzag", 18, None, 2.0),  # soft-cap alone
    (4, "contiguous", 24, 100, None),  # wider than the sequence: plain causal
]


@pytest.mark.parametrize("batched", [False, True], ids=["by-rank", "step-batched"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("case", VIRTUAL, ids=lambda c: "-".join(map(str, c)))
def test_virtual_ring_window_matches_the_full_sequence(
    case, backend, batched, monkeypatch, tile_rows
):
    from qdelta.ring import virtual_batched

    monkeypatch.setattr(virtual_batched, "BATCH_ON_CPU", batched)
    monkeypatch.setattr(ring_block_module, "BACKWARD_ROWS", 5)  # several backward tiles
    world, layout, seq_len, window, softcap = case
    gen = torch.Generator().manual_seed(seq_len * 31 + world)
    seg = random_segments(seq_len, gen, 2) if world % 2 else None
    q, k, v = (rnd(2, h, seq_len, 8, gen=gen).requires_grad_() for h in (4, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RingBackendWarning)
        out, lse = virtual_ring_attention(
            q, k, v, world_size=world, causal=True, segment_ids=seg, layout=layout,
            backend=backend, return_lse=True, window=window, softcap=softcap,
        )  # fmt: skip
    ref_out, ref_lse = reference_attention(
        q, k, v, causal=True, segment_ids=seg, window=window, softcap=softcap
    )
    assert (out - ref_out).abs().max() < 1e-10 and (lse - ref_lse).abs().max() < 1e-10
    dout, dlse = rnd(*out.shape, gen=gen), rnd(*lse.shape, gen=gen)
    got = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    for g, r in zip(got, want, strict=True):
        assert (g - r).abs().max() < 1e-10


def test_a_window_needs_causal_attention():
    q = rnd(1, 2, 8, 8)
    with pytest.raises(RingError, match="causal=True with a sliding window"):
        virtual_ring_attention(q, q, q, world_size=2, window=3)


def test_virtual_ring_checks_window_and_softcap():
    q = rnd(1, 2, 8, 8)
    with pytest.raises(Exception, match="window >= 1"):
        virtual_ring_attention(q, q, q, world_size=2, causal=True, window=0)
    with pytest.raises(Exception, match="finite softcap > 0"):
        virtual_ring_attention(q, q, q, world_size=2, causal=True, softcap=-1.0)
