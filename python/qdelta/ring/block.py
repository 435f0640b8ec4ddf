"""Attention of one query block against one key/value block, as an exact partial.

Every backend returns ``(out, lse)`` in the partial dtype (float64 for float64
inputs, float32 otherwise) so blocks can be merged exactly (see merge.py):

- ``out``: ``[B, Hq, Sq, D]``, softmax over this block's keys only, applied to V;
- ``lse``: ``[B, Hq, Sq]``, log-sum-exp of this block's scaled scores; ``-inf``
  (with ``out = 0``) for a row that may see none of this block's keys.

Inputs: ``q`` ``[B, Hq, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` with
``Hq % Hkv == 0`` (GQA/MQA). Query ``i`` may see key ``j`` when
``not causal or q_start + i >= kv_start + j`` (global positions), with a
``window`` when ``(q_start + i) - (kv_start + j) < window`` (a sliding window:
Mistral's, Qwen2's and Gemma's local layers, ``kv_idx > q_idx - window``) and,
with segment ids (``[B, S]`` or ``[S]`` integers), when both lie in the same
segment. ``softcap`` ``c`` turns every scaled score ``s`` into ``c * tanh(s / c)``
before the softmax (Gemma2's ``attn_logit_softcapping``).

Backends: ``math`` (torch, the reference), ``sdpa`` (torch's fused kernels that
return the log-sum-exp; falls back to ``math`` with a RingBackendWarning where
they cannot run a case), ``cuda`` (qdelta/_cuda/attention_block.cu through cupy),
``auto`` (``sdpa``; the ``cuda`` kernel runs only on request).

Empty blocks (no query rows, no keys, no heads or an empty batch) never
reach a kernel: every backend returns ``out = 0``, ``lse = -inf`` of the right
shapes (torch's fused CPU kernels die with SIGFPE on zero-size inputs).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import Counter
from typing import Literal

import numpy as np
import torch

from qdelta.checks import as_int
from qdelta.errors import DTypeError, ShapeError
from qdelta.ring.errors import RingBackendWarning, RingError

Backend = Literal["auto", "math", "sdpa", "cuda"]
BACKENDS = ("auto", "math", "sdpa", "cuda", "cuda_v1")

# How often each forward path ran (cheap; tests assert the fast path is taken):
# "math", "flash", "efficient", "efficient_masked", "cpu_flash", "cpu_flash_masked", "cuda".
PATH_COUNTS: Counter = Counter()


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    q_start: int = 0,
    kv_start: int = 0,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    backend: Backend = "math",
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` against one key/value block; see the module docstring.

    Differentiable in ``out`` and ``lse`` on every backend. ``math`` is plain torch
    autograd (double backward too); the other backends run their fused forward and,
    when q, k or v require grad, a backward by :func:`block_attention_backward` on
    the same backend (exact for both outputs: the fused CPU backward without an lse
    gradient, the math backward with one). torch's fused kernels give their lse no
    gradient, so without this the lse term of a loss would be silently dropped.
    """
    kw = dict(
        softmax_scale=softmax_scale, causal=causal, q_start=q_start, kv_start=kv_start,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, backend=backend,
        window=window, softcap=softcap,
    )  # fmt: skip
    grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)
    )
    if grad:
        check_inputs(
            q, k, v, softmax_scale, q_segment_ids, kv_segment_ids, window=window, softcap=softcap
        )
        hidden = effective_window(window, q.shape[2], k.shape[2], q_start, kv_start) == 0
        if backend != "math" or _is_empty(q, k) or hidden:  # (zeros no graph would reach)
            return _BlockAttention.apply(q, k, v, kw)
    return block_partial(q, k, v, **kw, cast=True)


class _BlockAttention(torch.autograd.Function):
    """block_attention on a fused backend with a backward through out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, kw):
        out, lse = block_partial(q, k, v, **kw, cast=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw = kw
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = block_attention_backward(q, k, v, out, lse, dout, dlse, **ctx.kw)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _is_empty(q, k) -> bool:
    return q.numel() == 0 or k.numel() == 0


def _empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of a block with no rows, heads or keys: ``out = 0``, ``lse = -inf``."""
    acc = partial_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    return out, torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)


def block_partial(
    q,
    k,
    v,
    *,
    softmax_scale,
    causal,
    q_start,
    kv_start,
    q_segment_ids,
    kv_segment_ids,
    backend: Backend,
    cast: bool,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_attention`; with ``cast=False`` ``out`` may stay in the kernel's
    dtype (bf16/fp16 from flash attention) for :func:`merge_fused_` to read directly."""  # fmt: skip
    scale = check_inputs(
        q, k, v, softmax_scale, q_segment_ids, kv_segment_ids,
        causal=causal, q_start=q_start, kv_start=kv_start, backend=backend,
        window=window, softcap=softcap,
    )  # fmt: skip
    window = effective_window(window, q.shape[2], k.shape[2], q_start, kv_start)
    if _is_empty(q, k) or window == 0:
        return _empty_result(q)
    if backend == "auto":
        backend = _auto_backend(q, softcap)
    tiles = None if backend in ("cuda", "cuda_v1") else window_tiles(
        q.shape[2], k.shape[2], causal, q_start, kv_start, window
    )  # fmt: skip
    if tiles is not None:  # (the CUDA kernels skip out-of-window tiles themselves)
        return _tiled_forward(
            tiles, q, k, v, scale, causal, q_start, kv_start, q_segment_ids, kv_segment_ids,
            backend, window, softcap,
        )  # fmt: skip
    args = (q, k, v, scale, causal, q_start, kv_start, q_segment_ids, kv_segment_ids)
    extra = dict(window=window, softcap=softcap)
    if backend == "math":
        return _math_forward(*args, **extra)
    if backend == "sdpa":
        return _sdpa_forward(*args, cast=cast, **extra)
    if backend in ("cuda", "cuda_v1"):
        from qdelta.ring import cuda_block

        PATH_COUNTS["cuda"] += 1
        return cuda_block.attention_block(*args, kernel=backend, **extra)
    raise RingError(f"block backend: expected one of {BACKENDS}, found {backend!r}")


# Query rows per tile of a windowed block on the torch backends: each tile attends
# only the keys its window reaches (rows + window - 1 at most), so a block's work
# follows the window instead of Sq * Sk. At least WINDOW_TILE_MIN rows, so small
# windows do not turn into many tiny kernel calls.
WINDOW_TILE_MIN = 128


def window_tiles(
    sq: int, sk: int, causal: bool, q_start: int, kv_start: int, window: int | None
) -> list[tuple[slice, slice]] | None:
    """``(query rows, keys they may see)`` per tile of a windowed block, or None when
    tiling would not cut the block's work by a quarter (or there is no window)."""
    if window is None or window <= 0:
        return None
    rows = max(WINDOW_TILE_MIN, window // 2)
    if rows >= sq:
        return None
    tiles, work = [], 0
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        lo = max(0, q_start + r0 - window + 1 - kv_start)
        hi = min(sk, q_start + r1 - kv_start) if causal else sk
        if lo < hi:
            tiles.append((slice(r0, r1), slice(lo, hi)))
            work += (r1 - r0) * (hi - lo)
    return tiles if work <= 0.75 * sq * sk else None


def _tiled_forward(
    tiles, q, k, v, scale, causal, q_start, kv_start, qseg, kseg, backend, window, softcap
):
    """block_partial tile by tile (see window_tiles); rows no tile covers see no key."""
    out, lse = _empty_result(q)
    for qs, ks in tiles:
        o, l_ = block_partial(
            q[:, :, qs], k[:, :, ks], v[:, :, ks], softmax_scale=scale, causal=causal,
            q_start=q_start + qs.start, kv_start=kv_start + ks.start,
            q_segment_ids=None if qseg is None else qseg[..., qs],
            kv_segment_ids=None if kseg is None else kseg[..., ks],
            backend=backend, cast=True, window=window, softcap=softcap,
        )  # fmt: skip
        out[:, :, qs] = o
        lse[:, :, qs] = l_
    return out, lse


def effective_window(window: int | None, sq: int, sk: int, q_start: int, kv_start: int):
    """``window`` as it acts on this block: None when it hides no (query, key) pair,
    0 when it hides every pair (the block is skipped), else ``window``."""
    if window is None:
        return None
    if q_start + sq - 1 - kv_start < window:  # even the farthest pair is inside
        return None
    if q_start - (kv_start + sk - 1) >= window:  # even the nearest pair is outside
        return 0
    return window


def check_window(window, softcap, what: str = "block attention") -> None:
    """``window``: None or an int in [1, 2**63); ``softcap``: None or a finite number > 0."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise DTypeError(
                f"{what}: expected window as None or an int, found {type(window).__name__}"
            )
        if not 1 <= window < 2**63:  # the ring compares windows across ranks as int64
            raise ShapeError(
                f"{what}: expected window >= 1 and < 2**63 (None for no window), found {window}"
            )
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise DTypeError(
                f"{what}: expected softcap as None or a number, found {type(softcap).__name__}"
            )
        if not math.isfinite(softcap) or softcap <= 0:
            raise ShapeError(f"{what}: expected a finite softcap > 0, found {softcap}")


def check_inputs(
    q, k, v, softmax_scale, q_segment_ids, kv_segment_ids,
    *, causal=False, q_start=0, kv_start=0, backend="math", window=None, softcap=None,
) -> float:  # fmt: skip
    """Validate shapes, dtypes, devices and arguments (metadata only); return the
    softmax scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(
                f"block attention: expected {name} as a torch.Tensor, found {type(t).__name__}"
            )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(
            "block attention: expected q, k, v as [batch, heads, seq, head_dim], found "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ShapeError(
            "block attention: expected k and v of one shape sharing batch and head_dim with q, "
            f"found q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[3] == 0 or (k.shape[1] == 0 and q.shape[1] != 0):
        # (No heads at all is an empty block; query heads need a key/value head.)
        raise ShapeError(
            "block attention: expected head_dim >= 1 and at least one key/value head for "
            f"the query heads, found q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if k.shape[1] != 0 and q.shape[1] % k.shape[1] != 0:
        raise ShapeError(
            f"block attention: expected query heads ({q.shape[1]}) to be a multiple of "
            f"key/value heads ({k.shape[1]})"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise DTypeError(
            f"block attention: expected q, k, v of one floating dtype, found "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        # A fused kernel would read k/v through pointers of the wrong device.
        raise DTypeError(
            f"block attention: expected q, k, v on one device, found {q.device}, "
            f"{k.device}, {v.device}"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ShapeError(
            "block attention: expected both q_segment_ids and kv_segment_ids, or neither"
        )
    for name, seg, length in (
        ("q_segment_ids", q_segment_ids, q.shape[2]),
        ("kv_segment_ids", kv_segment_ids, k.shape[2]),
    ):
        if seg is None:
            continue
        if not isinstance(seg, torch.Tensor):
            raise DTypeError(
                f"block attention: expected {name} as a torch.Tensor, found {type(seg).__name__}"
            )
        if seg.is_floating_point() or seg.is_complex() or seg.dtype == torch.bool:
            raise DTypeError(f"block attention: expected integer {name}, found {seg.dtype}")
        if (
            seg.dim() not in (1, 2)
            or seg.shape[-1] != length
            or (seg.dim() == 2 and seg.shape[0] not in (1, q.shape[0]))
        ):
            raise ShapeError(
                f"block attention: expected {name} of shape [{length}] or [batch, {length}] "
                f"with batch {q.shape[0]} (q's) or 1, found {tuple(seg.shape)}"
            )
        if seg.device != q.device and seg.device.type != "cpu":
            raise DTypeError(
                f"block attention: expected {name} on {q.device} (like q) or the CPU, "
                f"found {seg.device}"
            )
    if not isinstance(causal, bool | np.bool_) and not (
        isinstance(causal, int) and causal in (0, 1)
    ):
        raise DTypeError(f"block attention: expected causal as a bool, found {causal!r}")
    as_int("block attention: q_start", q_start)
    as_int("block attention: kv_start", kv_start)
    check_window(window, softcap)
    if backend not in BACKENDS:
        raise RingError(f"block backend: expected one of {BACKENDS}, found {backend!r}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise DTypeError(
            "block attention: expected softmax_scale as a number or None, found "
            f"{type(softmax_scale).__name__}"
        )
    if not math.isfinite(softmax_scale):
        # Every backend would turn it into NaN outputs (or, in a kernel, into something
        # else): refuse it here, once, for all of them.
        raise ShapeError(f"block attention: expected a finite softmax_scale, found {softmax_scale}")
    return float(softmax_scale)


def _check_grad_inputs(q, out, lse, dout, dlse) -> None:
    """The backward's out/dout ``[B, Hq, Sq, D]`` and lse/dlse ``[B, Hq, Sq]``: a fused
    kernel reads them by q's shape, so a wrong one would be read out of bounds."""
    for name, t, shape in (
        ("out", out, q.shape),
        ("lse", lse, q.shape[:-1]),
        ("dout", dout, q.shape),
        ("dlse", dlse, q.shape[:-1]),
    ):
        if t is None and name == "dlse":
            continue
        if not isinstance(t, torch.Tensor):
            raise DTypeError(
                f"block attention backward: expected {name} as a torch.Tensor, found "
                f"{type(t).__name__}"
            )
        if t.shape != shape:
            raise ShapeError(
                f"block attention backward: expected {name} of shape {tuple(shape)} "
                f"(q {tuple(q.shape)}), found {tuple(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise DTypeError(
                f"block attention backward: expected a floating {name}, found {t.dtype}"
            )
        if t.device != q.device:
            raise DTypeError(
                f"block attention backward: expected {name} on {q.device} (like q), "
                f"found {t.device}"
            )


def allowed_mask(
    sq: int,
    sk: int,
    causal: bool,
    q_start: int,
    kv_start: int,
    q_segment_ids: torch.Tensor | None,
    kv_segment_ids: torch.Tensor | None,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor | None:
    """Boolean ``[B or 1, 1, Sq, Sk]`` of visible (query, key) pairs; None when all are."""
    mask = None
    causal = causal and q_start < kv_start + sk - 1
    if causal or window is not None:
        qpos = torch.arange(q_start, q_start + sq, device=device)
        kpos = torch.arange(kv_start, kv_start + sk, device=device)
        dist = qpos[:, None] - kpos[None, :]
        if causal:
            mask = (dist >= 0)[None, None]
        if window is not None:
            near = (dist < window)[None, None]
            mask = near if mask is None else mask & near
    if q_segment_ids is not None:
        qs = q_segment_ids.to(device).reshape(-1, sq)
        ks = kv_segment_ids.to(device).reshape(-1, sk)
        same = (qs[:, :, None] == ks[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _gqa_view(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, Hq, S, D]`` as ``[B, Hkv, G, S, D]``: query heads grouped by their kv head."""
    b, hq, s, d = q.shape
    return q.reshape(b, hkv, hq // hkv, s, d)


def _scores(q, k, scale, mask, softcap=None):
    """Masked scaled (and soft-capped) scores ``[B, Hkv, G, Sq, Sk]`` in the partial dtype."""
    acc = partial_dtype(q.dtype)
    qg = _gqa_view(q.to(acc), k.shape[1])
    s = torch.matmul(qg, k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap  # (not in place: autograd keeps tanh's output)
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return s


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _math_forward(q, k, v, scale, causal, q_start, kv_start, qseg, kseg, window=None, softcap=None):
    PATH_COUNTS["math"] += 1
    b, hq, sq, d = q.shape
    mask = allowed_mask(sq, k.shape[2], causal, q_start, kv_start, qseg, kseg, q.device, window)
    s = _scores(q, k, scale, mask, softcap)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite_or_zero(lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))
    return out.reshape(b, hq, sq, d), lse.reshape(b, hq, sq)


BACKWARD_ROWS = 256  # query rows per tile of the math backward (bounds its temporaries)


def block_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    q_start: int = 0,
    kv_start: int = 0,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    backend: Backend = "math",
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of ``(dq, dk, dv)`` in the partial dtype.

    ``out`` and ``lse`` are the *final* (all blocks merged) values of the query
    rows, ``dout``/``dlse`` their gradients: then ``p = exp(s - lse)`` are the
    true attention weights and the block gradients simply add up.

    Backends: ``math`` (torch, in tiles of BACKWARD_ROWS query rows); ``sdpa`` /
    ``auto`` use torch's fused CPU flash backward where it applies (CPU, no
    ``dlse``, no ``softcap``, every row's final lse finite) and ``math`` otherwise. ``out`` and
    ``dout`` must have q's shape, ``lse`` and ``dlse`` ``[B, Hq, Sq]`` (ShapeError).
    """
    scale = check_inputs(
        q, k, v, softmax_scale, q_segment_ids, kv_segment_ids,
        causal=causal, q_start=q_start, kv_start=kv_start, backend=backend,
        window=window, softcap=softcap,
    )  # fmt: skip
    _check_grad_inputs(q, out, lse, dout, dlse)
    acc = partial_dtype(q.dtype)
    window = effective_window(window, q.shape[2], k.shape[2], q_start, kv_start)
    if _is_empty(q, k) or window == 0:  # nothing to attend: zero gradients, no kernel
        return tuple(torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
    tiles = window_tiles(q.shape[2], k.shape[2], causal, q_start, kv_start, window)
    if tiles is not None:  # as the forward: each query tile against the keys it reaches
        grads = tuple(torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
        for qs, ks in tiles:
            tq, tk, tv = block_attention_backward(
                q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs], lse[:, :, qs],
                dout[:, :, qs], None if dlse is None else dlse[:, :, qs],
                softmax_scale=scale, causal=causal, q_start=q_start + qs.start,
                kv_start=kv_start + ks.start,
                q_segment_ids=None if q_segment_ids is None else q_segment_ids[..., qs],
                kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids[..., ks],
                backend=backend, window=window, softcap=softcap,
            )  # fmt: skip
            grads[0][:, :, qs] = tq
            grads[1][:, :, ks] += tk
            grads[2][:, :, ks] += tv
        return grads
    args = (q, k, v, out, lse, dout, dlse, scale, causal, q_start, kv_start)
    fused = backend != "math" and q.device.type == "cpu" and dlse is None and softcap is None
    if fused and torch.isfinite(lse).all():
        return _sdpa_cpu_backward(*args, q_segment_ids, kv_segment_ids, window)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for r0 in range(0, q.shape[2], BACKWARD_ROWS):
        rows = slice(r0, r0 + BACKWARD_ROWS)
        tile = [t[:, :, rows] if t is not None else None for t in (q, out, lse, dout, dlse)]
        qseg = None if q_segment_ids is None else q_segment_ids[..., rows]
        tq, tk, tv = _math_backward_tile(
            tile[0], k, v, tile[1], tile[2], tile[3], tile[4], scale, causal,
            q_start + r0, kv_start, qseg, kv_segment_ids, window, softcap,
        )  # fmt: skip
        dq[:, :, rows] = tq
        dk += tk
        dv += tv
    return dq, dk, dv


def _math_backward_tile(
    q, k, v, out, lse, dout, dlse, scale, causal, q_start, kv_start, qseg, kseg,
    window=None, softcap=None,
):  # fmt: skip
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    acc = partial_dtype(q.dtype)
    mask = allowed_mask(sq, sk, causal, q_start, kv_start, qseg, kseg, q.device, window)
    p = _scores(q, k, scale, mask, softcap)  # becomes the attention weights in place
    # d(c * tanh(s / c)) / ds = 1 - (capped / c)^2, read off the capped scores
    # before they turn into weights (masked ones give 0: their weight is 0 anyway).
    cap_slope = None
    if softcap is not None:
        capped = torch.where(torch.isneginf(p), 0.0, p) / softcap
        cap_slope = 1.0 - capped * capped
        del capped
    p.sub_(_finite_or_zero(_gqa_view(lse.to(acc).unsqueeze(-1), hkv))).exp_()
    do = _gqa_view(dout.to(acc), hkv)
    delta = (do * _gqa_view(out.to(acc), hkv)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - _gqa_view(dlse.to(acc).unsqueeze(-1), hkv)
    vg = v.to(acc).unsqueeze(2)
    kg = k.to(acc).unsqueeze(2)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    ds = torch.matmul(do, vg.transpose(-1, -2)).sub_(delta).mul_(p)
    del p
    if cap_slope is not None:
        ds.mul_(cap_slope)
    dq = torch.matmul(ds, kg).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), _gqa_view(q.to(acc), hkv)).sum(2).mul_(scale)
    return dq.reshape(b, hq, sq, d), dk, dv


def _rows_dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is dense (the CPU flash backward reads strided
    views: a ring block's rows are a slice of the shard, copying them cost a
    block-sized buffer per tensor and pair), else a contiguous copy."""
    return t if t.stride(-1) == 1 and all(s > 0 for s in t.stride()) else t.contiguous()


def _sdpa_cpu_backward(
    q, k, v, out, lse, dout, dlse, scale, causal, q_start, kv_start, qseg, kseg, window=None
):
    """torch's fused CPU flash backward, fed the final out/lse (exact per block)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    acc = partial_dtype(q.dtype)
    diagonal = _is_diagonal(causal, q_start, kv_start, sq, sk, qseg, window, scale)
    mask = (
        None
        if diagonal
        else allowed_mask(sq, sk, causal, q_start, kv_start, qseg, kseg, q.device, window)
    )
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _rows_dense(dout.to(q.dtype)),
        _rows_dense(q),
        _rows_dense(_expand_kv(k, hq)),
        _rows_dense(_expand_kv(v, hq)),
        _rows_dense(out.to(q.dtype)),
        _rows_dense(lse.to(lse_dtype)),
        0.0,
        diagonal,
        attn_mask=bias,
        scale=scale,
    )
    if hq != hkv:  # GQA: the query heads of a group share one K/V head's gradient
        dk = dk.to(acc).reshape(b, hkv, hq // hkv, sk, d).sum(2)
        dv = dv.to(acc).reshape(b, hkv, hq // hkv, sk, d).sum(2)
    return dq.to(acc), dk.to(acc), dv.to(acc)


# ---------------------------------------------------------------- sdpa backend

_warned: set[str] = set()


def _fallback(reason: str, args):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"ring block backend 'sdpa' cannot run this case ({reason}); using 'math'",
            RingBackendWarning,
            stacklevel=3,
        )
    return _math_forward(*args)


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1) if x.shape[1] != hq else x


def _is_diagonal(causal, q_start, kv_start, sq, sk, qseg, window, scale) -> bool:
    """Whether the fused kernels' own causal mask (``is_causal``) is this block's mask.

    Not for a scale <= 0: torch's CPU flash kernel returns NaN rows with
    ``is_causal`` and such a scale (an explicit mask is exact)."""
    return (
        causal
        and q_start == kv_start
        and sq == sk
        and qseg is None
        and window is None
        and (scale is None or scale > 0)
    )


def _sdpa_forward(
    q, k, v, scale, causal, q_start, kv_start, qseg, kseg, cast=True, window=None, softcap=None
):
    args = (q, k, v, scale, causal, q_start, kv_start, qseg, kseg, window, softcap)
    if softcap is not None:  # torch's fused kernels do not soft-cap
        return _fallback("softcap", args)
    sq, sk = q.shape[2], k.shape[2]
    diagonal = _is_diagonal(causal, q_start, kv_start, sq, sk, qseg, window, scale)
    mask = (
        None
        if diagonal
        else allowed_mask(sq, sk, causal, q_start, kv_start, qseg, kseg, q.device, window)
    )
    # The fused kernels read rows as dense: a strided last dim (x.mT.contiguous().mT)
    # gives garbage on CPU, so copy such inputs (ring slices of a shard stay views).
    q = _rows_dense(q)
    k, v = _rows_dense(_expand_kv(k, q.shape[1])), _rows_dense(_expand_kv(v, q.shape[1]))
    acc = partial_dtype(q.dtype)
    try:
        if q.device.type == "cpu":
            bias = None
            if mask is not None:
                bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill(~mask, float("-inf"))
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, is_causal=diagonal, attn_mask=bias, scale=scale
            )
            PATH_COUNTS["cpu_flash" if bias is None else "cpu_flash_masked"] += 1
        elif mask is None and q.dtype in (torch.float16, torch.bfloat16):
            # Flash returns lse as fp32 [B, H, Sq] (natural log, unpadded).
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, diagonal, False, scale=scale
            )
            out, lse = res[0], res[1]
            PATH_COUNTS["flash"] += 1
        else:
            bias = None
            if mask is not None:
                # The kernel wants the bias rows 16-element aligned: pad, then slice.
                padded = (sk + 15) // 16 * 16
                full = torch.zeros(
                    q.shape[0], q.shape[1], sq, padded, dtype=q.dtype, device=q.device
                )
                bias = full[..., :sk]
                bias.masked_fill_(~mask.expand(q.shape[0], q.shape[1], sq, sk), float("-inf"))
            # Its lse is [B, H, ceil(Sq / 32) * 32]: drop the padding.
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, 0.0, diagonal, scale=scale
            )[:2]
            lse = lse[..., :sq]
            PATH_COUNTS["efficient" if bias is None else "efficient_masked"] += 1
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        return _fallback(f"{q.device.type} {q.dtype}: {str(exc).splitlines()[0][:120]}", args)
    lse = lse.to(acc)
    if cast or mask is not None:
        out = out.to(acc)
    if mask is not None:
        seen = mask.any(-1).expand_as(lse)
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen.unsqueeze(-1), 0.0)
    return out, lse


def _auto_backend(q: torch.Tensor, softcap: float | None = None) -> str:
    # The fused torch kernels (flash attention on CUDA) are the fastest block
    # backend today; the cuda kernel runs on request. They do not soft-cap:
    # then the cuda kernel where it runs the case (it caps in the kernel), else
    # the math backend, without the fallback warning (it is the plan).
    if softcap is None:
        return "sdpa"
    return "cuda" if _cuda_kernel_runs(q) else "math"


def _cuda_kernel_runs(q: torch.Tensor) -> bool:
    """Whether the cuda block kernel takes ``q``: fp16/bf16, head dim 64 or 128, on
    the kernel runtime's device (cupy and CUDA, or the emulator)."""
    from qdelta.kernels import cuda as kernels_cuda
    from qdelta.ring import cuda_block

    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in cuda_block.HEAD_DIMS:
        return False
    runtime = kernels_cuda.RUNTIME
    if not runtime.emulated and (q.device.type != "cuda" or not cuda_block.available()):
        return False
    return runtime.on_device(q)
