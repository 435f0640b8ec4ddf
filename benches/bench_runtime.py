"""Multi-tenant decode: 8 tenants in one batch vs 8 merged dense models in turn.

A small Llama (random weights, built from a config) and 8 fine-tunes of it
(every parameter perturbed). Each tenant's delta: the block linears and the
head as 1-bit planes, embeddings and norms kept whole (full precision).
Writes benches/results/runtime.json and benches/results/runtime.md. Run by
``make bench``, or ``PYTHONPATH=python:. .venv/bin/python benches/bench_runtime.py``.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from benches.conftest import machine_info  # noqa: E402
from tests.runtime_helpers import left_pad, merged, perturbed, tiny_llama  # noqa: E402

import qdelta  # noqa: E402
from qdelta.atomic_io import write_text_atomic  # noqa: E402

TENANTS = 8
PROMPT = 16
NEW_TOKENS = 32
#: Interleaved timing rounds per comparison (best round kept).
ROUNDS = 5
CONFIG = dict(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    initializer_range=0.05,
)
# Weights well beyond the caches (200 MB per fp32 model): decode of one model is
# bound by reading its weights, the regime 1-bit deltas are for.
CONFIG_LARGE = CONFIG | dict(
    hidden_size=1024, intermediate_size=2752, num_attention_heads=16, num_key_value_heads=16
)
LLAMA_7B = dict(layers=32, hidden=4096, mlp=11008, vocab=32000)


def packed_delta(base: nn.Module, ft: nn.Module) -> qdelta.Delta:
    bsd, fsd = base.state_dict(), ft.state_dict()
    layers = {}
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear):
            diff = (fsd[name + ".weight"] - bsd[name + ".weight"]).contiguous()
            planes, scales = qdelta.pack_residual(diff, bits=1)
            layers[name] = qdelta.PackedLayer(planes, scales, tuple(diff.shape))
    covered = {n + ".weight" for n in layers}
    params = {
        k: v.clone() for k, v in fsd.items() if k not in covered and not torch.equal(v, bsd[k])
    }
    return qdelta.Delta(layers, params, qdelta.fingerprint(bsd))


def dense_decode(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decode with the KV cache: the same loop the runtime runs."""
    from qdelta.runtime import _cache_argument, _cache_of

    cache_kw = _cache_argument(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    tokens = []
    for step in range(steps):
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
        if step < steps - 1:
            out = model(input_ids=token[:, None], use_cache=True, **{cache_kw: _cache_of(out)})
    return torch.stack(tokens, 1)


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def llama_7b_arithmetic(n: int, bits: int = 1) -> dict:
    """fp16 7B Llama: N full models vs one base + N deltas (linears packed, embeddings,
    head and norms whole as in BitDelta; and with the head packed too)."""
    L, h, m, v = (LLAMA_7B[k] for k in ("layers", "hidden", "mlp", "vocab"))
    linears = L * (4 * h * h + 3 * h * m)
    emb = head = v * h
    norms = (2 * L + 1) * h
    full = 2 * (linears + emb + head + norms)
    planes = bits * (linears // 8)
    scales = 4 * bits * (L * (4 * h + 3 * m))  # row scales, float32
    delta_head_whole = planes + scales + 2 * (emb + head + norms)
    delta_head_packed = planes + scales + bits * head // 8 + 4 * bits * v + 2 * (emb + norms)
    return {
        "n": n,
        "full_models_bytes": n * full,
        "base_plus_deltas_bytes": full + n * delta_head_whole,
        "ratio": n * full / (full + n * delta_head_whole),
        "base_plus_deltas_head_packed_bytes": full + n * delta_head_packed,
        "ratio_head_packed": n * full / (full + n * delta_head_packed),
    }


def run(zoo: bool = True) -> dict:
    # One BLAS thread for both paths: on a shared 2-core machine extra threads
    # only contend (the Rust kernel keeps its own thread pool).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(zoo)
    finally:
        torch.set_num_threads(threads)


def decode_comparison(
    base: nn.Module, deltas: dict[str, qdelta.Delta], prompts: list[list[int]], pad: int = 0
) -> dict:
    """Greedy decode of one row per tenant: one MultiTenantModel batch vs each
    tenant's merged dense model in turn, timed side by side in this process."""
    dense = [merged(base, d) for d in deltas.values()]
    model = qdelta.MultiTenantModel(copy.deepcopy(base), tenants=deltas)
    ids, mask = left_pad(prompts, pad)
    names = list(deltas)

    def multi(steps: int) -> torch.Tensor:
        return model.generate(ids, names, steps, attention_mask=mask).tokens

    def one_by_one(steps: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    dense_decode(d, torch.tensor([p]), steps)
                    for p, d in zip(prompts, dense, strict=True)
                ]
            )

    # Rounds interleave the four measurements, so a slow spell of a shared
    # machine hits both sides alike; each keeps its best round.
    # Decode time = (prefill + NEW_TOKENS tokens) - (prefill + 1 token).
    cases = {
        ("multi", 1): lambda: multi(1),
        ("dense", 1): lambda: one_by_one(1),
        ("multi", NEW_TOKENS + 1): lambda: multi(NEW_TOKENS + 1),
        ("dense", NEW_TOKENS + 1): lambda: one_by_one(NEW_TOKENS + 1),
    }
    multi(2), one_by_one(2)  # warm-up
    wall = {key: float("inf") for key in cases}
    cpu = dict(wall)
    outputs = {}
    for _ in range(ROUNDS):
        for key, fn in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[key] = fn()
            wall[key] = min(wall[key], time.perf_counter() - t0)
            cpu[key] = min(cpu[key], time.process_time() - c0)
    n = NEW_TOKENS + 1
    t_multi_1, t_dense_1 = wall["multi", 1], wall["dense", 1]
    t_multi, t_dense = wall["multi", n] - t_multi_1, wall["dense", n] - t_dense_1
    tok_multi, tok_dense = outputs["multi", n], outputs["dense", n]
    # CPU time of this process (all its threads): on a shared machine it does
    # not count the time spent waiting for other jobs, so it varies less.
    c_multi = cpu["multi", n] - cpu["multi", 1]
    c_dense = cpu["dense", n] - cpu["dense", 1]
    tokens = len(names) * NEW_TOKENS
    mem = model.memory()
    multi_bytes = mem["base_bytes"] + mem["tenant_bytes"]
    dense_bytes = sum(weight_bytes(d) for d in dense)
    return {
        "tenants": names,
        "prefill_multi_tenant_s": t_multi_1,
        "prefill_dense_one_by_one_s": t_dense_1,
        "multi_tenant_s": t_multi,
        "dense_one_by_one_s": t_dense,
        "multi_tenant_tokens_per_s": tokens / t_multi,
        "dense_tokens_per_s": tokens / t_dense,
        "tokens_per_s_ratio": t_dense / t_multi,
        "multi_tenant_cpu_s": c_multi,
        "dense_one_by_one_cpu_s": c_dense,
        "cpu_time_ratio": c_dense / c_multi,
        "greedy_token_agreement": float((tok_multi == tok_dense).float().mean()),
        "multi_tenant_resident_bytes": multi_bytes,
        "dense_resident_bytes": dense_bytes,
        "bytes_ratio": dense_bytes / multi_bytes,
    }


def zoo_decode(cache_dir: str | None = None, compress_embeddings: bool = False) -> dict:
    """The same comparison on the default zoo model: its four tenants, each as a
    1-bit delta with one scale per matrix and with one per row (BitDelta's two
    granularities: eight distinct 1-bit tenants, initial scales), prompted with
    held-out text of the tenant's own domain. ``compress_embeddings``: embedding
    table and head packed too (else kept whole, as in BitDelta)."""
    from qdelta.zoo import ZooConfig, build_zoo

    zoo = build_zoo(ZooConfig.default(), cache_dir)
    base = zoo.load("base")
    deltas = {}
    for name in sorted(zoo.tenants):
        ft = zoo.load(name)
        for scale in ("matrix", "row"):
            deltas[f"{name}-{scale}"] = qdelta.compress(
                base, ft, bits=1, scale=scale, compress_embeddings=compress_embeddings
            )
    prompts = []
    for name in deltas:
        domain = zoo.tenants[name.rsplit("-", 1)[0]].domain
        start = 97 * len(prompts)  # a different stretch of held-out text per row
        text = zoo.eval_texts[domain][start : start + PROMPT]
        prompts.append(zoo.tokenizer.encode(text, bos=True)[:PROMPT])
    result = decode_comparison(base, deltas, prompts, pad=zoo.tokenizer.pad_id)
    config = zoo.config
    return result | {
        "model": {
            "zoo": str(zoo.root),
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "intermediate_size": config.intermediate_size,
            "vocab_size": zoo.tokenizer.vocab_size,
            "params": sum(p.numel() for p in base.parameters()),
            "dtype": "float32",
            "embeddings": "packed" if compress_embeddings else "whole",
        }
    }


def random_decode(config: dict) -> tuple[nn.Module, dict]:
    """8 perturbed fine-tunes of a random-weight Llama built from ``config``."""
    torch.manual_seed(0)
    base = tiny_llama(0, **config)
    fts = [perturbed(base, 100 + t, scale=0.01) for t in range(TENANTS)]
    deltas = {f"t{t}": packed_delta(base, ft) for t, ft in enumerate(fts)}
    del fts
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, config["vocab_size"], (PROMPT,), generator=g).tolist()
        for _ in range(TENANTS)
    ]
    return base, decode_comparison(base, deltas, prompts)


#: Fresh processes per zoo comparison: its speed-up moves between runs on a
#: shared machine, so the table shows the median run and the range.
REPEATS = 3


def isolated(name: str, *args: object) -> dict:
    """``name(*args)`` (a decode comparison of this module) in a fresh process
    with one torch thread: no state from earlier comparisons (allocator, thread
    pool, caches) carries into its timings."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_in_child, (name, args))


def _in_child(name: str, args: tuple) -> dict:
    torch.set_num_threads(1)
    result = globals()[name](*args)
    return result[1] if isinstance(result, tuple) else result


def repeated_zoo(compress_embeddings: bool) -> dict:
    """The median of REPEATS isolated zoo comparisons, with every run's ratio."""
    runs = [isolated("zoo_decode", None, compress_embeddings) for _ in range(REPEATS)]
    runs.sort(key=lambda r: r["tokens_per_s_ratio"])
    return runs[len(runs) // 2] | {
        "runs": len(runs),
        "tokens_per_s_ratio_runs": [r["tokens_per_s_ratio"] for r in runs],
    }


def _run(zoo: bool) -> dict:
    # The zoo first, each comparison in its own process (the headline numbers).
    zoo_whole = repeated_zoo(False) if zoo else None
    zoo_packed = repeated_zoo(True) if zoo else None
    decode = isolated("random_decode", CONFIG)
    large = isolated("random_decode", CONFIG_LARGE)
    torch.manual_seed(0)
    base = tiny_llama(0, **CONFIG)  # the model random_decode(CONFIG) builds

    # Memory for N = 1..64 tenants from the actual tensors: load N tenants and measure.
    extra = [packed_delta(base, perturbed(base, 500 + t, scale=0.01)) for t in range(8)]
    table = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        m = qdelta.MultiTenantModel(copy.deepcopy(base))
        for t in range(n):
            m.add_tenant(f"n{t}", extra[t % len(extra)])
        m.preload(m.tenants)
        mm = m.memory()
        one_full = weight_bytes(base)
        table.append(
            {
                "n": n,
                "full_models_bytes": n * one_full,
                "base_plus_deltas_bytes": mm["base_bytes"] + mm["tenant_bytes"],
                "ratio": n * one_full / (mm["base_bytes"] + mm["tenant_bytes"]),
            }
        )
    return {
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "model": CONFIG | {"dtype": "float32"},
        "tenants": TENANTS,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW_TOKENS,
        **decode,
        "memory_vs_tenants": table,
        "llama_7b_fp16": [llama_7b_arithmetic(n) for n in (1, 2, 4, 8, 16, 32, 64)],
        "large": large | {"model": CONFIG_LARGE | {"dtype": "float32"}},
        "zoo": zoo_whole,
        "zoo_embeddings_packed": zoo_packed,
    }


def decode_lines(d: dict) -> list[str]:
    n = len(d["tenants"])
    spread = []
    if d.get("runs", 1) > 1:
        lo, hi = min(d["tokens_per_s_ratio_runs"]), max(d["tokens_per_s_ratio_runs"])
        spread = [
            "",
            f"the median of {d['runs']} runs, each in a fresh process; "
            f"tokens/s ratio over the runs {lo:.2f}x to {hi:.2f}x",
        ]
    return [
        f"| {n} tenants, decode | tokens/s | resident weight MB |",
        "|---|---:|---:|",
        f"| one batch, MultiTenantModel | {d['multi_tenant_tokens_per_s']:.1f} | "
        f"{d['multi_tenant_resident_bytes'] / 1e6:.1f} |",
        f"| {n} merged dense models in turn | {d['dense_tokens_per_s']:.1f} | "
        f"{d['dense_resident_bytes'] / 1e6:.1f} |",
        f"| ratio | {d['tokens_per_s_ratio']:.2f}x | {d['bytes_ratio']:.2f}x less |",
        "",
        f"decode CPU time (process, all threads): one batch {d['multi_tenant_cpu_s']:.3f} s, "
        f"dense in turn {d['dense_one_by_one_cpu_s']:.3f} s, ratio {d['cpu_time_ratio']:.2f}x; "
        f"greedy token agreement {d['greedy_token_agreement']:.3f}",
        *spread,
    ]


def markdown(r: dict) -> str:
    m = r["model"]
    lines = [
        f"machine: {r['machine']['cpu']} ({r['machine']['cores']} cores), "
        f"torch threads {r['torch_threads']}",
        "",
        f"decode of {r['new_tokens']} tokens after a {r['prompt_tokens']}-token prompt "
        "(prefill excluded)",
        "",
    ]
    if r.get("zoo"):
        z = r["zoo"]["model"]
        lines += [
            f"Zoo model (hidden {z['hidden_size']}, {z['num_hidden_layers']} layers, "
            f"{z['params'] / 1e6:.2f}M parameters, {z['dtype']}); tenants: "
            + ", ".join(r["zoo"]["tenants"]),
            "",
            *decode_lines(r["zoo"]),
            "",
        ]
    if r.get("zoo_embeddings_packed"):
        lines += [
            "The same tenants with embedding table and head packed too "
            "(`compress_embeddings=True`):",
            "",
            *decode_lines(r["zoo_embeddings_packed"]),
            "",
        ]
    lines += [
        f"Random-weight Llama (hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"MLP {m['intermediate_size']}, {m['dtype']}), every parameter perturbed:",
        "",
        *decode_lines(r),
        "",
    ]
    if r.get("large"):
        g = r["large"]["model"]
        lines += [
            f"Larger random-weight Llama (hidden {g['hidden_size']}, {g['num_hidden_layers']} "
            f"layers, MLP {g['intermediate_size']}, {g['dtype']}; "
            f"{r['large']['dense_resident_bytes'] / 8e6:.0f} MB per model, beyond the caches):",
            "",
            *decode_lines(r["large"]),
            "",
        ]
    lines += [
        "| N | N full models MB | base + N deltas MB | ratio | 7B fp16: ratio (head whole) | 7B: ratio (head packed) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(r["memory_vs_tenants"], r["llama_7b_fp16"], strict=True):
        lines.append(
            f"| {a['n']} | {a['full_models_bytes'] / 1e6:.1f} | {a['base_plus_deltas_bytes'] / 1e6:.1f} "
            f"| {a['ratio']:.2f}x | {b['ratio']:.2f}x | {b['ratio_head_packed']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write(r: dict) -> None:
    out = ROOT / "benches" / "results"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "runtime.json", json.dumps(r, indent=2))
    write_text_atomic(out / "runtime.md", markdown(r))


if __name__ == "__main__":
    r = run(zoo="--no-zoo" not in sys.argv[1:])
    write(r)
    print(markdown(r))
