"""Ring attention over 2 and 4 gloo CPU processes vs one SDPA call on the full sequence.

Reports, per configuration, the wall time of forward and forward+backward (the
slowest rank, median of a few runs) and the peak extra resident memory of each
process while attention runs (ru_maxrss minus the RSS after a tiny warm-up run). Every
configuration runs in fresh processes (the SDPA baseline too, as a world of 1),
each process limited to one thread, so the numbers compare like with like.

    python benches/bench_ring_cpu.py --out benches/results
    python benches/bench_ring_cpu.py --out benches/results --window 512 --layout contiguous

With ``--window W`` every run is sliding-window causal attention (query i sees
keys i - W < j <= i): the SDPA baseline gets the window as a boolean mask, the
rings take ``window=W`` (pairs out of reach skipped, the turn cut short), and a
ring at the largest world size without a window shows what the window saves.
Results then go to ``ring_cpu_window<W>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qdelta.atomic_io import write_text_atomic
from qdelta.machine import cpu_model
from qdelta.ring import ring_attention, shard
from qdelta.ring.launch import spawn_ring


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _window_mask(seq_len: int, window: int) -> torch.Tensor:
    pos = torch.arange(seq_len)
    dist = pos[:, None] - pos[None, :]
    return (dist >= 0) & (dist < window)


def _job(rank, world_size, mode, seq_len, heads, head_dim, repeats, layout, window=None):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    if mode == "ring":
        q, k, v = (shard(t, world_size, rank, layout=layout) for t in (q, k, v))

    def attend(q, k, v):
        if mode == "sdpa":
            if window is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            mask = _window_mask(q.shape[2], window)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return ring_attention(q, k, v, causal=True, layout=layout, backend="sdpa", window=window)

    # Page in the code paths (SDPA, autograd, gloo) with a tiny run first, so the
    # RSS growth below is data, not libraries being loaded.
    small = [t[:, :, : 16 * world_size].clone() for t in (q, k, v)] if mode == "sdpa" else None
    if mode == "ring":
        gen_small = torch.Generator().manual_seed(1)
        full_small = [torch.randn(1, heads, 64, head_dim, generator=gen_small) for _ in range(3)]
        small = [shard(t, world_size, rank, layout=layout) for t in full_small]
    small = [t.requires_grad_() for t in small]
    attend(*small).sum().backward()
    base = _rss_kib()
    times = {"forward": [], "forward_backward": []}
    for _ in range(repeats):
        if mode == "ring":
            torch.distributed.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            attend(q, k, v)
        times["forward"].append(time.perf_counter() - t0)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if mode == "ring":
            torch.distributed.barrier()
        t0 = time.perf_counter()
        attend(qq, kk, vv).sum().backward()
        times["forward_backward"].append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times": times, "peak_extra_mib": (peak - base) / 1024}


def run(world_size: int, mode: str, args, window: int | None = None) -> dict:
    per_rank = spawn_ring(
        _job,
        world_size,
        (mode, args.seq_len, args.heads, args.head_dim, args.repeats, args.layout, window),
        timeout=600,
        pg_timeout=600,
    )
    out = {}
    for what in ("forward", "forward_backward"):
        runs = zip(*(r["times"][what] for r in per_rank), strict=True)
        slowest = sorted(max(ts) for ts in runs)
        out[what + "_s"] = slowest[len(slowest) // 2]
    out["peak_extra_mib_per_process"] = [round(r["peak_extra_mib"], 1) for r in per_rank]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benches/results")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout", default="zigzag")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--window", type=int, default=None, help="sliding window (tokens)")
    args = parser.parse_args(argv)
    cpu = cpu_model()
    # Fixed mmap threshold: large blocks go back to the OS when freed, so peak RSS
    # tracks live tensors instead of glibc's heap growth (inherited by the ranks).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    worlds = [int(x) for x in args.worlds.split(",")]
    results = {"sdpa": run(1, "sdpa", args, args.window)}
    for w in worlds:
        results[f"ring{w}"] = run(w, "ring", args, args.window)
    if args.window is not None:  # the same ring without the window: what it saves
        results[f"ring{max(worlds)} no window"] = run(max(worlds), "ring", args)
    base = results["sdpa"]
    rows = []
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['forward_s'] * 1e3:.0f} | {r['forward_s'] / base['forward_s']:.2f}x "
            f"| {r['forward_backward_s'] * 1e3:.0f} "
            f"| {r['forward_backward_s'] / base['forward_backward_s']:.2f}x "
            f"| {max(r['peak_extra_mib_per_process']):.0f} |"
        )
    report = {
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "platform": platform.platform(),
        },
        "torch": torch.__version__,
        "config": {
            k: getattr(args, k)
            for k in ("seq_len", "heads", "head_dim", "repeats", "layout", "window")
        },
        "results": results,
    }
    md = [
        f"# Ring attention on CPU ({cpu}, {report['machine']['cores']} cores, 1 thread per process)",
        "",
        f"causal, fp32, B=1, H={args.heads}, D={args.head_dim}, S={args.seq_len}, layout {args.layout}"
        + ("" if args.window is None else f", sliding window {args.window} (SDPA: a boolean mask)"),
        "",
        "| run | fwd ms | vs SDPA | fwd+bwd ms | vs SDPA | peak extra MiB / process |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "ring_cpu" if args.window is None else f"ring_cpu_window{args.window}"
    write_text_atomic(out / f"{stem}.json", json.dumps(report, indent=2))
    write_text_atomic(out / f"{stem}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
