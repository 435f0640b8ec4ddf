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

from qdelta.compress import compress
from qdelta.delta import Delta
from qdelta.distill import distill
from qdelta.eval import ResultRow, format_table, perplexity, quality_rows, write_results
from qdelta.memory import LLAMA_7B, LlamaShape, llama_serving_bytes
from qdelta.nn import apply, merge, unapply
from qdelta.plots import plot_memory, plot_quality
from qdelta.runtime import MultiTenantModel
from qdelta.store import DeltaStore
from qdelta.zoo import Zoo, ZooConfig, build_zoo

TENANT_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def _fp16_bytes(tensors) -> int:
    """Bytes of tensors as served in fp16 (floating point at 2 bytes, others as they are)."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)


def _delta_fp16_bytes(delta: Delta) -> int:
    packed = sum(layer.nbytes for layer in delta.layers.values())
    return packed + _fp16_bytes(delta.params.values())


def _calibration(zoo: Zoo, domain: str) -> torch.Tensor:
    """Calibration tokens: the domain's *training* text (held-out text is never trained on)."""
    return torch.tensor(zoo.tokenizer.encode(zoo.train_texts[domain], bos=True))


def _ppl(model, zoo: Zoo, domain: str) -> float:
    cfg = zoo.config
    return perplexity(
        model,
        zoo.eval_texts[domain],
        zoo.tokenizer,
        window=cfg.eval_window,
        batch_size=cfg.eval_batch_size,
    ).ppl


def compress_and_evaluate(
    zoo: Zoo, store: DeltaStore, *, distill_steps: int, seed: int, progress: bool
) -> tuple[list[ResultRow], dict]:
    """Every tenant: five compressed variants, their perplexities, sizes; the distilled
    1-bit delta goes into ``store`` (what the runtime serves)."""
    base = zoo.load("base")
    base_ppl = {d: _ppl(base, zoo, d) for d in zoo.domains}
    rows: list[ResultRow] = []
    details: dict = {}
    for name, tenant in tqdm(zoo.tenants.items(), desc="tenants", disable=not progress):
        ft = zoo.load(name)
        ft_fp16 = _fp16_bytes(ft.state_dict().values())
        t0 = time.perf_counter()
        variants: dict[str, Delta] = {"bitdelta-init": compress(base, ft, bits=1, tenant=name)}
        result = distill(
            base,
            ft,
            variants["bitdelta-init"],
            _calibration(zoo, tenant.domain),
            steps=distill_steps,
            seed=seed,
            progress=progress,
        )
        variants["bitdelta-distilled"] = result.delta
        for bits in (2, 3):
            variants[f"{bits}-bit"] = compress(base, ft, bits=bits, tenant=name)
        variants["2-bit-distilled"] = distill(
            base,
            ft,
            variants["2-bit"],
            _calibration(zoo, tenant.domain),
            steps=distill_steps,
            seed=seed,
            progress=progress,
        ).delta
        seconds = time.perf_counter() - t0
        ppls = {"base": base_ppl[tenant.domain], "finetune": _ppl(ft, zoo, tenant.domain)}
        sizes = {}
        for variant, delta in variants.items():
            apply(base, delta)
            try:
                ppls[variant] = _ppl(base, zoo, tenant.domain)
            finally:
                unapply(base)
            nbytes = _delta_fp16_bytes(delta)
            sizes[variant] = {
                "bits": float(next(iter(delta.layers.values())).bits),
                "delta_bytes": nbytes,
                "compression": ft_fp16 / nbytes,
            }
        # Say what the tenant is (a full fine-tune, a merged LoRA, a soup) for `qdelta inspect`.
        variants["bitdelta-distilled"].metadata["source"] = tenant.kind
        store.add(name, variants["bitdelta-distilled"])
        rows += quality_rows(name, tenant.domain, ppls, sizes=sizes)
        details[name] = {
            "domain": tenant.domain,
            "kind": tenant.kind,
            "distill_loss_before": result.loss_before,
            "distill_loss_after": result.loss_after,
            "compress_seconds": seconds,
            "finetune_fp16_bytes": ft_fp16,
        }
    return rows, details


def _prompt(zoo: Zoo, domain: str, length: int = 24) -> list[int]:
    text = zoo.eval_texts[domain].lstrip()
    return zoo.tokenizer.encode(text[:length], bos=True)


@torch.no_grad()
def _greedy_dense(model, prompt: list[int], steps: int) -> list[int]:
    """Plain greedy decode without cache or padding: the independent check."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def mixed_batch(zoo: Zoo, store: DeltaStore, *, new_tokens: int) -> list[dict]:
    """One left-padded batch, rows of different tenants and the base, one forward per step."""
    names = sorted(zoo.tenants)
    rows: list[str | None] = [*names, None, names[0]]  # base row; a tenant twice, not adjacent
    prompts = [_prompt(zoo, zoo.tenants[n].domain if n else zoo.domains[0]) for n in rows]
    width = max(len(p) for p in prompts)
    pad = zoo.tokenizer.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    base = zoo.load("base")
    served = MultiTenantModel(copy.deepcopy(base), store, tenants=names)
    out = served.generate(ids, rows, new_tokens, attention_mask=mask)
    samples = []
    for i, (tenant, prompt) in enumerate(zip(rows, prompts, strict=True)):
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


def memory_table(zoo: Zoo) -> dict:
    """Resident bytes of one fp16 base + N 1-bit deltas (the runtime's own tensors, N
    tenants loaded, cycling through the zoo's fine-tunes) vs N full fp16 models; plus a
    7B Llama's arithmetic. The deltas are made against the fp16 base that serves them
    (a delta is bound to the exact bytes of its base)."""
    names = sorted(zoo.tenants)
    base16 = zoo.load("base", dtype=torch.float16)
    full, deltas = {}, {}
    for n in names:
        ft16 = zoo.load(n, dtype=torch.float16)
        full[n] = _fp16_bytes(ft16.state_dict().values())
        deltas[n] = compress(base16, ft16, bits=1, tenant=n)
    measured = []
    for n in TENANT_COUNTS:
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
    shape = LlamaShape(**LLAMA_7B)
    llama = {
        "embeddings_whole": [llama_serving_bytes(shape, n) for n in TENANT_COUNTS],
        "embeddings_packed": [
            llama_serving_bytes(shape, n, pack_embeddings=True) for n in TENANT_COUNTS
        ],
    }
    return {"zoo": measured, "llama_7b": llama}


def _memory_lines(table: dict) -> list[str]:
    lines = [
        f"{'N':>3} {'N full fp16 MiB':>16} {'base+N deltas MiB':>18} {'ratio':>7}   "
        f"{'7B ratio (emb whole)':>20} {'7B ratio (emb packed)':>21}"
    ]
    for zoo_row, whole, packed in zip(
        table["zoo"],
        table["llama_7b"]["embeddings_whole"],
        table["llama_7b"]["embeddings_packed"],
        strict=True,
    ):
        lines.append(
            f"{zoo_row['n']:>3} {zoo_row['full_models_bytes'] / 2**20:>16.2f} "
            f"{zoo_row['base_plus_deltas_bytes'] / 2**20:>18.2f} {zoo_row['ratio']:>6.2f}x   "
            f"{whole['ratio']:>19.2f}x {packed['ratio']:>20.2f}x"
        )
    return lines


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
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = ZooConfig.tiny(seed) if tiny else ZooConfig.default(seed)
    steps = distill_steps if distill_steps is not None else (20 if tiny else 200)
    print(f"[1/5] model zoo ({'tiny' if tiny else 'default'} configuration)", flush=True)
    zoo = build_zoo(config, cache_dir, progress=progress)
    print(f"      {zoo.root} ({'built now' if zoo.built else 'from cache'})", flush=True)

    print(f"[2/5] compress {len(zoo.tenants)} tenants, distill scales ({steps} steps), evaluate")
    store = DeltaStore(out / "deltas")
    rows, details = compress_and_evaluate(
        zoo, store, distill_steps=steps, seed=seed, progress=progress
    )
    write_results(out / "quality.json", rows, meta={"zoo": str(zoo.root), "tenants": details})
    print(format_table(rows), flush=True)

    print("[3/5] one mixed batch: every tenant and the base from one base + deltas", flush=True)
    samples = mixed_batch(zoo, store, new_tokens=new_tokens)
    for s in samples:
        check = "same as merged dense model" if s["matches_merged_dense_model"] else "DIFFERS"
        print(f"  [{s['tenant']}] {s['prompt']!r} -> {s['completion']!r} ({check})")

    print("[4/5] memory: N full models vs one base + N deltas", flush=True)
    memory = memory_table(zoo)
    print("\n".join(_memory_lines(memory)), flush=True)

    print("[5/5] plots", flush=True)
    plots = {
        "quality": str(plot_quality(rows, out / "quality.png")),
        "memory": str(plot_memory(memory["zoo"], out / "memory.png", "zoo model, fp16")),
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
        "plots": plots,
        "seconds": time.perf_counter() - started,
    }
    tmp = out / ".demo.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "demo.json")
    print(f"\nresults: {out} (demo.json, quality.json, *.png, deltas/)")
    print(f"done in {result['seconds']:.0f} s")
    return result
