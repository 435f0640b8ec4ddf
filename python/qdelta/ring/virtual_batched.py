"""The virtual ring's forward with every simulated rank's block of a step in one call.

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

So a forward is ``2W`` block calls at most instead of ``W * W`` times the
pairs of a step; a launch-bound GPU loop is what this removes.
"""

from __future__ import annotations

import torch

from qdelta.ring.block import block_partial, partial_dtype
from qdelta.ring.layout import shard
from qdelta.ring.merge import empty_partial, merge_fused_


def applies(plan, seq_len: int) -> bool:
    """Whether the sequence splits into equal chunks for this plan's layout."""
    parts = plan.world_size * (2 if plan.layout == "zigzag" else 1)
    return seq_len % parts == 0 and seq_len > 0


def forward(plan, q, k, v, seg) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank partials ``(out [W, B, H, L, D], lse [W, B, H, L])`` of the ring."""
    w = plan.world_size

    def stacked(t, dim=-2):
        return torch.stack([shard(t, w, r, layout=plan.layout, dim=dim) for r in range(w)])

    qs, ks, vs = stacked(q), stacked(k), stacked(v)
    if seg is not None and seg.dim() == 1:
        seg = seg.expand(q.shape[0], -1)
    segs = None if seg is None else stacked(seg, dim=-1)  # [W, B, L]
    out, lse = empty_partial(tuple(qs.shape), partial_dtype(q.dtype), q.device)

    def run(ranks_q, ranks_kv, qsl, ksl, causal):
        """One block call for the ranks ``ranks_q`` (a slice) against the key blocks
        of ``ranks_kv`` (a slice, or ``roll`` = the ring's sources), query and key
        positions ``qsl`` / ``ksl`` of each shard, merged into their partials."""
        kk, vv = ks[ranks_kv], vs[ranks_kv]
        qq = qs[ranks_q][..., qsl, :]
        kk, vv = kk[..., ksl, :], vv[..., ksl, :]
        q_seg = None if segs is None else segs[ranks_q][..., qsl]
        k_seg = None if segs is None else segs[ranks_kv][..., ksl]
        _merge_call(plan, qq, kk, vv, q_seg, k_seg, causal, out[ranks_q][..., qsl, :],
                    lse[ranks_q][..., qsl])  # fmt: skip

    every = slice(None)
    if not plan.causal:
        run(every, every, every, every, False)
        for step in range(1, w):
            # Rank r's source is r - step, wrapping: two contiguous runs of ranks.
            run(slice(step, w), slice(0, w - step), every, every, False)
            run(slice(0, step), slice(w - step, w), every, every, False)
        return out, lse
    if plan.layout == "contiguous":
        run(every, every, every, every, True)
        for step in range(1, w):
            run(slice(step, w), slice(0, w - step), every, every, False)
        return out, lse
    c = qs.shape[-2] // 2
    first, second = slice(0, c), slice(c, 2 * c)
    run(every, every, first, first, True)
    run(every, every, second, second, True)
    run(every, every, second, first, False)
    for step in range(1, w):
        run(slice(step, w), slice(0, w - step), every, first, False)
        run(slice(0, step), slice(w - step, w), second, every, False)
    return out, lse


def _merge_call(plan, q, k, v, q_seg, k_seg, causal, out, lse) -> None:
    """One block call over ``[n, B, ...]`` stacks (ranks folded into the batch) and
    the merge of its result into the ranks' partials ``out`` / ``lse`` (views)."""
    n, b = q.shape[:2]

    def fold(t):
        return None if t is None else t.reshape(n * b, *t.shape[2:])

    # Diagonal blocks start at the same position, so offsets 0 give their mask.
    bo, bl = block_partial(
        fold(q), fold(k), fold(v),
        softmax_scale=plan.scale, causal=causal, q_start=0, kv_start=0,
        q_segment_ids=fold(q_seg), kv_segment_ids=fold(k_seg),
        backend=plan.backend, cast=False,
    )  # fmt: skip
    merge_fused_(out, lse, bo.reshape(out.shape), bl.reshape(lse.shape))
