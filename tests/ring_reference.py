"""The oracle for ring attention tests: one SDPA call on the full sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_mask(
    seq_len: int,
    causal: bool,
    segment_ids: torch.Tensor | None,
    device=None,
    window: int | None = None,
) -> torch.Tensor:
    """Visible (query, key) pairs; ``window``: query i sees key j only when i - j < window."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        mask = torch.tril(mask)
    if window is not None:
        pos = torch.arange(seq_len, device=device)
        mask = mask & (pos[:, None] - pos[None, :] < window)
    if segment_ids is not None:
        seg = segment_ids.reshape(-1, seq_len).to(mask.device)
        mask = mask & (seg[:, :, None] == seg[:, None, :])
        return mask[:, None]
    return mask


def reference_attention(
    q, k, v, *, causal=False, segment_ids=None, scale=None, window=None, softcap=None
):
    """(out, lse) on the full sequence: out by SDPA (by an explicit softmax with
    ``softcap``, which SDPA does not do), lse by a masked log-sum-exp."""
    hq, hkv, seq_len, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k2 = k.repeat_interleave(hq // hkv, dim=1)
    v2 = v.repeat_interleave(hq // hkv, dim=1)
    mask = full_mask(seq_len, causal, segment_ids, device=q.device, window=window)
    scale = d**-0.5 if scale is None else scale
    scores = torch.matmul(q, k2.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, scale=scale)
    else:
        p = torch.exp(scores.masked_fill(~mask, float("-inf")) - lse.unsqueeze(-1))
        out = p @ v2
    return out, lse


def random_segments(seq_len: int, gen: torch.Generator, batch: int = 1) -> torch.Tensor:
    """Packed-sequence segment ids: ragged segments, starts anywhere, increasing ids."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq_len - 1, generator=gen)[:4] + 1
        ids = torch.zeros(seq_len, dtype=torch.int64)
        for c in cuts.tolist():
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


def block_reference(
    q, k, v, causal, q_start, kv_start, qseg, kseg, scale=None, window=None, softcap=None
):
    """Float64 masked softmax of one block: (out, lse), out = 0 where nothing is visible.

    Query i sees key j (global positions ``q_start + i``, ``kv_start + j``) when
    causal allows it, ``window`` (if given) exceeds their distance and the segments
    match; ``softcap`` c turns a score s into ``c * tanh(s / c)``."""
    hq, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    q, k, v = (
        q.double(),
        k.double().repeat_interleave(hq // hkv, 1),
        v.double().repeat_interleave(hq // hkv, 1),
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(sq)[:, None] + q_start
    kpos = torch.arange(sk)[None, :] + kv_start
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed = qpos >= kpos
    if window is not None:
        allowed = allowed & (qpos - kpos < window)
    allowed = allowed.expand(q.shape[0], 1, sq, sk)
    if qseg is not None:
        allowed = (
            allowed
            & (qseg.reshape(-1, sq)[:, :, None] == kseg.reshape(-1, sk)[:, None, :])[:, None]
        )
    s = s.masked_fill(~allowed, float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.exp(s - torch.where(lse.isneginf(), 0.0, lse).unsqueeze(-1))
    return p @ v, lse
