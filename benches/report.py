"""Turn a pytest-benchmark JSON file into the ratio table the README shows."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        kind = b["name"].split("[")[0].rsplit("_", 1)[-1]  # qdelta / packbits / ceiling ...
        groups[b["group"]][kind] = b
    machine = data["machine_info"].get("qdelta_machine", {})
    print(f"machine: {machine.get('cpu')} ({machine.get('cores')} cores)\n")
    print("| op | qdelta ms | numpy ms | copy ms | vs numpy | % of copy bandwidth |")
    print("|---|---:|---:|---:|---:|---:|")
    for group, rows in sorted(groups.items()):
        if not {"qdelta", "ceiling"} <= rows.keys():
            continue  # other benches have their own report script
        q = rows["qdelta"]["stats"]["median"]
        base = next(v for k, v in rows.items() if k in ("packbits", "unpackbits"))["stats"][
            "median"
        ]
        copy = rows["ceiling"]["stats"]["median"]
        print(
            f"| {group} | {q * 1e3:.2f} | {base * 1e3:.2f} | {copy * 1e3:.2f} "
            f"| {base / q:.1f}x | {100 * copy / q:.0f}% |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benches/results/latest.json")
