"""Soups and adapters on the model zoo: held-out perplexity of each form.

``soup_report(zoo)``: the zoo's soup ingredients (``code`` + ``code-b``) as
deltas, their soup in delta space (dense and compressed to 1..3 bits), each
ingredient alone, and the merged-LoRA tenant ``man-lora`` dense vs 1 bit, all
on the held-out text of their domain. ``python -m qdelta.algebra_zoo
[--tiny]`` prints the table and writes JSON (benches/results/).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qdelta.algebra import DenseDelta, dense_delta, soup
from qdelta.atomic_io import check_output, user_path, write_json_atomic
from qdelta.delta import Delta
from qdelta.errors import QDeltaError
from qdelta.eval import perplexity
from qdelta.machine import cpu_model
from qdelta.nn import merge
from qdelta.peft_import import memory_report
from qdelta.zoo import Zoo, ZooConfig, build_zoo


def _ppl(zoo: Zoo, base: torch.nn.Module, delta: DenseDelta | Delta | None, domain: str) -> float:
    model = copy.deepcopy(base)
    if isinstance(delta, DenseDelta):
        delta.merge_into(model)
    elif delta is not None:
        merge(model, delta)
    cfg = zoo.config
    text = zoo.eval_texts[domain]
    return perplexity(
        model, text, zoo.tokenizer, window=cfg.eval_window, batch_size=cfg.eval_batch_size
    ).ppl


def soup_report(zoo: Zoo, bits: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    """Perplexities (lower is better) of the soup, its ingredients and the LoRA tenant."""
    base = zoo.load("base")
    spec = next(t for t in zoo.config.tenants if t.kind == "soup")
    names = list(spec.ingredients)
    ingredients = [dense_delta(base, zoo.load(n), tenant=n) for n in names]
    mixed = soup(ingredients)
    rows = [{"model": "base", "form": "-", "ppl": _ppl(zoo, base, None, spec.domain)}]
    for name, d in zip(names, ingredients, strict=True):
        rows.append({"model": name, "form": "dense", "ppl": _ppl(zoo, base, d, spec.domain)})
    rows.append({"model": "soup", "form": "dense", "ppl": _ppl(zoo, base, mixed, spec.domain)})
    for b in bits:
        packed = mixed.compress(bits=b)
        rows.append(
            {"model": "soup", "form": f"{b}-bit", "ppl": _ppl(zoo, base, packed, spec.domain)}
        )
    # The zoo's soup tenant is the average of the ingredient weights: the same model.
    soup_weights = zoo.load(spec.name).state_dict()
    err = 0.0
    for name in mixed.layers:
        w = base.state_dict()[f"{name}.weight"] + mixed.weight(name)
        err = max(err, float((w - soup_weights[f"{name}.weight"]).abs().max()))
    for key, value in mixed.params.items():
        err = max(err, float((value - soup_weights[key]).abs().max()))
    lora_spec = next(t for t in zoo.config.tenants if t.kind == "lora")
    domain = lora_spec.domain if lora_spec.domain in zoo.eval_texts else lora_spec.fallback_domain
    lora = dense_delta(base, zoo.load(lora_spec.name), tenant=lora_spec.name)
    lora_rows = [
        {
            "model": lora_spec.name,
            "form": "dense (= LoRA merged)",
            "ppl": _ppl(zoo, base, lora, domain),
        }
    ]
    for b in bits:
        lora_rows.append(
            {
                "model": lora_spec.name,
                "form": f"{b}-bit",
                "ppl": _ppl(zoo, base, lora.compress(bits=b), domain),
            }
        )
    shapes = {n: tuple(d.shape) for n, d in lora.layers.items()}
    mem = memory_report(shapes, lora_spec.rank)
    return {
        "soup": {
            "domain": spec.domain,
            "ingredients": names,
            "rows": rows,
            "max_abs_diff_vs_zoo_soup": err,
        },
        "lora": {
            "domain": domain,
            "rank": lora_spec.rank,
            "rows": lora_rows,
            "lora_bytes": sum(r["lora_bytes"] for r in mem),
            "delta_bytes_1bit": sum(r["delta_bytes"] for r in mem),
        },
    }


def format_report(report: dict[str, Any]) -> str:
    s, lo = report["soup"], report["lora"]
    lines = [f"soup of {' + '.join(s['ingredients'])} on held-out {s['domain']} text:"]
    lines += [f"  {r['model']:<10} {r['form']:<22} ppl {r['ppl']:.3f}" for r in s["rows"]]
    lines.append(f"  max |soup - zoo soup tenant| = {s['max_abs_diff_vs_zoo_soup']:.2e}")
    lines.append(f"LoRA tenant (rank {lo['rank']}) on held-out {lo['domain']} text:")
    lines += [f"  {r['model']:<10} {r['form']:<22} ppl {r['ppl']:.3f}" for r in lo["rows"]]
    lines.append(
        f"  bytes: LoRA (fp16) {lo['lora_bytes']:,}; 1-bit planes {lo['delta_bytes_1bit']:,}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cache", default=None, type=user_path)
    parser.add_argument("--out", default=None, type=user_path, help="JSON output path")
    args = parser.parse_args(argv)
    config = ZooConfig.tiny() if args.tiny else ZooConfig.default()
    out = Path(args.out or f"benches/results/algebra_zoo_{'tiny' if args.tiny else 'default'}.json")
    if args.out is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        check_output(out, "--out")  # before the work, not after it
    except QDeltaError as e:
        print(f"python -m qdelta.algebra_zoo: error: {e}", file=sys.stderr)
        return 1
    t0 = time.time()
    zoo = build_zoo(config, args.cache, progress=False)
    t1 = time.time()
    report = soup_report(zoo)
    report["machine"] = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "zoo": "tiny" if args.tiny else "default",
        "zoo_seconds": round(t1 - t0, 1),
        "report_seconds": round(time.time() - t1, 1),
    }
    print(format_report(report))
    write_json_atomic(out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
