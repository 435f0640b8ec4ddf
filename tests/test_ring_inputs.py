"""Bad and edge inputs to ring attention: a clear qdelta error naming what was
expected and what was found, never a crash, a hang or silent garbage; strided and
empty inputs give exact results (float64 against torch's SDPA)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from qdelta.errors import DTypeError, ShapeError
from qdelta.ring import (
    RingError,
    block_attention,
    block_attention_backward,
    blockwise_feedforward,
    merge,
    position_ids,
    rank_chunks,
    ring_attention,
    shard,
    unshard,
    virtual_ring_attention,
)
from qdelta.ring.comm import MAX_TIMEOUT, check_timeout
from qdelta.ring.launch import run_ring
from qdelta.ring.merge import empty_partial, merge_, merge_fused_
from ring_reference import block_reference, reference_attention

NEG_INF = float("-inf")


def rnd(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


# Layouts whose last dim is not dense (or whose other strides are unusual): the
# fused CPU kernel read them as dense rows and returned garbage (errors of 1e286).
STRIDED = {
    "transposed-rows": lambda x: x.mT.contiguous().mT,
    "last-dim-step-2": lambda x: torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2],
    "heads-seq-swapped": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
    "expanded-batch": lambda x: x[:1].expand(x.shape[0], *x.shape[1:]),
}


def sdpa_reference(q, k, v, *, causal, q_start, kv_start, scale=None):
    """(out, lse) in float64: out by F.scaled_dot_product_attention, lse by block_reference."""
    hq, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k2, v2 = (t.double().repeat_interleave(hq // hkv, 1) for t in (k, v))
    mask = None
    if causal:
        mask = (torch.arange(sq)[:, None] + q_start) >= (torch.arange(sk)[None, :] + kv_start)
    out = F.scaled_dot_product_attention(q.double(), k2, v2, attn_mask=mask, scale=scale)
    _, lse = block_reference(q, k, v, causal, q_start, kv_start, None, None, scale=scale)
    return out, lse


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("causal,q_start,kv_start", [(False, 0, 0), (True, 4, 4), (True, 9, 2)])
@pytest.mark.parametrize("layout", list(STRIDED))
def test_fused_block_reads_strided_inputs_exactly(layout, causal, q_start, kv_start, backend):
    q, k, v = rnd(2, 4, 9, 16), rnd(2, 2, 9, 16), rnd(2, 2, 9, 16)
    make = STRIDED[layout]
    qs, ks, vs = (make(t) for t in (q, k, v))
    assert torch.equal(qs, make(q))  # same values, other strides
    kw = dict(causal=causal, q_start=q_start, kv_start=kv_start, backend=backend)
    out, lse = block_attention(qs, ks, vs, **kw)
    ref_out, ref_lse = sdpa_reference(qs, ks, vs, causal=causal, q_start=q_start,
                                      kv_start=kv_start)  # fmt: skip
    assert (out - ref_out).abs().max() < 1e-12
    assert (lse - ref_lse).abs().max() < 1e-12
    # and through autograd (the fused backward reads strided views too)
    leaves = [t.clone().requires_grad_() for t in (qs, ks, vs)]
    views = [make(t) for t in leaves]
    got_out, _ = block_attention(*views, **kw)
    g = rnd(*got_out.shape)
    got = torch.autograd.grad((got_out * g).sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (qs, ks, vs)]
    want_out, _ = sdpa_reference(*(make(t) for t in ref_leaves), causal=causal,
                                 q_start=q_start, kv_start=kv_start)  # fmt: skip
    want = torch.autograd.grad((want_out * g).sum(), ref_leaves)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() < 1e-10


# ------------------------------------------------------------------ empty inputs

EMPTY_SCRIPT = textwrap.dedent(
    """
    import torch
    from qdelta.ring import block_attention, block_attention_backward, virtual_ring_attention

    def check_partial(out, lse, q):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        assert out.shape == q.shape and lse.shape == q.shape[:-1], (out.shape, lse.shape)
        assert out.dtype == acc and lse.dtype == acc, (out.dtype, lse.dtype)
        assert (out == 0).all() and lse.isneginf().all()

    shapes = [  # (q, k/v): no query rows, no keys, no query heads, an empty batch
        ((1, 2, 0, 8), (1, 2, 5, 8)),
        ((1, 2, 5, 8), (1, 2, 0, 8)),
        ((1, 0, 5, 8), (1, 2, 5, 8)),
        ((0, 2, 5, 8), (0, 2, 5, 8)),
        ((2, 0, 0, 8), (2, 1, 0, 8)),
        ((1, 0, 5, 8), (1, 0, 5, 8)),  # no heads at all
    ]
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for backend in ("sdpa", "auto", "math"):
            for qshape, kshape in shapes:
                for causal in (False, True):
                    q, k, v = (torch.randn(s).to(dtype) for s in (qshape, kshape, kshape))
                    out, lse = block_attention(q, k, v, causal=causal, backend=backend)
                    check_partial(out, lse, q)
                    grads = block_attention_backward(
                        q, k, v, out, lse, out, lse, causal=causal, backend=backend
                    )
                    grads += block_attention_backward(
                        q, k, v, out, lse, out, causal=causal, backend=backend
                    )
                    for g, t in zip(grads, (q, k, v) * 2):
                        assert g.shape == t.shape and (g == 0).all()
                    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                    out, lse = block_attention(*leaves, causal=causal, backend=backend)
                    loss = out.sum() + torch.where(lse.isneginf(), 0.0, lse).sum()
                    for g, t in zip(torch.autograd.grad(loss, leaves), leaves):
                        assert g.shape == t.shape and (g == 0).all()
    for shape in ((1, 0, 12, 8), (0, 2, 12, 8), (1, 2, 0, 8)):
        for layout in ("contiguous", "zigzag"):
            for backend in ("sdpa", "math"):
                q = torch.randn(shape, dtype=torch.float64, requires_grad=True)
                out, lse = virtual_ring_attention(
                    q, q, q, world_size=2, causal=True, layout=layout, backend=backend,
                    return_lse=True,
                )
                assert out.shape == q.shape and lse.shape == q.shape[:-1]
                (g,) = torch.autograd.grad(out.sum(), q)
                assert g.shape == q.shape
    print("empty inputs ok")
    """
)


@pytest.mark.timeout(300)
def test_empty_blocks_never_reach_a_kernel():
    """Zero-size inputs to the fused CPU kernel killed the process (SIGFPE): run
    every empty case in a child so a crash is a failure, not a dead test run."""
    res = subprocess.run(
        [sys.executable, "-c", EMPTY_SCRIPT], capture_output=True, text=True, timeout=280
    )
    assert res.returncode == 0 and "empty inputs ok" in res.stdout, (
        f"exit code {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    )


# ------------------------------------------------------------ block input checks

Q = rnd(1, 2, 4, 8)


def _bad_block_calls():
    seg = torch.zeros(4, dtype=torch.int64)
    return [
        ("kv heads 0", lambda be, Q: block_attention(Q, Q[:, :0], Q[:, :0], backend=be),
         ShapeError, "at least one key/value head"),
        ("head_dim 0", lambda be, Q: block_attention(*(Q[..., :0],) * 3, backend=be), ShapeError,
         "expected head_dim >= 1"),
        ("scale str", lambda be, Q: block_attention(Q, Q, Q, softmax_scale="0.5", backend=be),
         DTypeError, "softmax_scale as a number"),
        ("scale bool", lambda be, Q: block_attention(Q, Q, Q, softmax_scale=True, backend=be),
         DTypeError, "softmax_scale"),
        ("0-d segment ids", lambda be, Q: block_attention(
            Q, Q, Q, q_segment_ids=torch.tensor(1), kv_segment_ids=torch.tensor(1), backend=be),
         ShapeError, r"q_segment_ids of shape \[4\]"),
        ("segment batch 3 for batch 1", lambda be, Q: block_attention(
            Q, Q, Q, q_segment_ids=seg.expand(3, 4), kv_segment_ids=seg.expand(3, 4), backend=be),
         ShapeError, r"found \(3, 4\)"),
        ("segment ids a list", lambda be, Q: block_attention(
            Q, Q, Q, q_segment_ids=[0, 0, 0, 0], kv_segment_ids=seg, backend=be),
         DTypeError, "q_segment_ids"),
        ("q_start str", lambda be, Q: block_attention(Q, Q, Q, causal=True, q_start="1", backend=be),
         DTypeError, "q_start: expected an int"),
        ("kv_start float", lambda be, Q: block_attention(
            Q, Q, Q, causal=True, kv_start=1.0, backend=be), DTypeError, "kv_start"),
        ("causal str", lambda be, Q: block_attention(Q, Q, Q, causal="yes", backend=be), DTypeError,
         "causal"),
        ("q a list", lambda be, Q: block_attention([1.0], Q, Q, backend=be), DTypeError,
         "q as a torch.Tensor"),
        ("v None", lambda be, Q: block_attention(Q, Q, None, backend=be), DTypeError,
         "v as a torch.Tensor"),
        ("k/v on meta", lambda be, Q: block_attention(Q, Q.to("meta"), Q.to("meta"), backend=be),
         DTypeError, "one device"),
        ("segment ids float", lambda be, Q: block_attention(
            Q, Q, Q, q_segment_ids=seg.float(), kv_segment_ids=seg, backend=be),
         DTypeError, "expected integer q_segment_ids, found torch.float32"),
        ("segment ids bool", lambda be, Q: block_attention(
            Q, Q, Q, q_segment_ids=seg, kv_segment_ids=seg.bool(), backend=be),
         DTypeError, "expected integer kv_segment_ids, found torch.bool"),
        ("segments on meta", lambda be, Q: block_attention(
            Q, Q, Q, q_segment_ids=seg.to("meta"), kv_segment_ids=seg, backend=be),
         DTypeError, "meta"),
        ("window 0", lambda be, Q: block_attention(Q, Q, Q, causal=True, window=0, backend=be),
         ShapeError, "window >= 1"),
        ("window float", lambda be, Q: block_attention(Q, Q, Q, window=2.0, backend=be),
         DTypeError, "window as None or an int"),
        ("window bool", lambda be, Q: block_attention(Q, Q, Q, window=True, backend=be),
         DTypeError, "window"),
        ("softcap 0", lambda be, Q: block_attention(Q, Q, Q, softcap=0.0, backend=be),
         ShapeError, "finite softcap > 0"),
        ("softcap inf", lambda be, Q: block_attention(Q, Q, Q, softcap=float("inf"), backend=be),
         ShapeError, "softcap"),
        ("softcap str", lambda be, Q: block_attention(Q, Q, Q, softcap="30", backend=be),
         DTypeError, "softcap as None or a number"),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@pytest.mark.parametrize("case", _bad_block_calls(), ids=lambda c: c[0])
def test_block_attention_rejects_bad_inputs_clearly(case, backend):
    _, call, error, match = case
    with pytest.raises(error, match=match):
        call(backend, Q)
    with pytest.raises(error, match=match):  # the autograd path of the fused backends
        call(backend, Q.clone().requires_grad_())


def test_numpy_ints_and_floats_are_accepted_as_arguments():
    q = rnd(1, 2, 6, 8)
    out, _ = block_attention(
        q, q, q, causal=np.bool_(True), q_start=np.int64(2), softmax_scale=np.float32(0.5)
    )
    ref, _ = sdpa_reference(q, q, q, causal=True, q_start=2, kv_start=0, scale=0.5)
    assert (out - ref).abs().max() < 1e-6  # (the float32 scale)


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@pytest.mark.parametrize("name", ["out", "lse", "dout", "dlse"])
def test_block_backward_checks_the_shapes_of_out_lse_and_their_grads(name, backend):
    """A wrong out / lse shape made the fused backward read out of bounds (gradients
    off by 0.6); every backend refuses it."""
    q, k, v = rnd(2, 4, 6, 8), rnd(2, 2, 6, 8), rnd(2, 2, 6, 8)
    out, lse = block_attention(q, k, v)
    args = {"out": out, "lse": lse, "dout": rnd(*out.shape), "dlse": rnd(*lse.shape)}
    if name in ("out", "dout"):
        bad = [args[name][:, :, :3], args[name][:1], args[name][..., :4]]
    else:
        bad = [args[name][:, :, :3], args[name][:, :2], args[name][..., None]]
    if name != "dlse":
        args["dlse"] = None  # the fused path (no lse gradient) is the one that read garbage
    for b in bad:
        kw = {**args, name: b}
        with pytest.raises(ShapeError, match=f"expected {name} of shape"):
            block_attention_backward(
                q, k, v, kw["out"], kw["lse"], kw["dout"], kw["dlse"], backend=backend
            )
    with pytest.raises(DTypeError, match=r"expected dout as a torch\.Tensor"):
        block_attention_backward(q, k, v, out, lse, None, backend=backend)
    with pytest.raises(DTypeError, match="floating lse"):
        block_attention_backward(q, k, v, out, lse.long(), out, backend=backend)


GRAD_CASES = [
    # causal, q_start, kv_start, segments, hq, hkv
    (False, 0, 0, False, 4, 2),
    (True, 6, 6, False, 2, 2),  # the diagonal
    (True, 10, 3, False, 4, 1),
    (True, 0, 5, False, 2, 1),  # rows 0..4 see no key
    (True, 7, 2, True, 4, 2),
]


@pytest.mark.parametrize("with_lse", [True, False], ids=["lse-in-loss", "out-only"])
@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_through_block_lse_are_exact_on_every_backend(case, backend, with_lse):
    """With sdpa the lse had no grad_fn: the lse term of a loss was silently dropped."""
    causal, q_start, kv_start, segs, hq, hkv = case
    qseg = torch.tensor([0] * 4 + [1] * 5) if segs else None
    kseg = torch.tensor([0] * 3 + [1] * 4) if segs else None
    base = (rnd(2, hq, 9, 8), rnd(2, hkv, 7, 8), rnd(2, hkv, 7, 8))
    kw = dict(causal=causal, q_start=q_start, kv_start=kv_start, q_segment_ids=qseg,
              kv_segment_ids=kseg)  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in base]
    out, lse = block_attention(*leaves, **kw, backend=backend)
    assert lse.requires_grad and lse.grad_fn is not None
    ref_leaves = [t.clone().requires_grad_() for t in base]
    ref_out, ref_lse = block_reference(*ref_leaves, causal, q_start, kv_start, qseg, kseg)
    g_out, g_lse = rnd(*out.shape), rnd(*lse.shape)

    def loss(o, ls):
        total = (o * g_out).sum()
        if with_lse:
            total = total + (torch.where(ls.isneginf(), 0.0, ls) * g_lse).sum()
        return total

    got = torch.autograd.grad(loss(out, lse), leaves)
    want = torch.autograd.grad(loss(ref_out, ref_lse), ref_leaves)
    for a, b in zip(got, want, strict=True):
        assert not a.isnan().any()
        assert (a - b).abs().max() < 1e-10


def test_block_attention_on_a_fused_backend_leaves_no_graph_without_grad():
    q = rnd(1, 2, 5, 8, dtype=torch.float32).requires_grad_()
    with torch.no_grad():
        out, lse = block_attention(q, q.detach(), q.detach(), backend="sdpa")
    assert out.grad_fn is None and lse.grad_fn is None


# ------------------------------------------------------------------------ merge

MERGES = {"merge": merge, "merge_": merge_, "merge_fused_": merge_fused_}


def _bad_merges():
    o, ls = rnd(5, 4), rnd(5)
    return [
        ("one block row into five", (o, ls, rnd(1, 4), rnd(1)), ShapeError, r"block_out \(1, 4\)"),
        ("head_dim 4 and 3", (o, ls, rnd(5, 3), rnd(5)), ShapeError, "one shape"),
        ("lse of rank 2", (o, rnd(5, 1), rnd(5, 4), rnd(5, 1)), ShapeError, r"lse \(5, 1\)"),
        ("block lse rows", (o, ls, rnd(5, 4), rnd(4)), ShapeError, "block_lse"),
        ("0-d out", (torch.tensor(1.0),) * 4, ShapeError, "one shape"),
        ("integer out", (o.long(), ls, rnd(5, 4), rnd(5)), DTypeError, "torch.int64"),
        ("integer block lse", (o, ls, rnd(5, 4), rnd(5).long()), DTypeError, "floating partials"),
        ("a list", ([[0.0] * 4] * 5, ls, rnd(5, 4), rnd(5)), DTypeError, "out as a torch.Tensor"),
        ("block on meta", (o, ls, rnd(5, 4).to("meta"), rnd(5).to("meta")), DTypeError,
         "one device"),
    ]  # fmt: skip


@pytest.mark.parametrize("fn", list(MERGES))
@pytest.mark.parametrize("case", _bad_merges(), ids=lambda c: c[0])
def test_merges_reject_mismatched_partials_before_writing(case, fn):
    _, args, error, match = case
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(error, match=match):
        MERGES[fn](*args)
    for a, b in zip(args, before, strict=True):
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            assert torch.equal(a, b)  # nothing written


def test_merges_still_take_views_and_kernel_dtype_blocks():
    out, lse = empty_partial((2, 3, 4), torch.float32, "cpu")
    bo, bl = rnd(2, 3, 4).bfloat16(), rnd(2, 3, dtype=torch.float32)
    merge_fused_(out[:, 1:], lse[:, 1:], bo[:, 1:], bl[:, 1:])
    assert torch.equal(lse[:, 1:], bl[:, 1:]) and (out[:, 0] == 0).all()


# ----------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: position_ids(7, 2, -1, "contiguous"), RingError, "found rank -1"),
        (lambda: position_ids(7, 0, 0, "contiguous"), RingError, "world_size >= 1"),
        (lambda: position_ids(7, 2, 2, "zigzag"), RingError, "found rank 2, world 2"),
        (lambda: position_ids(-3, 2, 0, "contiguous"), ShapeError, "seq_len >= 0, found -3"),
        (lambda: position_ids(7, 2.0, 0, "contiguous"), DTypeError, "world_size: expected an int"),
        (lambda: position_ids(7, "2", 0, "contiguous"), DTypeError, "found str"),
        (lambda: position_ids(7, None, 0, "contiguous"), DTypeError, "found NoneType"),
        (lambda: position_ids(7, 2, True, "contiguous"), DTypeError, "rank: expected an int"),
        (lambda: position_ids(7.0, 2, 0, "contiguous"), DTypeError, "seq_len"),
        (lambda: position_ids(7, 2, 0, ["zigzag"]), RingError, "layout"),
        (lambda: rank_chunks(7, 2, -2, "zigzag"), RingError, "found rank -2"),
        (lambda: shard(Q, 2.0, 0), DTypeError, "world_size: expected an int, found float"),
        (lambda: shard(Q, "2", 0), DTypeError, "found str"),
        (lambda: shard(Q, None, 0), DTypeError, "found NoneType"),
        (lambda: shard(Q, 2, -1), RingError, "found rank -1"),
        (lambda: shard(Q, 2, 0, dim=4), ShapeError, r"dim in \[-4, 4\)"),
        (lambda: shard(Q, 2, 0, dim=1.0), DTypeError, "dim: expected an int"),
        (lambda: shard([1, 2], 2, 0), DTypeError, "x as a torch.Tensor"),
        (lambda: unshard([]), ShapeError, "non-empty list of shards, found 0"),
        (lambda: unshard(Q), ShapeError, "found Tensor"),
        (lambda: unshard([Q, [1]]), DTypeError, "rank 1's shard as a torch.Tensor"),
        (lambda: unshard([rnd(2, 3, 4), rnd(2, 3, 5)]), ShapeError, r"rank 1's \(2, 3, 5\)"),
        (lambda: unshard([rnd(2, 3, 4), rnd(3, 3, 4)]), ShapeError, "except along dim 1"),
        (lambda: unshard([rnd(2, 3, 4), rnd(3, 4)]), ShapeError, r"rank 1's \(3, 4\)"),
        (lambda: unshard([rnd(3, 4), rnd(3, 4, dtype=torch.float32)]), ShapeError, "float32"),
        (lambda: unshard([rnd(3, 4), rnd(3, 4)], dim=2), ShapeError, r"dim in \[-2, 2\)"),
        (lambda: virtual_ring_attention(Q, Q, Q, world_size="2"), DTypeError, "world_size"),
        (lambda: virtual_ring_attention(Q, Q, Q, world_size=2.0), DTypeError, "found float"),
        (lambda: virtual_ring_attention(Q, Q, Q, world_size=None), DTypeError, "NoneType"),
        (lambda: virtual_ring_attention(Q, Q, Q, world_size=0), RingError, "world_size >= 1"),
        (lambda: virtual_ring_attention(Q, Q, Q, world_size=2, causal="no"), DTypeError, "causal"),
        (
            lambda: virtual_ring_attention(Q, Q, Q, world_size=2, backend="fast"),
            RingError,
            "backend",
        ),
    ],
)
def test_layout_arguments_are_validated(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_layout_takes_numpy_ints():
    assert torch.equal(position_ids(np.int64(7), np.int32(2), np.int64(1), "contiguous"),
                       torch.arange(4, 7))  # fmt: skip
    x = torch.arange(14).reshape(2, 7)
    assert torch.equal(shard(x, np.int64(2), 1, dim=np.int64(-1)), x[:, 4:])


# -------------------------------------------------------------------------- ffn


def _ident(x):
    return x


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"chunk_size": 2.5}, DTypeError, "chunk_size: expected an int, found float"),
        ({"chunk_size": True}, DTypeError, "found bool"),
        ({"chunk_size": "2"}, DTypeError, "found str"),
        ({"chunk_size": None}, DTypeError, "found NoneType"),
        ({"chunk_size": 0}, RingError, "chunk_size >= 1"),
        ({"chunk_size": 2, "dim": 5}, ShapeError, r"dim in \[-3, 3\)"),
        ({"chunk_size": 2, "dim": -4}, ShapeError, "found -4"),
        ({"chunk_size": 2, "dim": "1"}, DTypeError, "dim: expected an int"),
        ({"chunk_size": 2, "checkpoint": "yes"}, DTypeError, "checkpoint"),
        ({"chunk_size": 2, "ffn": None}, DTypeError, "ffn as a callable"),
        ({"chunk_size": 2, "x": [1.0]}, DTypeError, "x as a torch.Tensor"),
    ],
)
def test_blockwise_feedforward_arguments_are_validated(kwargs, error, match):
    kw = {"ffn": _ident, "x": rnd(2, 5, 3), **kwargs}
    with pytest.raises(error, match=match):
        blockwise_feedforward(kw.pop("ffn"), kw.pop("x"), kw.pop("chunk_size"), **kw)


def test_blockwise_feedforward_takes_a_numpy_chunk_size():
    x = rnd(2, 5, 3)
    assert torch.equal(blockwise_feedforward(_ident, x, np.int64(2)), x)


@pytest.mark.parametrize("chunk", [5, 6, 2**63 - 1, 2**80])
def test_blockwise_feedforward_takes_a_chunk_past_the_length(chunk):
    x = rnd(2, 5, 3)
    calls = []
    out = blockwise_feedforward(lambda part: calls.append(part.shape) or part * 2, x, chunk)
    assert torch.equal(out, x * 2) and calls == [x.shape]  # one chunk: the whole length


# ----------------------------------------------------------------------- timeout


@pytest.mark.parametrize(
    "timeout,error",
    [
        (-1, RingError),
        (0, RingError),
        (math.nan, RingError),
        (math.inf, RingError),
        # Finite but past what gloo's wait takes: an OverflowError mid-exchange before.
        (1e9 * (1 + 1e-9), RingError),
        (1e14, RingError),
        pytest.param(10**400, RingError, id="10**400"),  # no float: math.isfinite raised
        ("5", DTypeError),
        (True, DTypeError),
        ([5], DTypeError),
    ],
)
def test_timeouts_must_be_none_or_a_finite_positive_number(timeout, error):
    with pytest.raises(error, match="timeout"):
        check_timeout(timeout)


def test_good_timeouts_pass():
    assert check_timeout(None) is None and check_timeout(5) == 5.0
    assert check_timeout(np.float32(0.5)) == 0.5
    assert check_timeout(MAX_TIMEOUT) == MAX_TIMEOUT == 1e9


# ------------------------------------------------- ring attention across ranks

HEAD_DIM = 8
# (name, rank 1's change to the common call, the field the error must name): every
# rank must raise RingError naming what differs instead of gloo aborting one rank
# and another returning garbage.
MISMATCHES = [
    ("head_dim", {"d": 16}, "rank 1 has head_dim 16, rank 0 has 8"),
    ("kv heads", {"hkv": 1}, "rank 1 has key/value heads 1, rank 0 has 2"),
    ("query heads", {"hq": 2}, "rank 1 has query heads 2, rank 0 has 4"),
    ("dtype", {"dtype": torch.float32}, "rank 1 has dtype torch.float32, rank 0 has torch.float64"),
    ("batch", {"b": 1}, "rank 1 has batch 1, rank 0 has 2"),
    ("segments on one rank", {"seg": "none"}, "rank 1 has segment_ids none, rank 0 has given"),
    ("segment dtype", {"seg": "int32"}, "rank 1 has segment_ids dtype torch.int32"),
    ("segment dims", {"seg": "1d"}, "rank 1 has segment_ids dims 1, rank 0 has 2"),
    ("causal", {"causal": False}, "rank 1 has causal False, rank 0 has True"),
    ("layout", {"layout": "contiguous"}, "rank 1 has layout 'contiguous', rank 0 has 'zigzag'"),
    ("scale", {"softmax_scale": 0.5}, "rank 1 has softmax_scale 0.5"),
    ("backend", {"backend": "math"}, "rank 1 has backend 'math', rank 0 has 'sdpa'"),
    ("window", {"window": 3}, "rank 1 has window 3, rank 0 has None"),
    ("softcap", {"softcap": 2.5}, "rank 1 has softcap 2.5, rank 0 has None"),
]


def _ring_call(rank, ws, spec, full, *, grad=False, make=None):
    """ring_attention on this rank's shard of ``full`` as changed by ``spec`` (rank 1
    only); ``make`` turns the q/k/v shards into other strides of the same values."""
    s = {"d": HEAD_DIM, "hkv": 2, "hq": 4, "dtype": torch.float64, "b": 2, "seg": "2d",
         "causal": True, "layout": "zigzag", "softmax_scale": None, "backend": "auto",
         "window": None, "softcap": None}  # fmt: skip
    if rank == 1:
        s.update(spec)
    q, k, v, seg = full
    q = torch.cat([q, q], -1)[: s["b"], : s["hq"], :, : s["d"]]
    k, v = (torch.cat([t, t], -1)[: s["b"], : s["hkv"], :, : s["d"]] for t in (k, v))
    seg = {"2d": seg[: s["b"]], "1d": seg[0], "int32": seg.int()[: s["b"]], "none": None}[s["seg"]]
    lay = s["layout"]
    q, k, v = (shard(t, ws, rank, layout=lay).to(s["dtype"]) for t in (q, k, v))
    if make is not None:
        q, k, v = (make(t) for t in (q, k, v))
    seg = None if seg is None else shard(seg, ws, rank, layout=lay, dim=-1)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, causal=s["causal"], segment_ids=seg, layout=lay,
                         softmax_scale=s["softmax_scale"], backend=s["backend"],
                         window=s["window"], softcap=s["softcap"],
                         return_lse=True, timeout=30)  # fmt: skip
    return (q, k, v), out


def _full_inputs(seq_len=12):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, seq_len, HEAD_DIM, generator=gen, dtype=torch.float64)
               for h in (4, 2, 2))  # fmt: skip
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])[:, :seq_len]
    return q, k, v, seg


def _attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "error": str(exc)}


def _inputs_worker(rank, ws):
    res = {}
    full = _full_inputs()
    for name, spec, _ in MISMATCHES:
        res[name] = _attempt(lambda spec=spec: _ring_call(rank, ws, spec, full)[1][0].shape)
    # One rank's own inputs are bad: it raises its error, its peer a RingError at once.
    res["bad timeout on rank 1"] = _attempt(lambda: ring_attention(
        *(shard(t, ws, rank) for t in full[:3]), timeout="5" if rank else 30))  # fmt: skip
    q, k, v = (shard(t, ws, rank) for t in full[:3])
    res["bad shapes on rank 0"] = _attempt(
        lambda: ring_attention(q, k, v[:, :, :1] if rank == 0 else v, timeout=30)
    )
    res["negative timeout"] = _attempt(lambda: ring_attention(
        *(shard(t, ws, rank) for t in full[:3]), timeout=-1))  # fmt: skip
    # Finite but too long for gloo: refused up front, so the peer learns of it at once.
    res["huge timeout on rank 0"] = _attempt(lambda: ring_attention(
        *(shard(t, ws, rank) for t in full[:3]), timeout=1e14 if rank == 0 else 30))  # fmt: skip

    # Strided shards (transposed rows) went through the fused kernel as garbage.
    def strided_call():
        make = STRIDED["transposed-rows"]
        (q, k, v), (out, lse) = _ring_call(rank, ws, {}, full, grad=True, make=make)
        assert q.stride(-1) != 1
        g = torch.ones_like(out)
        return out.detach(), lse.detach(), torch.autograd.grad((out * g).sum(), (q, k, v))

    res["strided"] = _attempt(strided_call)
    # Empty batches and heads, and a rank holding no tokens (1 token over 2 zigzag
    # ranks), forward and backward: no SIGFPE, no gloo failure.
    for name, shape in (("batch 0", (0, 2, 4, 8)), ("heads 0", (1, 0, 4, 8)),
                        ("seq 1", (1, 2, 1, 8))):  # fmt: skip

        def empty_call(shape=shape):
            q = torch.randn(*shape, dtype=torch.float64)
            kv = torch.randn(shape[0], 2, *shape[2:], dtype=torch.float64)
            qs, ks, vs = (shard(t, ws, rank, layout="zigzag").requires_grad_() for t in (q, kv, kv))
            out = ring_attention(qs, ks, vs, causal=True, layout="zigzag", timeout=30)
            grads = torch.autograd.grad(out.sum(), (qs, ks, vs))
            return q, kv, out.detach(), grads

        res[name] = _attempt(empty_call)
    # The group is still usable after all of it.
    res["after"] = _attempt(lambda: _ring_call(rank, ws, {}, full)[1][0].detach())
    return res


@pytest.mark.timeout(300)
def test_ranks_with_mismatched_or_bad_inputs_all_raise_clearly():
    outcomes = run_ring(_inputs_worker, 2, timeout=240, pg_timeout=60)
    for o in outcomes:
        assert o.ok, f"rank {o.rank}: {o.error}"
    per_rank = [o.value for o in outcomes]
    for name, _, want in MISMATCHES:
        for rank, res in enumerate(per_rank):
            r = res[name]
            assert not r["ok"] and r["type"] == "RingError", (name, rank, r)
            assert want in r["error"] and f"ring rank {rank}/2" in r["error"], (name, rank, r)
    r0, r1 = (res["bad timeout on rank 1"] for res in per_rank)
    assert r1["type"] == "DTypeError" and "timeout" in r1["error"], r1
    assert r0["type"] == "RingError" and "rank(s) [1] rejected" in r0["error"], r0
    r0, r1 = (res["bad shapes on rank 0"] for res in per_rank)
    assert r0["type"] == "ShapeError", r0
    assert r1["type"] == "RingError" and "rank(s) [0] rejected" in r1["error"], r1
    for res in per_rank:
        r = res["negative timeout"]
        assert r["type"] == "RingError" and "timeout" in r["error"], r
    r0, r1 = (res["huge timeout on rank 0"] for res in per_rank)
    assert r0["type"] == "RingError" and "<= 1e+09" in r0["error"], r0
    assert r1["type"] == "RingError" and "rank(s) [0] rejected" in r1["error"], r1

    q, k, v, seg = _full_inputs()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*leaves, causal=True, segment_ids=seg)
    ref_grads = torch.autograd.grad(ref_out.sum(), leaves)
    got = [res["strided"] for res in per_rank]
    assert all(g["ok"] for g in got), got
    out = unshard([g["value"][0] for g in got], layout="zigzag")
    lse = unshard([g["value"][1] for g in got], layout="zigzag", dim=-1)
    assert (out - ref_out).abs().max() < 1e-10 and (lse - ref_lse).abs().max() < 1e-10
    for i in range(3):
        grad = unshard([g["value"][2][i] for g in got], layout="zigzag")
        assert (grad - ref_grads[i]).abs().max() < 1e-10

    for name in ("batch 0", "heads 0", "seq 1"):
        got = [res[name] for res in per_rank]
        assert all(g["ok"] for g in got), (name, got)
        q, kv = got[0]["value"][:2]
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, kv, kv))
        if q.numel():
            ref, _ = reference_attention(qd, kd, vd, causal=True)
            want = torch.autograd.grad(ref.sum(), (qd, kd, vd))
        else:
            ref, want = torch.zeros_like(q), (torch.zeros_like(q), *(torch.zeros_like(kv),) * 2)
        out = unshard([g["value"][2] for g in got], layout="zigzag")
        assert out.shape == q.shape and _max_err(out, ref) < 1e-10, name
        for i in range(3):
            grad = unshard([g["value"][3][i] for g in got], layout="zigzag")
            assert grad.shape == want[i].shape and _max_err(grad, want[i]) < 1e-10, (name, i)
    a, b = (res["after"] for res in per_rank)
    assert a["ok"] and b["ok"], (a, b)


def _max_err(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def test_ring_attention_refuses_a_bad_timeout_before_any_exchange(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    q = rnd(1, 2, 4, 8)
    with pytest.raises(RingError, match="timeout: expected a finite number of seconds > 0"):
        ring_attention(q, q, q, timeout=-1)
    with pytest.raises(DTypeError, match="timeout"):
        ring_attention(q, q, q, timeout="5")
