"""GPU benchmark of the binary-delta matmul kernels (qdelta/_cuda/delta_matmul.cu).

Decode (the lookup-table path): one row per tenant, B tenants, N = K; kernel vs (a) naive: B dense fp16
matmuls of per-tenant weights (torch.bmm), (b) the memory floor: packed bytes /
measured device-to-device bandwidth. Prefill: M = 512 rows of one tenant vs a
dense fp16 GEMM of the same shape, for every prefill kernel side by side: the
expansion + cuBLAS (the expansion alone is timed too), the same with expansion
pieces overlapped with their GEMMs on side streams, and the fused GEMM
(qd_delta_gemm, 128- and 64-row tiles); and 4 tenants x 128 rows in one call.

GPU times come from CUDA events around the work only: the GPU is kept busy
(torch.cuda._sleep) while the host enqueues, and L2 is flushed before each
timed call so weights come from HBM. The host cost of one call (validation +
launch) is reported separately. Bounded: fixed iteration counts and a total
time budget; a configuration that fails is recorded, the rest still run.

    python benches/gpu/bench_delta_gpu.py --out results/gpu
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

DECODE_SIZES = (4096, 8192)
DECODE_TENANTS = (1, 4, 16, 64)
PREFILL_ROWS = 512
FLOOR_MIN_US = 20.0


def gpu_time_us(fn, *, warmup: int, iters: int, flush: torch.Tensor) -> float:
    """Median CUDA-event time of ``fn`` in microseconds, L2 flushed before each call."""
    for _ in range(warmup):
        fn()
    times = []
    events = []
    for _ in range(iters):
        flush.zero_()
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(1_000_000)  # keeps the GPU busy while the host enqueues
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1000.0 for s, e in events)
    return times[len(times) // 2]


def tuned_us(cuda_backend, fn, *, iters: int, flush: torch.Tensor) -> tuple[float, str]:
    """Time of ``fn`` with autotuning on (decisions in a fresh temporary file), and the
    kernel choice it made; the tuning call itself is not timed."""
    import tempfile

    from qdelta.kernels import autotune

    saved = autotune.ENABLED, autotune.CACHE
    with tempfile.TemporaryDirectory() as tmp:
        cache = autotune.DecisionCache(Path(tmp) / "autotune.json")
        autotune.ENABLED, autotune.CACHE = True, cache
        try:
            fn()  # tunes
            us = gpu_time_us(fn, warmup=2, iters=iters, flush=flush)
            choices = sorted(
                {e["choice"] for e in json.loads(cache.path.read_text())["entries"].values()}
            )
        finally:
            autotune.ENABLED, autotune.CACHE = saved
    return us, "+".join(choices)


def graph_call_us(fn, calls: int = 20, replays: int = 10) -> float:
    """Wall time per call when ``calls`` calls are replayed from one CUDA graph.

    Next to host_call_us: what a serving loop that captures its decode step pays
    per call once the Python and launch costs are gone (GPU time included, L2 warm).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (replays * calls) * 1e6


def host_call_us(fn, calls: int = 50) -> float:
    """Host time to enqueue one call (no synchronization inside)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000.0 / reps
    del src, dst
    return 2 * nbytes / seconds


def random_packed(tenants: int, n: int, k: int) -> torch.Tensor:
    w = -(-k // 32)
    return torch.randint(-(2**31), 2**31 - 1, (tenants, 1, n, w), dtype=torch.int32, device="cuda")


def bench_decode(cuda_backend, n: int, b: int, bandwidth: float, flush, iters: int) -> dict:
    k = n
    planes = random_packed(b, n, k)
    scales = torch.rand(b, 1, device="cuda") * 0.01
    x = torch.randn(b, k, device="cuda", dtype=torch.float16)
    ids = torch.arange(b, device="cuda")
    out = torch.empty(b, n, device="cuda", dtype=torch.float16)

    def kernel():
        cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, out=out, check_ids=False)

    kernel_us = gpu_time_us(kernel, warmup=5, iters=iters, flush=flush)
    tuned, choice = tuned_us(cuda_backend, kernel, iters=iters, flush=flush)
    host_us = host_call_us(kernel)
    try:  # a capture failure must not lose the row's other numbers
        graph_us = graph_call_us(kernel)
    except Exception as exc:
        print(f"bench_decode: CUDA graph capture failed: {type(exc).__name__}: {exc}")
        graph_us = float("nan")
    packed_bytes = planes.numel() * 4
    floor_us = packed_bytes / bandwidth * 1e6

    dense = torch.randn(b, n, k, device="cuda", dtype=torch.float16)
    xb = x[:, None, :]

    def naive():
        torch.bmm(xb, dense.transpose(1, 2))

    naive_us = gpu_time_us(naive, warmup=3, iters=iters, flush=flush)
    torch.cuda.empty_cache()
    return {
        "kind": "decode",
        "N": n,
        "K": k,
        "B": b,
        "kernel_us": kernel_us,
        "naive_bmm_fp16_us": naive_us,
        "speedup_vs_naive": naive_us / kernel_us,
        "packed_bytes": packed_bytes,
        "memory_floor_us": floor_us,
        "kernel_over_floor": kernel_us / floor_us,
        "tuned_us": tuned,
        "tuned_choice": choice,
        "tuned_speedup_vs_naive": naive_us / tuned,
        "floor_counts": floor_us > FLOOR_MIN_US,
        "host_call_us": host_us,
        "graph_call_us": graph_us,
    }


def bench_prefill(cuda_backend, n: int, flush, iters: int) -> dict:
    k, m = n, PREFILL_ROWS
    planes = random_packed(1, n, k)[0]
    scales = torch.rand(1, device="cuda") * 0.01
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    dense = torch.randn(n, k, device="cuda", dtype=torch.float16)

    def kernel():
        cuda_backend.delta_matmul(x, planes, scales, out=out, path="prefill")

    def gemm():
        torch.matmul(x, dense.T, out=out)

    def expand_only():
        cuda_backend._expand(planes, scales, 1, False, 0, torch.float16, k)

    def auto():
        cuda_backend.delta_matmul(x, planes, scales, out=out)

    kernel_us = gpu_time_us(kernel, warmup=5, iters=iters, flush=flush)
    tuned, choice = tuned_us(cuda_backend, auto, iters=iters, flush=flush)
    dense_us = gpu_time_us(gemm, warmup=5, iters=iters, flush=flush)
    expand_us = gpu_time_us(expand_only, warmup=3, iters=iters, flush=flush)
    row = {
        "kind": "prefill",
        "M": m,
        "N": n,
        "K": k,
        "prefill_kernel": cuda_backend.PREFILL_KERNEL,
        "kernel_us": kernel_us,
        "expand_us": expand_us,
        "dense_fp16_gemm_us": dense_us,
        "kernel_over_dense": kernel_us / dense_us,
        "tuned_us": tuned,
        "tuned_choice": choice,
        "tuned_over_dense": tuned / dense_us,
        "kernel_tflops": 2 * m * n * k / kernel_us / 1e6,
    }
    saved = cuda_backend.GEMM_ROWS, cuda_backend.PREFILL_KERNEL
    try:
        cuda_backend.PREFILL_KERNEL = "overlap"  # expansion pieces overlapped with cuBLAS
        row["overlap_us"] = gpu_time_us(kernel, warmup=5, iters=iters, flush=flush)
        row["overlap_over_dense"] = row["overlap_us"] / dense_us
        cuda_backend.PREFILL_KERNEL = saved[1]
        for rows in cuda_backend.GEMM_ROW_CHOICES:
            cuda_backend.GEMM_ROWS = rows

            def fused():
                cuda_backend.delta_matmul(x, planes, scales, out=out, path="gemm")

            fused_us = gpu_time_us(fused, warmup=5, iters=iters, flush=flush)
            row[f"gemm{rows}_us"] = fused_us
            row[f"gemm{rows}_over_dense"] = fused_us / dense_us
        # Four tenants x 128 rows in one call, each path, against the same dense GEMM.
        tenants = 4
        planes4 = random_packed(tenants, n, k)
        scales4 = torch.rand(tenants, 1, device="cuda") * 0.01
        ids = torch.arange(tenants, device="cuda").repeat_interleave(m // tenants)
        cuda_backend.GEMM_ROWS = 128
        for key, path, prefill in (
            ("expand", "prefill", "expand"),
            ("overlap", "prefill", "overlap"),
            ("gemm", "gemm", "expand"),
        ):
            cuda_backend.PREFILL_KERNEL = prefill

            def mixed(path=path):
                cuda_backend.multi_tenant_delta_matmul(
                    x, planes4, scales4, ids, out=out, check_ids=False, path=path
                )

            row[f"tenants4_{key}_us"] = gpu_time_us(mixed, warmup=3, iters=iters, flush=flush)
    finally:
        cuda_backend.GEMM_ROWS, cuda_backend.PREFILL_KERNEL = saved
    return row


# (L2 128-byte lines, next-slice prefetch, blocks per SM) of the table kernel, in table order;
# the last has fewer K splits: more slices per block to prefetch across.
LUT_VARIANTS = ((False, False, 3), (True, False, 3), (True, True, 3), (True, True, 1))
# Kernel choices timed at B = 16 beside the table variants (choices.KERNEL_CHOICES).
DECODE_CHOICES = ("lut-narrow", "mma")


def variant_key(line: bool, prefetch: bool, per_sm: int) -> str:
    """JSON key of one table-kernel variant's B = 16 time."""
    key = f"decode_B16_l2line_{line}" + ("_prefetch" if prefetch else "")
    return key + ("" if per_sm == 3 else f"_per_sm{per_sm}") + "_us"


def bench_variants(cuda_backend, n: int, flush, iters: int) -> dict:
    """Each switchable variant against the one it replaced, same inputs, same card.

    The defaults (cuda.DECODE_MMA_MAX_ROWS, MMA_DIRECT_X, LUT_L2_LINE_LOADS,
    LUT_PREFETCH_NEXT, LUT_BLOCKS_PER_SM, EXPAND_KERNEL) should be set from these numbers; the defaults are
    restored after. B = 16 also runs through the tensor-core kernel (path "mma"), the
    alternative to the tables at that batch.
    """
    k = n
    row: dict = {"kind": "variant", "N": n, "K": k}
    b = 16
    planes = random_packed(b, n, k)
    scales = torch.rand(b, 1, device="cuda") * 0.01
    x = torch.randn(b, k, device="cuda", dtype=torch.float16)
    ids = torch.arange(b, device="cuda")
    out = torch.empty(b, n, device="cuda", dtype=torch.float16)
    defaults = (
        cuda_backend.LUT_L2_LINE_LOADS,
        cuda_backend.LUT_PREFETCH_NEXT,
        cuda_backend.LUT_BLOCKS_PER_SM,
    )
    try:
        for line, prefetch, per_sm in LUT_VARIANTS:
            cuda_backend.LUT_L2_LINE_LOADS = line
            cuda_backend.LUT_PREFETCH_NEXT = prefetch
            cuda_backend.LUT_BLOCKS_PER_SM = per_sm

            def lut():
                cuda_backend.multi_tenant_delta_matmul(
                    x, planes, scales, ids, out=out, check_ids=False, path="decode"
                )

            row[variant_key(line, prefetch, per_sm)] = gpu_time_us(
                lut, warmup=3, iters=iters, flush=flush
            )
    finally:
        (
            cuda_backend.LUT_L2_LINE_LOADS,
            cuda_backend.LUT_PREFETCH_NEXT,
            cuda_backend.LUT_BLOCKS_PER_SM,
        ) = defaults

    from qdelta.kernels import choices

    dt = cuda_backend.DTYPE_CODES[x.dtype]
    for choice in DECODE_CHOICES:

        def run(choice=choice):
            choices.run_choice(choice, x, planes, scales, ids, None, out, 1, False, dt)

        row[f"decode_B16_{choice}_us"] = gpu_time_us(run, warmup=3, iters=iters, flush=flush)
    one = planes[:1]
    for path in ("mma", "decode"):

        def single(path=path):
            cuda_backend.multi_tenant_delta_matmul(
                x[:1], one, scales[:1], ids[:1], out=out[:1], check_ids=False, path=path
            )

        row[f"decode_B1_{path}_us"] = gpu_time_us(single, warmup=3, iters=iters, flush=flush)
        row[f"decode_B1_{path}_host_us"] = host_call_us(single)
    saved_direct = cuda_backend.MMA_DIRECT_X
    try:  # the single-row mma with the separate x-prep launch it had before
        cuda_backend.MMA_DIRECT_X = False
        row["decode_B1_mma_prep_us"] = gpu_time_us(
            lambda: single("mma"), warmup=3, iters=iters, flush=flush
        )
    finally:
        cuda_backend.MMA_DIRECT_X = saved_direct
    default_expand = cuda_backend.EXPAND_KERNEL
    try:
        for kind in ("flat", "rows"):
            cuda_backend.EXPAND_KERNEL = kind

            def expand():
                cuda_backend._expand(planes[0], scales[0], 1, False, 0, torch.float16, k)

            row[f"expand_{kind}_us"] = gpu_time_us(expand, warmup=3, iters=iters, flush=flush)
    finally:
        cuda_backend.EXPAND_KERNEL = default_expand
    row["expand_floor_us"] = None  # filled by main from the copy bandwidth
    return row


def markdown(report: dict) -> str:
    lines = [
        f"# Binary-delta matmul on {report['device']}",
        "",
        f"Copy bandwidth (read + write): {report['copy_bandwidth_GBps']:.0f} GB/s. "
        "Times are medians of CUDA-event timings, L2 flushed before each call.",
        "",
        "## Decode (1 row per tenant, fp16)",
        "",
        "| N=K | B | kernel µs | naive bmm µs | speedup | floor µs | kernel/floor | host call µs "
        "| per call in a CUDA graph µs | autotuned µs | tuned choice | tuned speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r.get("kind") == "decode" and "kernel_us" in r:
            ratio = f"{r['kernel_over_floor']:.2f}" + (
                "" if r["floor_counts"] else " (floor < 20 µs)"
            )
            lines.append(
                f"| {r['N']} | {r['B']} | {r['kernel_us']:.1f} | {r['naive_bmm_fp16_us']:.1f} | "
                f"{r['speedup_vs_naive']:.1f}x | {r['memory_floor_us']:.1f} | {ratio} | "
                f"{r['host_call_us']:.1f} | {r.get('graph_call_us', float('nan')):.1f} | "
                f"{r.get('tuned_us', float('nan')):.1f} | {r.get('tuned_choice', '-')} | "
                f"{r.get('tuned_speedup_vs_naive', float('nan')):.1f}x |"
            )
    lines += [
        "",
        f"## Prefill (M = {PREFILL_ROWS}, fp16)",
        "",
        "One tenant: the default prefill path, the expansion alone, the overlapped expansion, "
        "the fused GEMM with 128- and 64-row tiles, and a dense fp16 GEMM of the same shape; then 4 tenants x "
        f"{PREFILL_ROWS // 4} rows in one call; last, path='auto' with autotuning on.",
        "",
        "| N=K | default path | µs | of which expansion µs | overlapped µs | fused 128 µs "
        "| fused 64 µs | dense fp16 GEMM µs | default/dense | overlapped/dense | fused 128/dense "
        "| fused 64/dense | 4 tenants expand µs | 4 tenants overlapped µs | 4 tenants fused µs "
        "| autotuned µs | tuned choice | tuned/dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r.get("kind") == "prefill" and "kernel_us" in r:
            lines.append(
                f"| {r['N']} | {r.get('prefill_kernel', 'expand')} | {r['kernel_us']:.1f} "
                f"| {r['expand_us']:.1f} | {r.get('overlap_us', float('nan')):.1f} "
                f"| {r.get('gemm128_us', float('nan')):.1f} "
                f"| {r.get('gemm64_us', float('nan')):.1f} | {r['dense_fp16_gemm_us']:.1f} "
                f"| {r['kernel_over_dense']:.2f} | {r.get('overlap_over_dense', float('nan')):.2f} "
                f"| {r.get('gemm128_over_dense', float('nan')):.2f} "
                f"| {r.get('gemm64_over_dense', float('nan')):.2f} "
                f"| {r.get('tenants4_expand_us', float('nan')):.1f} "
                f"| {r.get('tenants4_overlap_us', float('nan')):.1f} "
                f"| {r.get('tenants4_gemm_us', float('nan')):.1f} "
                f"| {r.get('tuned_us', float('nan')):.1f} | {r.get('tuned_choice', '-')} "
                f"| {r.get('tuned_over_dense', float('nan')):.2f} |"
            )
    variants = [r for r in report["results"] if r.get("kind") == "variant" and "N" in r]
    if variants:
        lines += [
            "",
            "## Variants (same inputs; the defaults are set in qdelta/kernels/cuda.py)",
            "",
            "| N=K | B=16 tables µs | + L2 128-byte lines µs | + next-slice prefetch µs "
            "| same, 1 block/SM plan µs | B=16 narrow tiles µs | B=16 mma µs "
            "| B=1 mma µs | B=1 mma + x prep µs | B=1 tables µs | expand flat µs | expand rows µs "
            "| expand floor µs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        nan = float("nan")
        for r in variants:
            lut = [r.get(variant_key(*v), nan) for v in LUT_VARIANTS]
            lines.append(
                f"| {r['N']} | "
                + " | ".join(f"{t:.1f}" for t in lut)
                + f" | {r.get('decode_B16_lut-narrow_us', nan):.1f} "
                + f"| {r.get('decode_B16_mma_us', nan):.1f} | {r['decode_B1_mma_us']:.1f} "
                + f"| {r.get('decode_B1_mma_prep_us', nan):.1f} "
                f"| {r['decode_B1_decode_us']:.1f} | {r['expand_flat_us']:.1f} "
                f"| {r['expand_rows_us']:.1f} | {r['expand_floor_us']:.1f} |"
            )
    failed = [r for r in report["results"] if "error" in r]
    if failed:
        lines += ["", "## Failed or skipped", ""]
        lines += [f"- {r['kind']} {r.get('config')}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and table")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting new configs")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    if not torch.cuda.is_available():
        report.update(device="none", error="no CUDA device")
        write_text_atomic(args.out / "bench_delta_gpu.json", json.dumps(report, indent=2))
        print("bench_delta_gpu: no CUDA device; nothing measured")
        return 0
    from qdelta.kernels import cuda as cuda_backend

    if not cuda_backend.available():
        report.update(device=torch.cuda.get_device_name(), error="cupy is not importable")
        write_text_atomic(args.out / "bench_delta_gpu.json", json.dumps(report, indent=2))
        print("bench_delta_gpu: cupy is not importable; nothing measured")
        return 1
    started = time.monotonic()
    report["device"] = torch.cuda.get_device_name()
    report["torch"] = torch.__version__
    bandwidth = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bandwidth / 1e9
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    report["results"] = results = []
    configs = [("decode", (n, b)) for n in DECODE_SIZES for b in DECODE_TENANTS]
    configs += [("prefill", (n,)) for n in DECODE_SIZES]
    configs += [("variant", (n,)) for n in DECODE_SIZES]
    for kind, config in configs:
        if time.monotonic() - started > args.budget_s:
            results.append({"kind": kind, "config": config, "error": "skipped: time budget"})
            continue
        try:
            if kind == "decode":
                row = bench_decode(cuda_backend, *config, bandwidth, flush, args.iters)
            elif kind == "variant":
                row = bench_variants(cuda_backend, *config, flush, args.iters)
                n = config[0]
                # Bytes written (fp16 dense) + packed bytes read, at copy bandwidth.
                row["expand_floor_us"] = (2 * n * n + n * n / 8) / bandwidth * 1e6
            else:
                row = bench_prefill(cuda_backend, *config, flush, args.iters)
        except Exception as exc:
            traceback.print_exc()
            row = {"kind": kind, "config": config, "error": f"{type(exc).__name__}: {exc}"}
            torch.cuda.empty_cache()
        row["device"] = report["device"]
        results.append(row)
        print(json.dumps(row), flush=True)
    report["seconds"] = time.monotonic() - started
    write_text_atomic(args.out / "bench_delta_gpu.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_text_atomic(args.out / "bench_delta_gpu.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
