"""Open a store of many tenant files and read one layer from each, vs a full
``safetensors.numpy.load_file`` of the same files (and, for reference, the
lazy ``safetensors.safe_open``).

Run: ``make bench`` or ``PYTHONPATH=python python benches/bench_store.py``.
Writes benches/results/store.json. The files are created in a temporary
directory (TENANTS x ~10.5 MB; 200 tenants = 2.1 GB) and deleted afterwards.
Timings are with the files in the page cache (they were just written), so
they measure work done, not disk speed. "qdelta" opens each file and reads
(sums) one 512 KiB layer; "qdelta_open_only" opens and sets up the views
without touching data; both baselines read the same layer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

import qdelta
from qdelta.atomic_io import write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))
from conftest import machine_info


def make_store(directory: Path, tenants: int, layers: int, dim: int) -> qdelta.DeltaStore:
    store = qdelta.DeltaStore(directory)
    rng = np.random.default_rng(0)
    words = qdelta.words_per_row(dim)
    for t in range(tenants):
        delta = qdelta.Delta(
            layers={
                f"model.layers.{i}.mlp.proj": qdelta.PackedLayer(
                    planes=rng.integers(0, 2**32, size=(1, dim, words), dtype=np.uint32),
                    scales=rng.random((1, dim), dtype=np.float32),
                    shape=(dim, dim),
                )
                for i in range(layers)
            },
            params={},
            base_fingerprint="0" * 32,
        )
        store.add(f"tenant-{t:04d}", delta)
    return store


def run_qdelta(directory: Path, layer: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    store = qdelta.DeltaStore(directory)
    first, checksum = None, 0
    for name in store.tenants():
        planes = store.open(name).layer(layer).planes
        checksum ^= int(planes[0, -1].sum(dtype=np.uint64)) ^ int(planes.sum(dtype=np.uint64))
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, checksum


def run_qdelta_open_only(directory: Path, layer: str) -> tuple[float, float, int]:
    """Open every file and set up the layer's views, touching no tensor data."""
    t0 = time.perf_counter()
    store = qdelta.DeltaStore(directory)
    first, shapes = None, 0
    for name in store.tenants():
        shapes += store.open(name).layer(layer).planes.shape[1]
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, shapes


def run_load_file(directory: Path, layer: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first, checksum = None, 0
    for path in sorted(directory.glob("*.qdelta")):
        planes = load_file(str(path))[f"{layer}.qdelta_planes"]
        checksum ^= int(planes[0, -1].sum(dtype=np.uint64)) ^ int(planes.sum(dtype=np.uint64))
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, checksum


def run_safe_open(directory: Path, layer: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first, checksum = None, 0
    for path in sorted(directory.glob("*.qdelta")):
        with safe_open(str(path), framework="np") as f:
            planes = f.get_tensor(f"{layer}.qdelta_planes")
        checksum ^= int(planes[0, -1].sum(dtype=np.uint64)) ^ int(planes.sum(dtype=np.uint64))
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, checksum


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root on Linux), so the next read comes from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--layers", type=int, default=20, help="layers per file")
    parser.add_argument("--dim", type=int, default=2048, help="each layer is dim x dim, 1 bit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="where to create the files")
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before every method's run"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "store.json"))
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="qdelta-bench-store-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        store = make_store(directory, args.tenants, args.layers, args.dim)
        build_s = time.perf_counter() - t0
        file_bytes = store.open(store.tenants()[0]).nbytes
        layer = f"model.layers.{args.layers // 2}.mlp.proj"
        runs: dict[str, list[tuple[float, float, int, float]]] = {
            "qdelta": [],
            "qdelta_open_only": [],
            "load_file": [],
            "safe_open": [],
        }
        for _ in range(args.repeats):  # interleaved, so drift hits every method alike
            for method, fn in (
                ("qdelta", run_qdelta),
                ("qdelta_open_only", run_qdelta_open_only),
                ("load_file", run_load_file),
                ("safe_open", run_safe_open),
            ):
                if args.cold and not drop_page_cache():
                    print("bench_store: --cold needs root on Linux (drop_caches); skipped")
                    return
                c0 = time.process_time()
                first, total, check = fn(directory, layer)
                runs[method].append((first, total, check, time.process_time() - c0))
        checks = {r[2] for m, rs in runs.items() if m != "qdelta_open_only" for r in rs}
        assert len(checks) == 1, "every method must read the same bytes"
        result = {
            "machine": machine_info(),
            "tenants": args.tenants,
            "file_bytes": file_bytes,
            "layer_bytes": args.dim * qdelta.words_per_row(args.dim) * 4,
            "build_seconds": build_s,
            "page_cache": "cold (dropped before each method's run)"
            if args.cold
            else "warm (files just written)",
            "repeats": args.repeats,
        }
        for method, rs in runs.items():
            result[method] = {
                "first_tensor_ms": statistics.median(r[0] for r in rs) * 1e3,
                "total_ms": statistics.median(r[1] for r in rs) * 1e3,
                "total_cpu_ms": statistics.median(r[3] for r in rs) * 1e3,
            }
        for method in ("load_file", "safe_open"):
            result[f"speedup_vs_{method}"] = {
                k: result[method][k] / result["qdelta"][k]
                for k in ("first_tensor_ms", "total_ms", "total_cpu_ms")
            }
        result["open_only_speedup_vs_load_file"] = {
            k: result["load_file"][k] / result["qdelta_open_only"][k]
            for k in ("total_ms", "total_cpu_ms")
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
