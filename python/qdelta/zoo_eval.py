"""Per-tenant quality on the zoo (``qdelta eval``, step 2 of the demo).

Every tenant of the zoo is compressed six ways (1 and 2 planes with BitDelta's
initial and with distilled scales, 1 plane with distilled per-row scales, 3
planes with initial scales) and evaluated
on held-out text of its own domain beside the base and the fine-tune; the
distilled 1-bit delta of each tenant goes into a :class:`DeltaStore`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qdelta.atomic_io import check_output, ensure_dir
from qdelta.compress import compress
from qdelta.delta import Delta
from qdelta.distill import DistillResult, distill
from qdelta.errors import FileError
from qdelta.eval import ResultRow, format_table, perplexity, quality_rows, write_results
from qdelta.nn import apply, unapply
from qdelta.store import DeltaStore
from qdelta.store_cli import printable
from qdelta.zoo import Zoo, ZooConfig, build_zoo


def fp16_bytes(tensors) -> int:
    """Bytes of tensors as served in fp16 (floating point at 2 bytes, others as they are)."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)


def _delta_fp16_bytes(delta: Delta) -> int:
    packed = sum(layer.nbytes for layer in delta.layers.values())
    return packed + fp16_bytes(delta.params.values())


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
    """Every tenant: six compressed variants, their perplexities, sizes; the distilled
    1-bit delta goes into ``store`` (what the runtime serves)."""
    base = zoo.load("base")
    base_ppl = {d: _ppl(base, zoo, d) for d in zoo.domains}
    rows: list[ResultRow] = []
    details: dict = {}
    for name, tenant in tqdm(zoo.tenants.items(), desc="tenants", disable=not progress):
        ft = zoo.load(name)
        ft_fp16 = fp16_bytes(ft.state_dict().values())
        t0 = time.perf_counter()
        calib = _calibration(zoo, tenant.domain)

        def distilled(delta: Delta, ft=ft, calib=calib) -> DistillResult:
            return distill(
                base, ft, delta, calib, steps=distill_steps, seed=seed, progress=progress
            )

        variants: dict[str, Delta] = {"bitdelta-init": compress(base, ft, bits=1, tenant=name)}
        result = distilled(variants["bitdelta-init"])
        variants["bitdelta-distilled"] = result.delta
        # One scale per output row instead of per matrix: the same bits, out floats more.
        variants["bitdelta-row-distilled"] = distilled(
            compress(base, ft, bits=1, scale="row", tenant=name)
        ).delta
        for bits in (2, 3):
            variants[f"{bits}-bit"] = compress(base, ft, bits=bits, tenant=name)
        variants["2-bit-distilled"] = distilled(variants["2-bit"]).delta
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
            "distill_kept_initial": result.kept_initial,
            "compress_seconds": seconds,
            "finetune_fp16_bytes": ft_fp16,
        }
    return rows, details


def default_distill_steps(tiny: bool) -> int:
    return 20 if tiny else 200


def evaluate_into(
    out: Path, zoo: Zoo, *, distill_steps: int, seed: int, progress: bool
) -> tuple[list[ResultRow], dict, DeltaStore]:
    """Evaluate every tenant, print the table, write ``out/quality.json`` and each
    tenant's distilled 1-bit delta into the store ``out/deltas``."""
    store = DeltaStore(out / "deltas")
    rows, details = compress_and_evaluate(
        zoo, store, distill_steps=distill_steps, seed=seed, progress=progress
    )
    meta = {"zoo": str(zoo.root), "distill_steps": distill_steps, "tenants": details}
    write_results(out / "quality.json", rows, meta=meta)
    print(format_table(rows), flush=True)
    return rows, details, store


def check_result_paths(out_dir: str | Path, files: list[str]) -> Path:
    """``--out`` as a directory whose result ``files`` and ``deltas/`` store can be
    written, checked before minutes of work (a FIFO or a folder there is refused)."""
    out = ensure_dir(Path(out_dir).resolve(), "--out")
    for name in files:
        check_output(out / name, "--out")
    deltas = out / "deltas"
    if deltas.exists() and not deltas.is_dir():
        raise FileError(
            f"--out {out}: expected {deltas} to be a directory (the delta store), found a file"
        )
    return out


def run_eval(
    out_dir: str | Path = "results",
    *,
    tiny: bool = False,
    cache_dir: str | Path | None = None,
    distill_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[ResultRow]:
    """``qdelta eval``: build (or find cached) the zoo and evaluate every tenant into ``out_dir``."""
    out = check_result_paths(out_dir, ["quality.json"])
    config = ZooConfig.tiny(seed) if tiny else ZooConfig.default(seed)
    steps = distill_steps if distill_steps is not None else default_distill_steps(tiny)
    zoo = build_zoo(config, cache_dir, progress=progress)
    rows, _, _ = evaluate_into(out, zoo, distill_steps=steps, seed=seed, progress=progress)
    print(f"\nwrote {printable(out / 'quality.json')} and {printable(out / 'deltas')}")
    return rows
