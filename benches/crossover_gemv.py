"""Where "auto" stops using the Rust kernel: rows M at which the reference's
dense path (unpack the planes in torch, then one BLAS matmul) catches up with
the Rust delta matmul. Writes benches/results/gemv_crossover.json.

    PYTHONPATH=python .venv/bin/python benches/crossover_gemv.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import machine_info  # benches/conftest.py: the CPU the numbers came from
from qdelta import reference
from qdelta.atomic_io import write_text_atomic
from qdelta.kernels import cpu
from qdelta.kernels import reference as dense_path


def median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


def main() -> None:
    rows = []
    for n in (512, 1024, 2048):
        planes, scales = reference.pack_residual(torch.randn(n, n), 1, "matrix")
        for m in (64, 256, 1024, 2048, 4096):
            x = torch.randn(m, n)
            args = (x, planes, scales)
            rust = median_ms(lambda args=args: cpu.delta_matmul(*args))
            ref = median_ms(lambda args=args: dense_path.delta_matmul(*args))
            rows.append({"shape": [n, n], "rows": m, "rust_ms": rust, "reference_ms": ref})
            print(f"{n}x{n} M={m}: rust {rust:.1f} ms, reference {ref:.1f} ms, {ref / rust:.2f}x")
    out = Path("benches/results/gemv_crossover.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {**machine_info(), "torch_threads": torch.get_num_threads()}
    write_text_atomic(out, json.dumps({"machine": machine, "isa": cpu.ISA, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
