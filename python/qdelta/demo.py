"""`qdelta demo` / `make demo`: the main job, end to end on models built here.

zoo (base + fine-tunes, built offline and cached) -> compress every tenant
(1-bit and 2-bit with initial and distilled scales, 3-bit residual planes) ->
perplexity table -> one batch mixing tenants served from one base + deltas,
checked token for token against each tenant's merged dense model -> memory
table for N tenants measured from the runtime's tensors (and a 7B Llama's
arithmetic) -> PNG plots. Everything lands in ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qdelta.atomic_io import write_text_atomic
from qdelta.compress import compress
from qdelta.memory import LLAMA_7B, LlamaShape, llama_serving_bytes
from qdelta.nn import merge
from qdelta.optional import require
from qdelta.plots import plot_memory, plot_quality
from qdelta.runtime import MultiTenantModel, left_padded
from qdelta.store import DeltaStore
from qdelta.store_cli import printable
from qdelta.zoo import Zoo, ZooConfig, build_zoo
from qdelta.zoo_eval import (
    check_result_paths,
    default_distill_steps,
    evaluate_into,
    fp16_bytes,
)

TENANT_COUNTS = (1, 2, 4, 8, 16, 32, 64)


SAMPLES_PER_TENANT = 3


def _prompts(zoo: Zoo, domain: str, count: int, length: int = 32) -> list[list[int]]:
    """``count`` prompts from lines spread over the domain's held-out text (lengths vary,
    so the batch is really left-padded)."""
    lines = [ln.strip() for ln in zoo.eval_texts[domain].splitlines() if len(ln.strip()) >= 12]
    if not lines:
        lines = [zoo.eval_texts[domain].strip() or " "]
    picks = [lines[(k * len(lines)) // count] for k in range(count)]
    return [zoo.tokenizer.encode(line[:length], bos=True) for line in picks]


@torch.no_grad()
def _greedy_dense(model, prompt: list[int], steps: int) -> list[int]:
    """Plain greedy decode without cache or padding: the independent check."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def mixed_batch(
    zoo: Zoo, store: DeltaStore, *, new_tokens: int, progress: bool = False
) -> list[dict]:
    """One left-padded batch, rows of different tenants and the base, one forward per step."""
    names = sorted(zoo.tenants)
    per_tenant = {n: _prompts(zoo, zoo.tenants[n].domain, SAMPLES_PER_TENANT) for n in names}
    # Round-robin, so rows of one tenant are never adjacent; one base row in the middle.
    rows: list[str | None] = []
    prompts: list[list[int]] = []
    for k in range(SAMPLES_PER_TENANT):
        for n in names:
            rows.append(n)
            prompts.append(per_tenant[n][k])
        if k == 0:
            rows.append(None)
            prompts.append(_prompts(zoo, zoo.domains[0], 1)[0])
    ids, mask = left_padded(prompts, zoo.tokenizer.pad_id)
    base = zoo.load("base")
    served = MultiTenantModel(copy.deepcopy(base), store, tenants=names)
    out = served.generate(ids, rows, new_tokens, attention_mask=mask)
    samples = []
    checks = tqdm(
        list(enumerate(zip(rows, prompts, strict=True))),
        desc="check rows vs merged dense models",
        disable=not progress,
    )
    for i, (tenant, prompt) in checks:
        dense = copy.deepcopy(base)
        if tenant is not None:
            merge(dense, store.open(tenant).to_delta())
        want = _greedy_dense(dense.eval(), prompt, new_tokens)
        got = out.tokens[i].tolist()
        samples.append(
            {
                "tenant": tenant or "(base)",
                "prompt": zoo.tokenizer.decode(prompt),
                "completion": zoo.tokenizer.decode(got),
                "matches_merged_dense_model": got == want,
            }
        )
    return samples


def _measure_serving(base16, deltas: dict, full: dict, progress: bool, desc: str) -> list[dict]:
    """Resident bytes of the runtime with N tenants loaded (cycling through ``deltas``)."""
    names = sorted(deltas)
    measured = []
    for n in tqdm(TENANT_COUNTS, desc=desc, disable=not progress):
        picks = [names[i % len(names)] for i in range(n)]
        served = MultiTenantModel(
            copy.deepcopy(base16), tenants={f"{p}#{i}": deltas[p] for i, p in enumerate(picks)}
        )
        served.preload(served.tenants)
        mem = served.memory()
        total_full = sum(full[p] for p in picks)
        resident = mem["base_bytes"] + mem["tenant_bytes"]
        measured.append(
            {
                "n": n,
                "full_models_bytes": total_full,
                "base_plus_deltas_bytes": resident,
                "ratio": total_full / resident,
                **mem,
            }
        )
    return measured


def memory_table(zoo: Zoo, progress: bool = False) -> dict:
    """Resident bytes of one fp16 base + N 1-bit deltas (the runtime's own tensors, N
    tenants loaded, cycling through the zoo's fine-tunes) vs N full fp16 models, with
    embeddings and head kept whole (BitDelta) and packed too; plus a 7B Llama's
    arithmetic. The deltas are made against the fp16 base that serves them (a delta
    is bound to the exact bytes of its base)."""
    base16 = zoo.load("base", dtype=torch.float16)
    full, whole, packed = {}, {}, {}
    for n in sorted(zoo.tenants):
        ft16 = zoo.load(n, dtype=torch.float16)
        full[n] = fp16_bytes(ft16.state_dict().values())
        whole[n] = compress(base16, ft16, bits=1, tenant=n)
        packed[n] = compress(base16, ft16, bits=1, tenant=n, compress_embeddings=True)
    shape = LlamaShape(**LLAMA_7B)
    llama = {
        "embeddings_whole": [llama_serving_bytes(shape, n) for n in TENANT_COUNTS],
        "embeddings_packed": [
            llama_serving_bytes(shape, n, pack_embeddings=True) for n in TENANT_COUNTS
        ],
    }
    return {
        "zoo": _measure_serving(base16, whole, full, progress, "memory for N tenants"),
        "zoo_embeddings_packed": _measure_serving(
            base16, packed, full, progress, "memory, embeddings packed"
        ),
        "llama_7b": llama,
    }


def _memory_lines(table: dict) -> list[str]:
    lines = [
        f"{'N':>3} {'N full fp16 MiB':>16} {'base+N deltas MiB':>18} {'ratio':>7} "
        f"{'(emb packed)':>13}   {'7B ratio (emb whole)':>20} {'7B ratio (emb packed)':>21}"
    ]
    for zoo_row, zoo_packed, whole, packed in zip(
        table["zoo"],
        table["zoo_embeddings_packed"],
        table["llama_7b"]["embeddings_whole"],
        table["llama_7b"]["embeddings_packed"],
        strict=True,
    ):
        lines.append(
            f"{zoo_row['n']:>3} {zoo_row['full_models_bytes'] / 2**20:>16.2f} "
            f"{zoo_row['base_plus_deltas_bytes'] / 2**20:>18.2f} {zoo_row['ratio']:>6.2f}x "
            f"{zoo_packed['ratio']:>12.2f}x   {whole['ratio']:>19.2f}x {packed['ratio']:>20.2f}x"
        )
    return lines


def ring_check(zoo: Zoo, world_size: int = 2, layout: str = "zigzag") -> dict:
    """The zoo's base with its attention run as ring attention over ``world_size``
    gloo processes on held-out code text as long as its position table allows,
    against one ordinary forward."""
    from qdelta.ring.demo import run_ring_demo

    base = zoo.load("base")
    length = base.config.max_position_embeddings
    ids = zoo.tokenizer.encode(zoo.eval_texts[zoo.domains[0]], bos=True)[:length]
    return run_ring_demo(
        world_size=world_size,
        layout=layout,
        model_dir=str(zoo.base_dir),
        input_ids=torch.tensor([ids]),
    )


#: What the demo writes into --out besides demo.json (and the deltas/ store).
RESULT_FILES = ("quality.json", "quality.png", "memory.png", "memory_7b.png")


def run_demo(
    out_dir: str | Path = "results",
    *,
    tiny: bool = False,
    cache_dir: str | Path | None = None,
    distill_steps: int | None = None,
    new_tokens: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the whole demo; returns (and writes to ``out_dir/demo.json``) every number."""
    started = time.perf_counter()
    out = check_result_paths(out_dir, [*RESULT_FILES, "demo.json"])
    require("matplotlib", "qdelta demo's plots")  # the last step: missing it, fail first
    config = ZooConfig.tiny(seed) if tiny else ZooConfig.default(seed)
    steps = distill_steps if distill_steps is not None else default_distill_steps(tiny)
    print(f"[1/6] model zoo ({'tiny' if tiny else 'default'} configuration)", flush=True)
    zoo = build_zoo(config, cache_dir, progress=progress)
    print(f"      {printable(zoo.root)} ({'built now' if zoo.built else 'from cache'})", flush=True)

    print(f"[2/6] compress {len(zoo.tenants)} tenants, distill scales ({steps} steps), evaluate")
    rows, details, store = evaluate_into(
        out, zoo, distill_steps=steps, seed=seed, progress=progress
    )

    print("[3/6] one mixed batch: every tenant and the base from one base + deltas", flush=True)
    samples = mixed_batch(zoo, store, new_tokens=new_tokens, progress=progress)
    for s in samples:
        check = "same as merged dense model" if s["matches_merged_dense_model"] else "DIFFERS"
        print(f"  [{s['tenant']}] {s['prompt']!r} -> {s['completion']!r} ({check})")

    print("[4/6] memory: N full models vs one base + N deltas", flush=True)
    memory = memory_table(zoo, progress=progress)
    print("\n".join(_memory_lines(memory)), flush=True)

    print("[5/6] ring attention: the base over 2 CPU processes vs one process", flush=True)
    ring = ring_check(zoo)
    # Sliding windows too: a random Mistral whose window ends the ring's turn early.
    from qdelta.ring.demo import run_ring_demo

    ring_window = run_ring_demo(
        world_size=3, seq_len=600, layout="contiguous", seed=seed, sliding_window=128
    )

    print("[6/6] plots", flush=True)
    plots = {
        "quality": str(plot_quality(rows, out / "quality.png")),
        "memory": str(
            plot_memory(
                memory["zoo"],
                out / "memory.png",
                "zoo model, fp16",
                packed=memory["zoo_embeddings_packed"],
            )
        ),
        "memory_7b": str(
            plot_memory(memory["llama_7b"]["embeddings_whole"], out / "memory_7b.png", "7B Llama")
        ),
    }
    result = {
        "zoo": {"root": str(zoo.root), "built_now": zoo.built, "config": config.to_dict()},
        "distill_steps": steps,
        "quality": [asdict(r) for r in rows],
        "tenants": details,
        "mixed_batch": samples,
        "memory": memory,
        "ring": ring,
        "ring_sliding_window": ring_window,
        "plots": plots,
        "seconds": time.perf_counter() - started,
    }
    write_text_atomic(out / "demo.json", json.dumps(result, indent=2))
    print(f"\nresults: {printable(out)} (demo.json, quality.json, *.png, deltas/)")
    print(f"done in {result['seconds']:.0f} s")
    return result
