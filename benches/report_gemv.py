"""The delta GEMV table for the README from a pytest-benchmark JSON file."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    groups: dict[str, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        if b["name"].startswith(("test_gemv_", "test_multitenant_")):
            kind = b["name"].split("[")[0].rsplit("_", 1)[-1]  # qdelta / torch
            groups.setdefault(b["group"], {})[kind] = b
    if not groups:
        return
    machine = data["machine_info"].get("qdelta_machine", {})
    extra = next(iter(next(iter(groups.values())).values()))["extra_info"]
    print(
        f"machine: {machine.get('cpu')} ({machine.get('cores')} cores); kernel ISA "
        f"{extra.get('isa')}; torch {extra.get('torch_threads')} threads, "
        f"OPENBLAS_CORETYPE={extra.get('openblas_coretype') or 'unset'}\n"
    )
    print(
        "| case | qdelta median ms | torch dense fp32 median ms | speed-up (median) "
        "| speed-up (min) |"
    )
    print("|---|---:|---:|---:|---:|")
    for group, rows in sorted(groups.items()):
        if {"qdelta", "torch"} <= rows.keys():
            q, t = rows["qdelta"]["stats"], rows["torch"]["stats"]
            print(
                f"| {group} | {q['median'] * 1e3:.3f} | {t['median'] * 1e3:.3f} "
                f"| {t['median'] / q['median']:.1f}x | {t['min'] / q['min']:.1f}x |"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benches/results/gemv.json")
