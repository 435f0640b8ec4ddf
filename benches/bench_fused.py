"""The fused decode-sized multi-tenant linear (src/fused.rs) against what it
replaces: torch's ``F.linear`` for the base, then the delta kernel adding every
row's delta into its output. 8 tenants (1 plane, row scales), each row its own
tenant, one torch thread, the two sides interleaved in rounds (median kept).

Writes benches/results/fused.json and prints a markdown table. Run by
``make bench``, or ``PYTHONPATH=python .venv/bin/python benches/bench_fused.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from benches.conftest import machine_info  # noqa: E402

from qdelta import _core  # noqa: E402
from qdelta.atomic_io import write_text_atomic  # noqa: E402

TENANTS = 8
#: (out, in) of the zoo model's layers and a larger one; rows 1..64 around the
#: fused path's limit (qdelta.multitenant.FUSED_MAX_ROWS = 16).
SHAPES = [(128, 128), (352, 128), (1024, 1024)]
ROWS = [1, 8, 16, 32, 64]
ROUNDS = 7


def case(n: int, k: int, m: int, rng: np.random.Generator) -> dict:
    words = -(-k // 32)
    planes = rng.integers(0, 2**32, size=(TENANTS, 1, n, words), dtype=np.uint32)
    scales = rng.random((TENANTS, 1, n), dtype=np.float32)
    ids = np.arange(m, dtype=np.int64) % TENANTS
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    xa, wa = x.numpy(), w.numpy()
    out = np.zeros((m, n), np.float32)

    def fused():
        _core.fused_linear(xa, wa, None, planes, scales, ids, out)

    def separate():
        y = torch.nn.functional.linear(x, w)
        _core.delta_matmul(xa, "float32", planes, scales, ids, None, y.numpy())
        return y

    fused()
    want = separate().numpy()
    assert np.allclose(out, want, rtol=1e-4, atol=1e-3), "fused and separate disagree"
    calls = max(3, int(2e5 / (m * n * k / 1e3 + 20)))  # about 0.1-0.3 s per side
    times = {"fused": [], "separate": []}
    for _ in range(ROUNDS):
        for name, fn in (("fused", fused), ("separate", separate)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    fused_us, separate_us = (float(np.median(times[s])) * 1e6 for s in ("fused", "separate"))
    return {
        "out": n,
        "in": k,
        "rows": m,
        "fused_us": fused_us,
        "linear_then_delta_us": separate_us,
        "speedup": separate_us / fused_us,
    }


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    results = [case(n, k, m, rng) for n, k in SHAPES for m in ROWS]
    report = {"machine": machine_info(), "torch_threads": 1, "tenants": TENANTS,
              "rounds": ROUNDS, "results": results}  # fmt: skip
    out = ROOT / "benches" / "results"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "fused.json", json.dumps(report, indent=2))
    m = report["machine"]
    print(f"fused multi-tenant linear, {m['cpu']} ({m['cores']} cores), torch threads 1\n")
    print("| layer | rows | fused us | F.linear + delta us | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['out']}x{r['in']} | {r['rows']} | {r['fused_us']:.1f} | "
              f"{r['linear_then_delta_us']:.1f} | {r['speedup']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
