"""The cost of loading one more tenant, with few or many already resident.

Side by side in one run, on the same tenants: stacks that grow into spare rows
and move one row on a removal (qdelta now) vs copying every tenant's rows on
each load and each removal (how the stacks worked before: patched in through
qdelta.stacks for the comparison). Two levels:

- one MultiTenantLinear 1024x1024 (128 KiB of 1-bit planes a tenant), LOADS
  tenants loaded one by one;
- a MultiTenantModel over a small Llama (every linear 1-bit), one delta
  registered under RUNTIME_LOADS + CHURN names: RUNTIME_LOADS preloaded one by
  one, then CHURN more with the budget full, each evicting one.

- a MultiTenantModel over a small GPT-2 (LayerNorms, biased Conv1D linears):
  after each of RUNTIME_LOADS loads, the first routed batch (its per-batch
  tables: LayerNorm rows, bias changes) is timed; flat in the tenants resident
  when nothing per batch walks every tenant.

Each load is timed on its own; the tables give the median of the first and of
the last WINDOW loads, and of the evicting ones. Writes
benches/results/tenant_load.json and .md. Run by ``make bench``, or
``PYTHONPATH=python:. .venv/bin/python benches/bench_tenant_load.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from benches.conftest import machine_info  # noqa: E402
from tests.runtime_helpers import perturbed, tiny_llama  # noqa: E402

import qdelta  # noqa: E402
from qdelta import stacks  # noqa: E402
from qdelta.atomic_io import write_text_atomic  # noqa: E402

LOADS = 384
RUNTIME_LOADS = 256
WINDOW = 32
CHURN = 32
DIM = 1024
LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, vocab_size=512)
GPT2 = dict(n_embd=256, n_layer=4, n_head=4, vocab_size=512, n_positions=64)


def _restacked(stack: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The previous growth: every load copies the whole stack."""
    return torch.cat([stack, row[None]])


def _copied_without(stack: torch.Tensor, index: int) -> torch.Tensor:
    """The previous removal's cost: the whole stack copied into an exact buffer (the
    rows in the order the callers now keep: the last one moved into ``index``)."""
    order = [i for i in range(stack.shape[0] - 1)]
    if index < len(order):
        order[index] = stack.shape[0] - 1
    return stack[order]


#: (growth, removal) of each side.
STRATEGIES: dict[str, tuple[Callable, Callable]] = {
    "spare_rows": (stacks.appended, stacks.without),
    "restack_each_load": (_restacked, _copied_without),
}


@contextlib.contextmanager
def _strategy(name: str) -> Iterator[None]:
    stacks.appended, stacks.without = STRATEGIES[name]
    try:
        yield
    finally:
        stacks.appended, stacks.without = STRATEGIES["spare_rows"]


def _timed_loads(count: int, load: Callable[[int], None]) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        load(i)
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> dict:
    return {
        "first_ms": 1e3 * statistics.median(times[:WINDOW]),
        "last_ms": 1e3 * statistics.median(times[-WINDOW:]),
        "total_s": sum(times),
    }


def layer_loads(strategy: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(DIM, DIM, generator=gen)
    planes, scales = qdelta.pack_residual(delta, bits=1, scale="row")
    packed = qdelta.PackedLayer(planes, scales, (DIM, DIM))
    layer = qdelta.MultiTenantLinear(torch.nn.Linear(DIM, DIM))
    with _strategy(strategy):
        times = _timed_loads(LOADS, lambda i: layer.add_tenant(i, packed))
    result = _summary(times)
    result["stack_mb"] = layer.planes.numel() * 4 / 1e6
    result["reserved_mb"] = layer.planes.untyped_storage().nbytes() / 1e6
    return result


def runtime_loads(strategy: str, base: torch.nn.Module, delta: qdelta.Delta) -> dict:
    """RUNTIME_LOADS loads into room, then CHURN more under a budget that is full,
    each evicting the least recently used tenant (the serving steady state)."""
    names = [f"t{i}" for i in range(RUNTIME_LOADS + CHURN)]
    model = qdelta.MultiTenantModel(base)
    for name in names:
        model.add_tenant(name, delta)  # registered; each loads when preloaded below
    with _strategy(strategy):
        times = _timed_loads(RUNTIME_LOADS, lambda i: model.preload([names[i]]))
        memory = model.memory()
        model.budget_bytes = model.resident_bytes
        churn = _timed_loads(CHURN, lambda i: model.preload([names[RUNTIME_LOADS + i]]))
    assert model.memory()["tenants_loaded"] == RUNTIME_LOADS
    result = _summary(times)
    result["evicting_ms"] = 1e3 * statistics.median(churn)
    result["tenant_mb"] = memory["tenant_bytes"] / 1e6
    result["tenant_reserved_mb"] = memory["tenant_reserved_bytes"] / 1e6
    result["delta_kb"] = memory["tenant_bytes"] / RUNTIME_LOADS / 1e3
    return result


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**GPT2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def first_batches() -> dict:
    """The first routed batch after each load: 4 rows (the new tenant, an older
    one, the base, the first), 8 tokens each."""
    base = tiny_gpt2()
    delta = qdelta.compress(base, perturbed(base, 1), bits=1)
    names = [f"t{i}" for i in range(RUNTIME_LOADS)]
    model = qdelta.MultiTenantModel(tiny_gpt2())
    for name in names:
        model.add_tenant(name, delta)
    ids = torch.randint(0, GPT2["vocab_size"], (4, 8), generator=torch.Generator().manual_seed(0))
    times = []
    for i, name in enumerate(names):
        model.preload([name])
        rows = [name, names[i // 2], None, names[0]]
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, rows)
        times.append(time.perf_counter() - start)
    return _summary(times) | {"loads": RUNTIME_LOADS, "config": GPT2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the copy, not the thread count, is measured
    torch.manual_seed(0)
    base = tiny_llama(0, **LLAMA)
    delta = qdelta.compress(base, perturbed(base, 1), bits=1)
    report: dict = {"machine": machine_info(), "torch_threads": 1, "window": WINDOW}
    report["layer"] = {s: layer_loads(s) for s in STRATEGIES} | {"loads": LOADS, "dim": DIM}
    # Fresh base models: a MultiTenantModel swaps the modules of the one it wraps.
    report["runtime"] = {s: runtime_loads(s, tiny_llama(0, **LLAMA), delta) for s in STRATEGIES}
    report["runtime"] |= {"loads": RUNTIME_LOADS, "config": LLAMA}
    report["first_batch"] = first_batches()
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "tenant_load.json", json.dumps(report, indent=2))
    write_text_atomic(args.out / "tenant_load.md", _table(report))
    print(_table(report))


def _table(report: dict) -> str:
    lines = [
        f"Tenant load time, median of the first / last {report['window']} loads "
        f"(machine: {report['machine'].get('cpu', '?')}, 1 torch thread)",
        "",
        "| level | growth | first loads ms | last loads ms | last / first | total s |",
        "|---|---|---|---|---|---|",
    ]
    for level in ("layer", "runtime"):
        section = report[level]
        for strategy in STRATEGIES:
            r = section[strategy]
            lines.append(
                f"| {level} ({section['loads']} tenants) | {strategy} | {r['first_ms']:.2f} | "
                f"{r['last_ms']:.2f} | {r['last_ms'] / r['first_ms']:.1f}x | {r['total_s']:.2f} |"
            )
    layer, runtime = report["layer"], report["runtime"]
    ratio = layer["restack_each_load"]["total_s"] / layer["spare_rows"]["total_s"]
    lines += [
        "",
        f"Loading all {layer['loads']} layer tenants: {ratio:.1f}x faster.",
        "",
        f"With {runtime['loads']} tenants resident and the budget full, a load that "
        f"evicts one (median of {CHURN}): spare rows {runtime['spare_rows']['evicting_ms']:.1f} "
        f"ms, restacking {runtime['restack_each_load']['evicting_ms']:.1f} ms.",
    ]
    batch = report.get("first_batch")
    if batch is not None:
        lines += [
            "",
            f"Small GPT-2 (LayerNorms, biases), the first routed batch after each of "
            f"{batch['loads']} loads: {batch['first_ms']:.1f} ms with the first "
            f"{report['window']} tenants, {batch['last_ms']:.1f} ms with the last "
            f"({batch['last_ms'] / batch['first_ms']:.2f}x).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
