"""Host cost of one CUDA-path call in Python, measured without a GPU.

The CUDA paths' host code (validation, launch plans, argument packing) runs for
every call; on the H200 a decode call cost about 110 µs on the host against
45 µs on the GPU. This benchmark runs the real host code of
qdelta.kernels.cuda on CPU tensors with a runtime whose launches only check the
grid, so it times the Python side alone: what the launch caches save, on this
machine. cupy's own launch cost is not included (it needs a GPU; the GPU
benchmark's host column has it). Writes benches/results/host_cuda.json.

    python benches/bench_host_cuda.py --out benches/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qdelta.atomic_io import write_text_atomic
from qdelta.kernels import cuda as cuda_backend
from qdelta.kernels import emulator


class LaunchFreeRuntime(emulator.EmulatorRuntime):
    """The emulator's runtime (CPU tensors are "on the device") minus the kernels."""

    def launch(self, kernel, device, name, grid, block, args, shared_mem) -> None:
        cuda_backend._check_grid(name, grid)

    def module(self, index, source, options, names):
        return _NoModule()


class _NoModule:
    def get_function(self, name: str):
        return name


# The per-shape launch caches a path reuses across calls.
CACHES = {"decode": cuda_backend._lut_launches, "mma": cuda_backend._mma_launches}


def per_call_us(fns, calls: int, rounds: int) -> list[tuple[float, list[float]]]:
    """Median µs per call of each function, timed in interleaved rounds.

    This machine's speed drifts with its neighbours' load; interleaving keeps a
    drift from landing on one side of the comparison only.
    """
    for fn in fns:
        for _ in range(50):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples, strict=True):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - t0) / calls * 1e6)
    return [(statistics.median(s), s) for s in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benches/results"))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    n = k = 4096
    rows = []
    before = cuda_backend.RUNTIME
    cuda_backend.RUNTIME = LaunchFreeRuntime()
    try:
        for path, tenants, m in (("decode", 16, 16), ("mma", 1, 1), ("gemm", 4, 512)):
            planes = torch.zeros(tenants, 1, n, k // 32, dtype=torch.int32)
            scales = torch.full((tenants, 1), 0.01)
            x = torch.zeros(m, k, dtype=torch.float16)
            ids = torch.arange(m) % tenants
            out = torch.empty(m, n, dtype=torch.float16)

            def call(path=path, planes=planes, scales=scales, x=x, ids=ids, out=out):
                cuda_backend.multi_tenant_delta_matmul(
                    x, planes, scales, ids, out=out, check_ids=False, path=path
                )

            calls = args.calls if m < 100 else 200
            cache = CACHES.get(path)
            fns = [call]
            if cache is not None:  # side by side: the launch arguments rebuilt every call

                def uncached(call=call, cache=cache):
                    cache.cache_clear()
                    call()

                fns.append(uncached)
            timed = per_call_us(fns, calls, args.rounds)
            median, samples = timed[0]
            row = {"path": path, "rows": m, "tenants": tenants, "N": n, "K": k,
                   "host_us_per_call": median, "samples_us": samples}  # fmt: skip
            if cache is not None:
                row["host_us_per_call_rebuilt"], row["samples_rebuilt_us"] = timed[1]
                row["cache_speedup"] = row["host_us_per_call_rebuilt"] / median
            rows.append(row)
            extra = (
                f" (rebuilt every call: {row['host_us_per_call_rebuilt']:.1f} µs)" if cache else ""
            )
            print(f"{path:7s} M={m:4d} T={tenants:2d}: {median:6.1f} µs per call{extra}")
    finally:
        cuda_backend.RUNTIME = before
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": "Python host code only (launches replaced by the grid check); median of rounds",
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "host_cuda.json"
    write_text_atomic(path, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
