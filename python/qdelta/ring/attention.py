"""Ring attention: exact attention over a sequence split across a ring of ranks.

Each rank holds a shard of q, k, v (layout.py). Its K/V block travels around the
ring (comm.py) while the rank computes its queries against the block it holds
(block.py), merging the partials exactly (merge.py). The backward pass sends
K/V around again, with each block's dK/dV accumulator (fp32, or fp64 for
float64 inputs) travelling beside it and arriving home after a full turn.

``virtual_ring_attention`` runs the same schedule for ``W`` simulated ranks in
one process: for debugging, and for benchmarking the blockwise path on one GPU.

With a sliding ``window`` (causal only) a query sees the ``window`` latest keys up
to itself: block pairs wholly outside it are skipped, and the ring turns only as
many steps as some rank still finds keys in reach (``_Plan.steps``); the dK/dV
accumulators then go home in one hop from wherever the turn ended.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from qdelta.errors import ShapeError
from qdelta.ring import virtual_batched
from qdelta.ring.block import (
    BACKENDS,
    Backend,
    block_attention_backward,
    block_partial,
    check_inputs,
    check_window,
    partial_dtype,
)
from qdelta.ring.comm import RingComm, all_gather_ints, check_timeout
from qdelta.ring.errors import RingError
from qdelta.ring.layout import (
    LAYOUTS,
    Chunk,
    Layout,
    as_int,
    chunks_of,
    rank_chunks,
    seq_len_from_local,
    shard,
    unshard,
)
from qdelta.ring.merge import empty_partial, merge_, merge_fused_

KV_TAG, GRAD_TAG, HOME_TAG = 11, 12, 13


@dataclass(frozen=True)
class _Plan:
    """What every rank must agree on for one call."""

    seq_len: int
    world_size: int
    layout: str
    causal: bool
    scale: float
    backend: str
    window: int | None = None
    softcap: float | None = None

    def chunks(self, rank: int) -> tuple[Chunk, ...]:
        return chunks_of(self.seq_len, self.world_size, rank, self.layout)

    def length(self, rank: int) -> int:
        return sum(c.length for c in self.chunks(rank))

    def steps(self) -> int:
        """Ring steps that compute anything: one more than the last step at which
        some rank sees a key of the block it holds (every step without a window)."""
        return _active_steps(self)


@functools.lru_cache(maxsize=256)
def _active_steps(plan: _Plan) -> int:
    w = plan.world_size
    if plan.window is None:
        return w
    last = 0
    for rank in range(w):
        for step in range(last + 1, w):
            if _visible_pairs(plan, rank, (rank - step) % w):
                last = step
    return last + 1


# The fast ring path: fully visible chunk pairs are joined into one kernel call
# (zigzag: one call per ring step instead of four), block outputs stay in the
# kernel's dtype and are merged in place by merge_fused_. False restores one
# call per chunk pair merged by the reference merge_ (the earlier path).
FAST_PATH = True


class _Pair(NamedTuple):
    """A (query slice, key/value slice) of the local shards and their global chunks."""

    qs: slice
    qc: Chunk
    ks: slice
    kc: Chunk
    masked: bool  # False: every query sees every key of the pair (no causal, no window)


def _visible_pairs(plan: _Plan, q_rank: int, kv_rank: int) -> list[_Pair]:
    """Every chunk pair not fully masked by causality or the window."""
    pairs = []
    q_off = 0
    for qc in plan.chunks(q_rank):
        kv_off = 0
        for kc in plan.chunks(kv_rank):
            qs = slice(q_off, q_off + qc.length)
            ks = slice(kv_off, kv_off + kc.length)
            if qc.length and kc.length:
                near = qc.start - (kc.stop - 1)  # the smallest query - key distance
                far = qc.stop - 1 - kc.start  # the largest
                hidden = (plan.causal and far < 0) or (
                    plan.window is not None and near >= plan.window
                )
                whole = (not plan.causal or near >= 0) and (
                    plan.window is None or far < plan.window
                )
                if not hidden:
                    pairs.append(_Pair(qs, qc, ks, kc, not whole))
            kv_off += kc.length
        q_off += qc.length
    return pairs


def _pairs(plan: _Plan, q_rank: int, kv_rank: int) -> list[_Pair]:
    """Every chunk pair not fully masked; with FAST_PATH, fully visible ones coalesced."""
    pairs = _visible_pairs(plan, q_rank, kv_rank)
    return coalesce_pairs(pairs) if FAST_PATH else pairs


def coalesce_pairs(pairs: list[_Pair]) -> list[_Pair]:
    """Join fully visible pairs that share a query slice and have adjacent local key
    slices (or share a key slice with adjacent query slices) into one pair.

    Without a causal or window mask the global positions of a pair do not matter
    (segment ids are sliced by local position), so the joined chunk keeps the
    first start.
    """
    pairs = list(pairs)
    changed = True
    while changed:
        changed = False
        for i, a in enumerate(pairs):
            for j, b in enumerate(pairs):
                if i == j or a.masked or b.masked:
                    continue
                if a.qs == b.qs and a.ks.stop == b.ks.start:
                    kc = Chunk(a.kc.start, a.kc.length + b.kc.length)
                    joined = _Pair(a.qs, a.qc, slice(a.ks.start, b.ks.stop), kc, False)
                elif a.ks == b.ks and a.qs.stop == b.qs.start:
                    qc = Chunk(a.qc.start, a.qc.length + b.qc.length)
                    joined = _Pair(slice(a.qs.start, b.qs.stop), qc, a.ks, a.kc, False)
                else:
                    continue
                pairs = [p for n, p in enumerate(pairs) if n not in (i, j)] + [joined]
                changed = True
                break
            if changed:
                break
    return pairs


def _seg(seg: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if seg is None else seg[..., sl]


def _accumulate(plan, q_rank, kv_rank, q, qseg, k, v, kseg, out, lse) -> None:
    """Merge q's attention to one rank's K/V block into the partial (out, lse)."""
    fast = FAST_PATH
    for qs, qc, ks, kc, masked in _pairs(plan, q_rank, kv_rank):
        bo, bl = block_partial(
            q[:, :, qs],
            k[:, :, ks],
            v[:, :, ks],
            softmax_scale=plan.scale,
            causal=plan.causal and masked,
            window=plan.window if masked else None,
            softcap=plan.softcap,
            q_start=qc.start,
            kv_start=kc.start,
            q_segment_ids=_seg(qseg, qs),
            kv_segment_ids=_seg(kseg, ks),
            backend=plan.backend,
            cast=not fast,
        )
        (merge_fused_ if fast else merge_)(out[:, :, qs], lse[:, :, qs], bo, bl)


def _accumulate_grad(
    plan, q_rank, kv_rank, q, qseg, k, v, kseg, out, lse, dout, dlse, dq, into=None
):
    """Add this K/V block's share to dq; return the block's (dk, dv).

    ``into``: the block's (dk, dv) accumulators, added to in place and returned.
    Without them they are made lazily: a pair that covers the whole block hands
    its own gradients over (no zeroed block, no copy), which takes two
    block-sized buffers off a rank's peak memory.
    """
    acc = dq.dtype
    dk, dv = (None, None) if into is None else into
    whole = slice(0, k.shape[2])
    for qs, qc, ks, kc, masked in _pairs(plan, q_rank, kv_rank):
        bdq, bdk, bdv = block_attention_backward(
            q[:, :, qs],
            k[:, :, ks],
            v[:, :, ks],
            out[:, :, qs],
            lse[:, :, qs],
            dout[:, :, qs],
            None if dlse is None else dlse[:, :, qs],
            softmax_scale=plan.scale,
            causal=plan.causal and masked,
            window=plan.window if masked else None,
            softcap=plan.softcap,
            q_start=qc.start,
            kv_start=kc.start,
            q_segment_ids=_seg(qseg, qs),
            kv_segment_ids=_seg(kseg, ks),
            backend=plan.backend,
        )
        dq[:, :, qs] += bdq
        if dk is None and ks.indices(k.shape[2]) == whole.indices(k.shape[2]):
            dk, dv = bdk.to(acc).contiguous(), bdv.to(acc).contiguous()
            continue
        if dk is None:
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        dk[:, :, ks] += bdk
        dv[:, :, ks] += bdv
    if dk is None:  # no pair: this block gets nothing from these queries
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    return dk, dv


def _kv_shapes(plan: _Plan, k: torch.Tensor, kseg: torch.Tensor | None, src: int):
    n = plan.length(src)
    shapes = [(*k.shape[:2], n, k.shape[3])] * 2
    if kseg is not None:
        shapes.append((*kseg.shape[:-1], n))
    return shapes


# ------------------------------------------------------------ distributed ring


def _ring_forward(plan, comm, rank, q, k, v, seg):
    out, lse = empty_partial((*q.shape,), partial_dtype(q.dtype), q.device)
    block = [k, v] if seg is None else [k, v, seg]
    src = rank
    steps = plan.steps()
    for step in range(steps):
        last = step == steps - 1
        if not last:
            nxt = (rank - step - 1) % plan.world_size
            what = f"K/V block (forward, step {step + 1} of {steps})"
            incoming = comm.send_recv(block, _kv_shapes(plan, k, seg, nxt), what)
            comm.commit()
        _accumulate(plan, rank, src, q, seg, block[0], block[1], _third(block), out, lse)
        if not last:
            comm.wait()
            block, src = incoming, nxt
    return out, lse


def _ring_backward(plan, kv_comm, grad_comm, home_comm, rank, q, k, v, seg, out, lse, dout, dlse):
    """``home_comm``: the last hop of the dK/dV accumulators when the ring turns fewer
    than ``W`` steps (a window): from the rank that ended the turn straight home."""
    acc = partial_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    block = [k, v] if seg is None else [k, v, seg]
    src = rank
    grad_in = None
    w = plan.world_size
    steps = plan.steps()
    pending = grad_comm
    for step in range(steps):
        last = step == steps - 1
        if not last:
            nxt = (rank - step - 1) % w
            what = f"K/V block (backward, step {step + 1} of {steps})"
            incoming = kv_comm.send_recv(block, _kv_shapes(plan, k, seg, nxt), what)
            kv_comm.commit()
        # This block's accumulator (sent on by the previous rank one step ago) is
        # waited for before computing, and this step adds into it: the pair sent
        # last step is released by the wait and no second pair is made, four
        # block-sized buffers off the peak. The price: the dK/dV transfer is not
        # hidden behind this step's compute (the K/V transfer still is).
        into = None
        if grad_in is not None:
            pending.wait()
            into, grad_in = grad_in, None
        dk = dv = None  # the pair sent last step: free once the transfer is done
        dk, dv = _accumulate_grad(
            plan, rank, src, q, seg, block[0], block[1], _third(block), out, lse, dout, dlse,
            dq, into,
        )  # fmt: skip
        into = None
        if steps > 1:
            # Hand block src's gradient on; receive the one of the block we get next
            # (after the last step: our own block's, home after the turn).
            nxt_grad = (rank - step - 1) % w
            if last:
                pending, nxt_grad = (grad_comm if steps == w else home_comm), rank
            shape = _kv_shapes(plan, k, None, nxt_grad)
            what = f"dK/dV accumulator (backward, step {step + 1} of {steps})"
            grad_in = pending.send_recv([dk, dv], shape, what)
            pending.commit()
        else:  # the turn ends where it starts: every block's gradient is home
            grad_in = (dk, dv)
        if not last:
            kv_comm.wait()
            block, src = incoming, nxt
    pending.wait()
    return dq, grad_in[0], grad_in[1]


def _third(block):
    return block[2] if len(block) > 2 else None


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, plan, group, rank, timeout):
        comm = RingComm(group, tag=KV_TAG, timeout=timeout)
        out, lse = _ring_forward(plan, comm, rank, q, k, v, seg)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.seg, ctx.plan, ctx.group, ctx.rank, ctx.timeout = seg, plan, group, rank, timeout
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # K/V from other ranks arrive without a graph: no double backward
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        kv_comm = RingComm(ctx.group, tag=KV_TAG, timeout=ctx.timeout)
        grad_comm = RingComm(ctx.group, tag=GRAD_TAG, timeout=ctx.timeout)
        # The last hop home goes back over the steps - 1 ranks the block visited.
        home = RingComm(ctx.group, tag=HOME_TAG, timeout=ctx.timeout, offset=1 - ctx.plan.steps())
        dq, dk, dv = _ring_backward(
            ctx.plan, kv_comm, grad_comm, home, ctx.rank, q, k, v, ctx.seg, out, lse, dout, dlse
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    segment_ids: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "contiguous",
    softmax_scale: float | None = None,
    backend: Backend = "auto",
    return_lse: bool = False,
    timeout: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
):
    """Exact attention of this rank's query shard over the whole ring's sequence.

    ``q`` ``[B, Hq, S_local, D]``, ``k``/``v`` ``[B, Hkv, S_local, D]``: this rank's
    shard in ``layout`` (made with :func:`qdelta.ring.shard`); ``segment_ids``: the
    shard's ``[B, S_local]`` or ``[S_local]`` segment ids (tokens attend only within
    their segment). Returns the output shard in q's dtype, and with ``return_lse``
    also the fp32 log-sum-exp ``[B, Hq, S_local]`` (differentiable too).
    ``timeout``: seconds to wait for a peer before raising RingError (None, the
    default: the process group's timeout; else a number > 0, at most 1e9).
    ``window`` (causal only): each query sees the ``window`` latest keys up to
    itself (global positions ``i - j < window``; Mistral's ``sliding_window``);
    the ring turns only as far as some rank still has keys in reach.
    ``softcap`` ``c``: scores become ``c * tanh(s / c)`` (Gemma2); torch's fused
    kernels do not cap, so ``auto`` then runs the cuda block kernel where it takes
    the case (fp16/bf16, head dim 64/128 on a CUDA device) and math elsewhere.

    Before any K/V moves, the ranks exchange one small signature of their inputs
    (local length, batch, heads, head_dim, dtypes, segment ids, causal, layout,
    scale, backend, window, softcap): if they disagree, every rank raises RingError naming the
    ranks and fields that differ; if one rank's own inputs are invalid, it raises
    its error and the others a RingError naming it.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RingError(
            "ring_attention: expected an initialized torch.distributed process group "
            "(use virtual_ring_attention for one process)"
        )
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise RingError("ring_attention: expected this process to be a member of group, it is not")
    # Every rank checks its own inputs, then all exchange one signature of what must
    # agree before any K/V moves: mismatched shards would otherwise abort gloo on one
    # rank and give another garbage. A rank whose inputs are invalid still takes part,
    # so its peers raise at once instead of waiting for it until the timeout.
    try:
        timeout = check_timeout(timeout)
        scale = check_inputs(
            q, k, v, softmax_scale, segment_ids, segment_ids, causal=causal, backend=backend
        )
        window, softcap = _check_window_args(window, softcap, causal, "ring_attention")
        _check_same_len(q, k, segment_ids)
        rank_chunks(0, 1, 0, layout)  # validates the layout name
        signature = _signature(q, k, segment_ids, causal, layout, scale, backend, window, softcap)
        local_error = None
    except Exception as exc:
        signature, local_error = [0] * len(_SIGNATURE), exc
    signatures = all_gather_ints(
        signature, group, timeout=None if local_error else timeout, what="the input signatures"
    )
    if local_error is not None:
        raise local_error
    _check_signatures(signatures, rank)
    lengths = [sig[1] for sig in signatures]
    plan = _Plan(
        seq_len_from_local(lengths, layout), world_size, layout, causal, scale, backend,
        window, softcap,
    )  # fmt: skip
    out, lse = _RingAttention.apply(q, k, v, segment_ids, plan, group, rank, timeout)
    return (out, lse) if return_lse else out


# What each rank's signature holds (one int64 each), in order. "ok" is 0 for a rank
# whose own inputs failed its checks; "local length" may differ (the layout decides).
_SIGNATURE = (
    "ok", "local length", "batch", "query heads", "key/value heads", "head_dim", "dtype",
    "segment_ids", "segment_ids dims", "segment_ids batch", "segment_ids dtype", "causal",
    "layout", "softmax_scale", "backend", "window", "softcap",
)  # fmt: skip
# Every torch dtype, in one order on every rank (same torch build): a dtype's code.
_DTYPES = sorted({t for t in vars(torch).values() if isinstance(t, torch.dtype)}, key=str)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _signature(q, k, seg, causal, layout, scale, backend, window=None, softcap=None) -> list[int]:
    has_seg = seg is not None
    return [
        1, q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], _dtype_code(q.dtype),
        int(has_seg), seg.dim() if has_seg else 0,
        seg.shape[0] if has_seg and seg.dim() == 2 else 0,
        _dtype_code(seg.dtype) if has_seg else -1,
        int(bool(causal)), LAYOUTS.index(layout),
        _float_bits(scale),  # the float's exact bits
        BACKENDS.index("sdpa" if backend == "auto" else backend),  # auto is sdpa
        0 if window is None else window,
        0 if softcap is None else _float_bits(softcap),
    ]  # fmt: skip


def _describe(field: str, value: int) -> str:
    if field in ("dtype", "segment_ids dtype"):
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "an unknown dtype"
    if field == "segment_ids":
        return "given" if value else "none"
    if field == "causal":
        return str(bool(value))
    if field == "layout":
        return repr(LAYOUTS[value])
    if field == "backend":
        return repr(BACKENDS[value])
    if field == "softmax_scale":
        return repr(_bits_float(value))
    if field in ("window", "softcap"):
        return "None" if value == 0 else repr(value if field == "window" else _bits_float(value))
    return str(value)


def _check_window_args(window, softcap, causal, what: str):
    """``(window, softcap)`` checked, as a plain int and float (or None)."""
    check_window(window, softcap, what)
    if window is not None and not causal:
        # A one-sided window without causality is no attention a model uses.
        raise RingError(f"{what}: expected causal=True with a sliding window, found causal=False")
    return (
        None if window is None else int(window),
        None if softcap is None else float(softcap),
    )


def _check_signatures(signatures: list[list[int]], rank: int) -> None:
    """RingError on every rank (all hold every signature) naming each rank whose
    inputs differ from rank 0's, and how; or a rank that rejected its inputs."""
    world_size = len(signatures)
    rejected = [r for r, sig in enumerate(signatures) if sig[0] == 0]
    if rejected:
        raise RingError(
            f"ring rank {rank}/{world_size}: rank(s) {rejected} rejected their inputs (their "
            "own errors say why); no rank ran the ring"
        )
    ref = signatures[0]
    seg = _SIGNATURE.index("segment_ids")
    diffs = [
        f"rank {r} has {field} {_describe(field, sig[i])}, rank 0 has {_describe(field, ref[i])}"
        for r, sig in enumerate(signatures[1:], start=1)
        for i, field in enumerate(_SIGNATURE)
        if field not in ("ok", "local length")
        and sig[i] != ref[i]
        # Segment ids on one rank only: their shape and dtype on the other say nothing.
        and not (field.startswith("segment_ids ") and sig[seg] != ref[seg])
    ]
    if diffs:
        raise RingError(
            f"ring rank {rank}/{world_size}: expected every rank's inputs to agree in shape, "
            f"dtype and arguments, found: {'; '.join(diffs)}"
        )


def _check_same_len(q, k, seg):
    if q.shape[2] != k.shape[2]:
        raise ShapeError(
            f"ring attention: expected q and k/v shards of one length, found {q.shape[2]} and {k.shape[2]}"
        )
    if seg is not None and seg.shape[-1] != q.shape[2]:
        raise ShapeError(
            f"ring attention: expected segment_ids with {q.shape[2]} tokens, found {tuple(seg.shape)}"
        )


# ---------------------------------------------------------------- virtual ring


def _virtual_forward_by_rank(plan, q, k, v, seg):
    """Each simulated rank's partial, rank by rank and step by step (any split)."""
    w = plan.world_size
    qs, ks, vs = ([shard(t, w, r, layout=plan.layout) for r in range(w)] for t in (q, k, v))
    segs = [None if seg is None else shard(seg, w, r, layout=plan.layout, dim=-1) for r in range(w)]
    outs, lses = [], []
    for r in range(w):
        out, lse = empty_partial(tuple(qs[r].shape), partial_dtype(q.dtype), q.device)
        for step in range(plan.steps()):
            src = (r - step) % w
            _accumulate(plan, r, src, qs[r], segs[r], ks[src], vs[src], segs[src], out, lse)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return outs, lses


class _VirtualRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, plan):
        if FAST_PATH and virtual_batched.applies(plan, q.shape[2], q.device):
            # Even splits: every rank's blocks of a step in one call.
            parts, lse_parts = virtual_batched.forward(plan, q, k, v, seg)
            outs, lses = [t.to(q.dtype) for t in parts.unbind(0)], list(lse_parts.unbind(0))
        else:
            outs, lses = _virtual_forward_by_rank(plan, q, k, v, seg)
        out = unshard(outs, layout=plan.layout)
        lse = unshard(lses, layout=plan.layout, dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.seg, ctx.plan = seg, plan
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        w, lay = plan.world_size, plan.layout
        if dout is None:
            dout = torch.zeros_like(out)
        if FAST_PATH and virtual_batched.applies(plan, q.shape[2], q.device):
            grads = virtual_batched.backward(plan, q, k, v, ctx.seg, out, lse, dout, dlse)
            dq, dk, dv = (unshard(list(g.unbind(0)), layout=lay) for g in grads)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None

        def sh(t, dim=-2):
            return [None if t is None else shard(t, w, r, layout=lay, dim=dim) for r in range(w)]

        qs, ks, vs, outs, dos = sh(q), sh(k), sh(v), sh(out), sh(dout)
        segs, lses, dlses = sh(ctx.seg, -1), sh(lse, -1), sh(dlse, -1)
        acc = partial_dtype(q.dtype)
        dqs = [torch.zeros(t.shape, dtype=acc, device=q.device) for t in qs]
        dks = [torch.zeros(t.shape, dtype=acc, device=q.device) for t in ks]
        dvs = [torch.zeros(t.shape, dtype=acc, device=q.device) for t in vs]
        for r in range(w):
            for step in range(plan.steps()):
                src = (r - step) % w
                _accumulate_grad(
                    plan, r, src, qs[r], segs[r], ks[src], vs[src], segs[src],
                    outs[r], lses[r], dos[r], dlses[r], dqs[r], (dks[src], dvs[src]),
                )  # fmt: skip
        dq, dk, dv = (unshard(g, layout=lay) for g in (dqs, dks, dvs))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def virtual_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    world_size: int,
    causal: bool = False,
    segment_ids: torch.Tensor | None = None,
    layout: Layout = "contiguous",
    softmax_scale: float | None = None,
    backend: Backend = "auto",
    return_lse: bool = False,
    window: int | None = None,
    softcap: float | None = None,
):
    """Ring attention for ``world_size`` simulated ranks in one process, on full tensors.

    Same blocks, schedule and merges as :func:`ring_attention`, without communication:
    ``q`` ``[B, Hq, S, D]``, ``k``/``v`` ``[B, Hkv, S, D]``, ``segment_ids`` ``[B, S]`` or ``[S]``.
    """
    scale = check_inputs(
        q, k, v, softmax_scale, segment_ids, segment_ids, causal=causal, backend=backend
    )
    window, softcap = _check_window_args(window, softcap, causal, "virtual ring")
    _check_same_len(q, k, segment_ids)
    world_size = as_int("virtual ring: world_size", world_size)
    if world_size < 1:
        raise RingError(f"virtual ring: expected world_size >= 1, found {world_size}")
    plan = _Plan(q.shape[2], world_size, layout, causal, scale, backend, window, softcap)
    rank_chunks(q.shape[2], world_size, 0, layout)  # validates the layout name
    out, lse = _VirtualRingAttention.apply(q, k, v, segment_ids, plan)
    return (out, lse) if return_lse else out
