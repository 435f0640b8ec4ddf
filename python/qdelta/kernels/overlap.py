"""Prefill with the expansion overlapping cuBLAS: kernel choice ``"expand-overlap"``.

The plain expansion path writes a tenant's whole dense delta, then multiplies:
the GEMM waits for the whole expansion (14 of 40 us at N = K = 4096, M = 512 on
an H200). Here the work is cut into pieces: every present tenant, and its N
features in OVERLAP_CHUNKS chunks when one plane is used. Each piece is
expanded on the caller's stream, and its GEMM runs on a side stream that waits
for that expansion only. The next piece's expansion (memory bound) then runs
beside the previous pieces' GEMMs (compute bound, and at prefill sizes too few
tiles to fill the card alone). Every dense piece, gathered row set and output
buffer stays referenced until the caller's stream has joined the side streams,
so the caching allocator cannot hand a block to the next piece while a side
stream still reads it. Without side streams (the CPU emulator) the same pieces
run in order on one stream, which is what the tests check.

The result equals the plain expansion path's up to the GEMM's fp32 summation
order, which cuBLAS may choose differently for a narrower N.
"""

from __future__ import annotations

import contextlib

import torch

from qdelta.kernels import cuda as cuda_backend

OVERLAP_CHUNKS = 4  # N chunks per tenant (one plane used)
MIN_CHUNK_FEATURES = 256  # a narrower GEMM piece costs more than its overlap saves


def feature_chunks(n: int, use: int) -> list[tuple[int, int]]:
    """``[start, stop)`` feature ranges of one tenant's pieces (64-aligned starts)."""
    if use != 1 or n < 2 * MIN_CHUNK_FEATURES:
        return [(0, n)]  # several planes share one [P, N, W] stride: not sliceable by N
    pieces = min(OVERLAP_CHUNKS, n // MIN_CHUNK_FEATURES)
    step = (-(-n // pieces) + 63) // 64 * 64
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def run(x, planes, scales, tenant_ids, base, out, use, row_scales, dt) -> None:
    """``out = base + delta`` like the expansion path, expansion and GEMMs overlapped."""
    device = x.device
    k, n = x.shape[1], planes.shape[2]
    if tenant_ids is None:
        groups = [(0, None)]
        rest = None
    else:
        order, counts = cuda_backend._tenant_order(tenant_ids, planes.shape[0])
        groups, start = [], 0
        for t, c in enumerate(counts[: planes.shape[0]]):
            if c:
                groups.append((t, order[start : start + c]))
            start += c
        rest = order[start:]
    streams = cuda_backend.RUNTIME.side_streams(device)
    caller = cuda_backend.RUNTIME.current_stream(device)
    keep: list = []  # every piece's tensors, alive until the join (module docstring)
    gathered = []
    piece = 0
    for t, rows in groups:
        if rows is None:
            xs, bs, ys = x, base, out
        else:
            xs = x.index_select(0, rows)
            bs = None if base is None else base.index_select(0, rows)
            ys = torch.empty(rows.numel(), n, dtype=out.dtype, device=device)
            gathered.append((rows, ys))
        keep += [xs, bs, ys]
        for a, b in feature_chunks(n, use):
            planes_t = planes[t] if (a, b) == (0, n) else planes[t][:1, a:b]
            scales_t = scales[t] if not row_scales or (a, b) == (0, n) else scales[t][:1, a:b]
            dense = cuda_backend._expand(planes_t, scales_t, use, row_scales, dt, x.dtype, k)
            keep.append(dense)
            side = streams[piece % len(streams)] if streams else None
            piece += 1
            with _on(side, caller):
                cuda_backend._dense_rows(xs, dense, None if bs is None else bs[:, a:b], ys[:, a:b])
    for side in streams[:piece]:  # the streams that got a piece
        caller.wait_stream(side)
    for rows, ys in gathered:
        out.index_copy_(0, rows, ys)
    if rest is not None:
        cuda_backend._fill_rest(out, base, tenant_ids, rest)


@contextlib.contextmanager
def _on(side, caller):
    """Run the block on ``side`` after everything queued on ``caller`` so far."""
    if side is None:
        yield
        return
    side.wait_stream(caller)
    with cuda_backend.RUNTIME.stream_context(side):
        yield
