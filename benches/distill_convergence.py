"""Has scale distillation converged? One zoo tenant's 1-bit delta distilled
for several step counts and learning rates, with one scale per matrix and per
row: logit MSE before / after and the fraction of the fine-tune's improvement
kept on held-out text.

Run: ``PYTHONPATH=python python benches/distill_convergence.py [--tenant prose]``.
Writes benches/results/distill_convergence.json. Uses the cached default zoo
(built first if absent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import machine_info
from qdelta.atomic_io import write_text_atomic
from qdelta.compress import compress
from qdelta.distill import distill
from qdelta.eval import kept_fraction
from qdelta.nn import apply, unapply
from qdelta.zoo import ZooConfig, build_zoo
from qdelta.zoo_eval import _calibration, _ppl

RUNS = (("matrix", 200, 1e-4), ("matrix", 400, 1e-4), ("matrix", 800, 1e-4),
        ("matrix", 200, 3e-4), ("matrix", 200, 1e-3), ("row", 200, 1e-4))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenant", default="prose")
    parser.add_argument("--cache", default=None, help="zoo cache directory")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    zoo = build_zoo(ZooConfig.default(), args.cache, progress=False)
    domain = zoo.tenants[args.tenant].domain
    base, ft = zoo.load("base"), zoo.load(args.tenant)
    ppl_base, ppl_ft = _ppl(base, zoo, domain), _ppl(ft, zoo, domain)
    calib = _calibration(zoo, domain)
    runs = []
    for scale, steps, lr in RUNS:
        delta = compress(base, ft, bits=1, scale=scale)
        result = distill(  # the trained scales, even if worse: convergence is measured
            base, ft, delta, calib, steps=steps, lr=lr, seed=0, progress=False, keep_best=False
        )
        apply(base, result.delta)
        try:
            ppl = _ppl(base, zoo, domain)
        finally:
            unapply(base)
        run = {
            "scale": scale,
            "steps": steps,
            "lr": lr,
            "mse_before": result.loss_before,
            "mse_after": result.loss_after,
            "ppl": ppl,
            "kept": kept_fraction(ppl_base, ppl_ft, ppl),
        }
        runs.append(run)
        print(
            f"{scale:>6} {steps:>4} steps lr {lr:g}: MSE {run['mse_before']:.4f} -> "
            f"{run['mse_after']:.4f}, ppl {ppl:.4f}, kept {100 * run['kept']:.1f}%",
            flush=True,
        )
    out = Path(args.out) / "distill_convergence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "tenant": args.tenant, "domain": domain,
              "ppl_base": ppl_base, "ppl_finetune": ppl_ft, "runs": runs}  # fmt: skip
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
