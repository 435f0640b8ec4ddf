"""The virtual ring with every simulated rank's blocks of a step in one call.

In one process the ranks of a ring step need not run one after another: when
the sequence splits evenly, the block pairs of a step have the same shape on
every rank, so they stack along the batch dimension and one block call (and one
merge) serves the whole step. The ring's schedule and its masks stay exactly
those of :func:`qdelta.ring.attention._pairs`:

- not causal: at step ``s`` rank ``r`` sees all of rank ``(r - s) % W``'s keys;
- causal, contiguous: step 0 is each rank's diagonal block; at step ``s >= 1``
  the ranks ``r >= s`` see all of rank ``r - s``'s keys, the others none;
- causal, zigzag (rank ``r`` holds chunks ``r`` and ``2W - 1 - r`` of ``2W``):
  step 0 is the two diagonal chunk blocks of every rank plus its second chunk
  against its first; at step ``s >= 1`` the ranks ``r >= s`` see their source's
  first chunk with all their queries, and the ranks ``r < s`` see all their
  source's keys with their second chunk only.

So a forward (and a backward) is ``2W + 1`` block calls at most instead of
``W * W`` times the pairs of a step; a launch-bound GPU loop is what this
removes. With a sliding window (contiguous layout) step ``s`` is one call
with the query shards ``s`` chunks ahead of their keys (the window's mask is
the same for every rank), and steps wholly outside the window are dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qdelta.ring.block import block_attention_backward, block_partial, partial_dtype
from qdelta.ring.layout import shard
from qdelta.ring.merge import empty_partial, merge_fused_

#: Batch on CPU too. Off by default: there each block call is long, so there
#: are no launches to save, and torch's CPU flash kernels run the same work
#: slower on the stacked, larger inputs (8 zigzag blocks, S = 2048, forward and
#: backward: 1.6-1.8x one SDPA call rank by rank, 1.8-2.3x batched). Tests
#: turn it on to check the schedule against the rank-by-rank loop.
BATCH_ON_CPU = False


def applies(plan, seq_len: int, device: torch.device) -> bool:
    """Whether to batch: a CUDA device (or BATCH_ON_CPU) and a sequence that
    splits into equal chunks for this plan's layout."""
    if device.type != "cuda" and not BATCH_ON_CPU:
        return False
    if plan.window is not None and plan.layout != "contiguous":
        return False  # zigzag ranks of a step sit at different distances: no shared mask
    parts = plan.world_size * (2 if plan.layout == "zigzag" else 1)
    return seq_len % parts == 0 and seq_len > 0


class _Run(NamedTuple):
    """One block call: the ranks ``q_ranks`` (a slice of the stack) against the
    key blocks of ``kv_ranks`` (the same number of ranks, each one's source),
    query and key positions ``q_pos`` / ``kv_pos`` of each shard."""

    q_ranks: slice
    kv_ranks: slice
    q_pos: slice
    kv_pos: slice
    masked: bool  # by causality (and the window); False: every key visible
    ahead: int = 0  # how far the queries' positions lie after their keys' (window runs)


def _schedule(plan, local_len: int) -> list[_Run]:
    """Every block call of the ring, in ring-step order (see the module doc)."""
    w, every = plan.world_size, slice(None)
    if not plan.causal:
        runs = [_Run(every, every, every, every, False)]
        for step in range(1, w):
            # Rank r's source is r - step, wrapping: two contiguous runs of ranks.
            runs.append(_Run(slice(step, w), slice(0, w - step), every, every, False))
            runs.append(_Run(slice(0, step), slice(w - step, w), every, every, False))
        return runs
    if plan.layout == "contiguous":
        runs = [_Run(every, every, every, every, True)]
        if plan.window is None:
            runs += [_Run(slice(s, w), slice(0, w - s), every, every, False) for s in range(1, w)]
            return runs
        c = local_len
        for s in range(1, plan.steps()):
            if (s - 1) * c + 1 < plan.window:  # the nearest pair of the step is in reach
                masked = s * c + c - 1 >= plan.window  # the farthest pair is not
                runs.append(_Run(slice(s, w), slice(0, w - s), every, every, masked, s * c))
        return runs
    c = local_len // 2
    first, second = slice(0, c), slice(c, 2 * c)
    runs = [
        _Run(every, every, first, first, True),
        _Run(every, every, second, second, True),
        _Run(every, every, second, first, False),
    ]
    for step in range(1, w):
        runs.append(_Run(slice(step, w), slice(0, w - step), every, first, False))
        runs.append(_Run(slice(0, step), slice(w - step, w), second, every, False))
    return runs


def _stacks(plan, q, k, v, seg):
    """Every rank's shards stacked: ``[W, B, H, L, D]`` (segments ``[W, B, L]``)."""
    w = plan.world_size

    def stacked(t, dim=-2):
        return torch.stack([shard(t, w, r, layout=plan.layout, dim=dim) for r in range(w)])

    if seg is not None and seg.dim() == 1:
        seg = seg.expand(q.shape[0], -1)
    return stacked(q), stacked(k), stacked(v), None if seg is None else stacked(seg, dim=-1)


def _fold(t: torch.Tensor | None) -> torch.Tensor | None:
    """``[n, B, ...]`` -> ``[n * B, ...]``: the ranks of a run folded into the batch."""
    return None if t is None else t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _pick(t, ranks, pos, seq_dim=-2):
    """The ranks' slice of a stack at shard positions ``pos`` (a view)."""
    t = t[ranks]
    return t[..., pos, :] if seq_dim == -2 else t[..., pos]


def _mask_args(plan, run: _Run) -> dict:
    """The block call's mask: positions relative to the keys' start."""
    return dict(
        causal=plan.causal and run.masked,
        window=plan.window if run.masked else None,
        softcap=plan.softcap,
        q_start=run.ahead,
        kv_start=0,
    )


def forward(plan, q, k, v, seg) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank partials ``(out [W, B, H, L, D], lse [W, B, H, L])`` of the ring."""
    qs, ks, vs, segs = _stacks(plan, q, k, v, seg)
    out, lse = empty_partial(tuple(qs.shape), partial_dtype(q.dtype), q.device)
    for run in _schedule(plan, qs.shape[-2]):
        qq = _pick(qs, run.q_ranks, run.q_pos)
        kk, vv = (_pick(t, run.kv_ranks, run.kv_pos) for t in (ks, vs))
        q_seg = None if segs is None else _pick(segs, run.q_ranks, run.q_pos, -1)
        k_seg = None if segs is None else _pick(segs, run.kv_ranks, run.kv_pos, -1)
        # Diagonal blocks start at the same position, so offsets 0 give their mask.
        bo, bl = block_partial(
            _fold(qq), _fold(kk), _fold(vv),
            softmax_scale=plan.scale, q_segment_ids=_fold(q_seg), kv_segment_ids=_fold(k_seg),
            backend=plan.backend, cast=False, **_mask_args(plan, run),
        )  # fmt: skip
        o, l_ = _pick(out, run.q_ranks, run.q_pos), _pick(lse, run.q_ranks, run.q_pos, -1)
        merge_fused_(o, l_, bo.reshape(o.shape), bl.reshape(l_.shape))
    return out, lse


def backward(plan, q, k, v, seg, out, lse, dout, dlse):
    """``(dq, dk, dv)`` stacks ``[W, B, H, L, D]`` (partial dtype) for the full-sequence
    ``out`` / ``lse`` and their gradients, by the same schedule as :func:`forward`."""
    qs, ks, vs, segs = _stacks(plan, q, k, v, seg)
    w = plan.world_size

    def stacked(t, dim=-2):
        return torch.stack([shard(t, w, r, layout=plan.layout, dim=dim) for r in range(w)])

    outs, dos, lses = stacked(out), stacked(dout), stacked(lse, -1)
    dls = None if dlse is None else stacked(dlse, -1)
    acc = partial_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (qs, ks, vs))
    for run in _schedule(plan, qs.shape[-2]):
        qp = (run.q_ranks, run.q_pos)
        kp = (run.kv_ranks, run.kv_pos)
        qq, oo, gg = (_pick(t, *qp) for t in (qs, outs, dos))
        ll = _pick(lses, *qp, -1)
        dl = None if dls is None else _pick(dls, *qp, -1)
        kk, vv = (_pick(t, *kp) for t in (ks, vs))
        q_seg = None if segs is None else _pick(segs, *qp, -1)
        k_seg = None if segs is None else _pick(segs, *kp, -1)
        bdq, bdk, bdv = block_attention_backward(
            _fold(qq), _fold(kk), _fold(vv), _fold(oo), _fold(ll), _fold(gg), _fold(dl),
            softmax_scale=plan.scale, q_segment_ids=_fold(q_seg), kv_segment_ids=_fold(k_seg),
            backend=plan.backend, **_mask_args(plan, run),
        )  # fmt: skip
        for grads, part, (ranks, pos) in ((dq, bdq, qp), (dk, bdk, kp), (dv, bdv, kp)):
            view = _pick(grads, ranks, pos)
            view += part.reshape(view.shape).to(acc)
    return dq, dk, dv
