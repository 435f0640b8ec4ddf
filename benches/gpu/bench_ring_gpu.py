"""GPU benchmark of ring attention's pieces (bf16).

1. Block kernel: qdelta/_cuda/attention_block.cu (``backend="cuda"``; each row names the
   kernel: ``mma2``, the default (cp.async double buffering, ldmatrix), and
   ``mma``, the first tensor-core kernel, side by side; one ``v1`` row for the
   CUDA-core kernel) vs torch's SDPA flash kernel
   (``_scaled_dot_product_flash_attention``, which also returns the log-sum-exp)
   on the same block shapes, head dims 64 and 128; a full block (off-diagonal
   ring step) and a causal diagonal block. Target: >= 0.8x flash.
2. Virtual ring over 8 blocks (zigzag, causal; blocks by ``sdpa`` and by
   ``cuda``) vs one SDPA flash call on the full sequence. Target: <= 1.15x.
3. Sliding window (2048 tokens of 16384): the virtual ring over 8 contiguous
   blocks (pairs out of reach skipped, 2 of 8 steps) vs one SDPA call with the
   window as a boolean mask, and vs full causal flash (what the window saves);
   and the block kernel on a causal 8192-key block with a 256-key window vs
   without one (it visits ~1/16 of the tiles: the time should follow).

Times are medians of CUDA-event timings. Bounded: fixed iteration counts and a
total budget; a failing configuration is recorded and the rest still run.

    python benches/gpu/bench_ring_gpu.py --out results/gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from qdelta.atomic_io import write_text_atomic

BUDGET_S = 100.0


def gpu_time_ms(fn, *, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def attn_flops(batch, heads, sq, sk, d, causal):
    flops = 4.0 * batch * heads * sq * sk * d
    return flops / 2 if causal else flops


def _block_row(d: int, causal: bool, kernel: str = "mma2") -> dict:
    from qdelta.ring import block_attention, cuda_block

    flash = torch.ops.aten._scaled_dot_product_flash_attention
    b, h, s = 1, 16, 4096
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    default = cuda_block.DEFAULT_KERNEL
    cuda_block.DEFAULT_KERNEL = kernel  # backend "cuda" runs this kernel
    try:
        t_cuda = gpu_time_ms(lambda: block_attention(q, k, v, causal=causal, backend="cuda"))
        out, lse = block_attention(q, k, v, causal=causal, backend="cuda")
    finally:
        cuda_block.DEFAULT_KERNEL = default
    t_flash = gpu_time_ms(lambda: flash(q, k, v, 0.0, causal))
    ref = flash(q, k, v, 0.0, causal)
    gflop = attn_flops(b, h, s, s, d, causal) / 1e9
    return {
        "name": f"{kernel}: B={b} H={h} S={s} D={d} {'causal diagonal' if causal else 'full'}",
        "kernel": kernel,
        "cuda_ms": t_cuda,
        "flash_ms": t_flash,
        "cuda_tflops": gflop / t_cuda,
        "flash_tflops": gflop / t_flash,
        "throughput_vs_flash": t_flash / t_cuda,
        "target": ">= 0.8",
        "max_abs_err_out": (out - ref[0].float()).abs().max().item(),
        "max_abs_err_lse": (lse - ref[1].float()).abs().max().item(),
    }


def _ring_row(d: int, backend: str) -> dict:
    from qdelta.ring import virtual_ring_attention

    flash = torch.ops.aten._scaled_dot_product_flash_attention
    b, h, s, world = 1, 16, 16384, 8
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def ring():
        with torch.no_grad():
            return virtual_ring_attention(
                q, k, v, world_size=world, causal=True, layout="zigzag", backend=backend
            )

    t_ring = gpu_time_ms(ring, warmup=2, iters=5)
    t_full = gpu_time_ms(lambda: flash(q, k, v, 0.0, True), warmup=2, iters=5)
    err = (ring().float() - flash(q, k, v, 0.0, True)[0].float()).abs().max().item()
    if backend == "cuda":
        from qdelta.ring import cuda_block

        backend_name = f"cuda/{cuda_block.DEFAULT_KERNEL}"
    else:
        backend_name = backend
    return {
        "name": f"x{world} ({backend_name} blocks) causal zigzag B={b} H={h} S={s} D={d}",
        "ring_ms": t_ring,
        "sdpa_full_ms": t_full,
        "time_vs_sdpa": t_ring / t_full,
        "target": "<= 1.15",
        "max_abs_err": err,
    }


def _window_row(d: int, backend: str, window: int = 2048) -> dict:
    from qdelta.ring import virtual_ring_attention

    flash = torch.ops.aten._scaled_dot_product_flash_attention
    b, h, s, world = 1, 16, 16384, 8
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = torch.arange(s, device="cuda")
    dist = pos[:, None] - pos[None, :]
    mask = (dist >= 0) & (dist < window)

    def ring():
        with torch.no_grad():
            return virtual_ring_attention(
                q, k, v, world_size=world, causal=True, layout="contiguous", backend=backend,
                window=window,
            )  # fmt: skip

    def masked():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    t_ring = gpu_time_ms(ring, warmup=2, iters=5)
    t_masked = gpu_time_ms(masked, warmup=2, iters=5)
    t_causal = gpu_time_ms(lambda: flash(q, k, v, 0.0, True), warmup=2, iters=5)
    err = (ring().float() - masked().float()).abs().max().item()
    return {
        "name": f"x{world} ({backend} blocks) window {window} contiguous B={b} H={h} S={s} D={d}",
        "ring_ms": t_ring,
        "sdpa_masked_ms": t_masked,
        "flash_causal_ms": t_causal,
        "time_vs_sdpa_masked": t_ring / t_masked,
        "time_vs_flash_causal": t_ring / t_causal,
        "max_abs_err": err,
    }


def _window_block_row(d: int, kernel: str, window: int = 256) -> dict:
    from qdelta.ring import cuda_block

    b, h, s = 1, 8, 8192
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def run(w):
        return cuda_block.attention_block(
            q, k, v, d**-0.5, True, 0, 0, None, None, kernel=kernel, window=w
        )

    t_window = gpu_time_ms(lambda: run(window))
    t_full = gpu_time_ms(lambda: run(None))
    return {
        "name": f"{kernel}: causal B={b} H={h} S={s} D={d}, window {window} vs none",
        "window_ms": t_window,
        "full_ms": t_full,
        "time_ratio": t_window / t_full,
        "visible_fraction": window / (s / 2),
    }


def _collect(fn, configs, rows, failures, deadline):
    for cfg in configs:
        if time.monotonic() > deadline:
            failures.append(f"{fn.__name__}{cfg}: skipped (time budget)")
            continue
        try:
            rows.append(fn(*cfg))
        except Exception:
            failures.append(f"{fn.__name__}{cfg}: {traceback.format_exc(limit=3)}")
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="stop starting new configurations"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("bench_ring_gpu: no CUDA device; nothing measured")
        return 0
    device = torch.cuda.get_device_name()
    deadline = time.monotonic() + min(args.budget_s, BUDGET_S)
    blocks, rings, windows, window_blocks, failures = [], [], [], [], []
    _collect(
        _block_row,
        [
            (d, causal, kernel)
            for d in (64, 128)
            for causal in (False, True)
            for kernel in ("mma2", "mma")
        ]
        + [(64, False, "v1")],
        blocks,
        failures,
        deadline,
    )
    _collect(
        _ring_row,
        [(64, "sdpa"), (64, "cuda"), (128, "sdpa"), (128, "cuda")],
        rings,
        failures,
        deadline,
    )
    _collect(_window_row, [(128, "sdpa"), (128, "cuda")], windows, failures, deadline)
    _collect(_window_block_row, [(128, "mma2"), (128, "mma")], window_blocks, failures, deadline)
    report = {
        "device": device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "blocks": blocks,
        "virtual_ring": rings,
        "sliding_window": windows,
        "window_block": window_blocks,
        "failures": failures,
    }
    md = [f"# Ring attention on {device}", "", "## Block kernel vs SDPA flash (bf16)", ""]
    md += [
        "| shape | cuda ms | flash ms | cuda TFLOP/s | flash TFLOP/s | vs flash (target >= 0.8) | max err out / lse |"
    ]
    md += ["|---|---:|---:|---:|---:|---:|---:|"]
    for r in blocks:
        md.append(
            f"| {r['name']} | {r['cuda_ms']:.3f} | {r['flash_ms']:.3f} | {r['cuda_tflops']:.1f} "
            f"| {r['flash_tflops']:.1f} | {r['throughput_vs_flash']:.2f}x "
            f"| {r['max_abs_err_out']:.1e} / {r['max_abs_err_lse']:.1e} |"
        )
    md += ["", "## Virtual ring over 8 blocks vs one SDPA call", ""]
    md += [
        "| run | ring ms | SDPA full ms | ratio (target <= 1.15) | max err |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rings:
        md.append(
            f"| {r['name']} | {r['ring_ms']:.2f} | {r['sdpa_full_ms']:.2f} "
            f"| {r['time_vs_sdpa']:.2f}x | {r['max_abs_err']:.1e} |"
        )
    md += ["", "## Sliding window: virtual ring vs one masked SDPA call", ""]
    md += [
        "| run | ring ms | SDPA masked ms | flash causal ms | vs masked | vs causal | max err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in windows:
        md.append(
            f"| {r['name']} | {r['ring_ms']:.2f} | {r['sdpa_masked_ms']:.2f} "
            f"| {r['flash_causal_ms']:.2f} | {r['time_vs_sdpa_masked']:.2f}x "
            f"| {r['time_vs_flash_causal']:.2f}x | {r['max_abs_err']:.1e} |"
        )
    md += ["", "## Block kernel: a sliding window's work", ""]
    md += [
        "| run | window ms | no window ms | ratio | visible pairs |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in window_blocks:
        md.append(
            f"| {r['name']} | {r['window_ms']:.3f} | {r['full_ms']:.3f} "
            f"| {r['time_ratio']:.2f}x | {r['visible_fraction']:.2f} |"
        )
    if failures:
        md += ["", "## Failures", "", *(f"- {f.splitlines()[0]}" for f in failures)]
    write_text_atomic(out / "ring_gpu.json", json.dumps(report, indent=2))
    write_text_atomic(out / "ring_gpu.md", "\n".join(md) + "\n")
    print("\n".join(md))
    if failures:
        print("\n".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
