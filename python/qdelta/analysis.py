"""What a fine-tune changed, per layer: ``qdelta analyze BASE FINETUNED [...]``.

For each layer of each fine-tune (``W1 = W0 + D``, ``[out, in]`` oriented):

- ``rel_norm``: ``||D||_F / ||W0||_F``;
- ``recon_err``: ``||D - D_k||_F / ||D||_F`` for the k-plane reconstruction
  ``D_k`` (k = 1..max_planes; the Rust core's greedy residual planes);
- ``recon_sign_agreement``: the fraction of entries where ``D_1`` and ``D``
  have the same IEEE sign bit (1 by construction for 1 plane: a check);
- ``sign_agreement``: with several fine-tunes, the fraction of entries where
  this fine-tune's delta has the sign of the first one's (entries where both
  are non-zero);
- the DoRA paper's weight-decomposition view, per output row ``n`` (the
  paper's column of ``W`` in its ``[in, out]`` convention):
  ``delta_m = mean_n |  ||W1[n]|| - ||W0[n]||  |`` and
  ``delta_d = mean_n (1 - cos(W1[n], W0[n]))``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdelta.algebra import DenseDelta, as_dense, dense_delta
from qdelta.bitplane import MAX_PLANES, pack_residual, unpack_residual
from qdelta.delta import Delta
from qdelta.errors import ShapeError
from qdelta.sources import ModelSource, as_module, state_dict_of
from qdelta.store import check_base, load


def layer_stats(
    w0: torch.Tensor, d: torch.Tensor, max_planes: int = 3, reference: torch.Tensor | None = None
) -> dict[str, Any]:
    """The statistics of one ``[out, in]`` layer (float64 where it matters)."""
    if not 1 <= max_planes <= MAX_PLANES:
        raise ShapeError(f"max_planes: expected 1..{MAX_PLANES}, found {max_planes}")
    w0 = w0.double()
    d32 = d.float().contiguous()
    dd = d32.double()
    w1 = w0 + dd
    d_norm = float(torch.linalg.norm(dd))
    planes, scales = pack_residual(d32, bits=max_planes)
    errs = []
    for k in range(1, max_planes + 1):
        rec = torch.from_numpy(unpack_residual(planes, scales, tuple(d32.shape), bits=k))
        errs.append(float(torch.linalg.norm(dd - rec.double())) / d_norm if d_norm else 0.0)
        if k == 1:
            agree = float((torch.signbit(rec) == torch.signbit(d32)).double().mean())
    m0, m1 = torch.linalg.norm(w0, dim=1), torch.linalg.norm(w1, dim=1)
    cos = torch.nn.functional.cosine_similarity(w1, w0, dim=1)
    stats: dict[str, Any] = {
        "shape": list(d32.shape),
        "rel_norm": d_norm / float(torch.linalg.norm(w0)),
        "recon_err": errs,
        "recon_sign_agreement": agree,
        "delta_m": float((m1 - m0).abs().mean()),
        "delta_d": float((1.0 - cos).mean()),
    }
    if reference is not None:
        r = reference.double()
        both = (dd != 0) & (r != 0)
        same = (torch.sign(dd) == torch.sign(r)) & both
        stats["sign_agreement"] = float(same.sum()) / max(int(both.sum()), 1)
    return stats


def _as_dense_input(base_sd: dict[str, torch.Tensor], base: Any, ft: Any) -> DenseDelta:
    if isinstance(ft, (str, Path)) and str(ft).endswith(".qdelta"):
        ft = load(ft)
    if isinstance(ft, (Delta, DenseDelta)):
        check_base(ft, base_sd)
        return as_dense(ft)
    return dense_delta(base, ft)


def analyze(
    base: ModelSource,
    finetuned: Sequence[ModelSource | Delta | DenseDelta | str],
    *,
    max_planes: int = 3,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-layer statistics of every fine-tune (model, model dir, .qdelta file or delta)."""
    mod = as_module(base)
    base_src = mod if mod is not None else base
    base_sd = state_dict_of(base_src)  # type: ignore[arg-type]
    deltas = [_as_dense_input(base_sd, base_src, ft) for ft in finetuned]
    labels = (
        list(labels)
        if labels
        else [str(f) if isinstance(f, (str, Path)) else f"ft{i}" for i, f in enumerate(finetuned)]
    )
    first = deltas[0]
    out: dict[str, Any] = {"finetuned": labels, "max_planes": max_planes, "layers": []}
    for label, delta in zip(labels, deltas, strict=True):
        for name in delta.layers:
            w0 = base_sd[f"{name}.weight"].float()
            w0 = w0.T if name in delta.transposed else w0
            ref = first.layers.get(name) if delta is not first else None
            row = {"finetuned": label, "layer": name}
            row.update(layer_stats(w0, delta.layers[name], max_planes, ref))
            out["layers"].append(row)
    return out


def format_analysis(result: dict[str, Any]) -> str:
    k = result["max_planes"]
    several = len(result["finetuned"]) > 1
    head = ["layer", "rel_norm", *[f"err@{i}" for i in range(1, k + 1)], "sign(1b)", "dM", "dD"]
    if several:
        head = ["finetuned", *head, "sign vs ft0"]
    rows = []
    for r in result["layers"]:
        cells = [
            r["layer"],
            f"{r['rel_norm']:.4f}",
            *[f"{e:.3f}" for e in r["recon_err"]],
            f"{r['recon_sign_agreement']:.3f}",
            f"{r['delta_m']:.4g}",
            f"{r['delta_d']:.4g}",
        ]
        if several:
            agree = r.get("sign_agreement")
            cells = [Path(r["finetuned"]).name, *cells, "-" if agree is None else f"{agree:.3f}"]
        rows.append(cells)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join([*lines, *(fmt.format(*r) for r in rows)])


def plot_analysis(result: dict[str, Any], path: str | Path) -> Path:
    """Scatter of delta_m vs delta_d per layer, one series per fine-tune."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label in result["finetuned"]:
        rows = [r for r in result["layers"] if r["finetuned"] == label]
        ax.scatter(
            [r["delta_d"] for r in rows], [r["delta_m"] for r in rows], label=Path(label).name, s=18
        )
    ax.set_xlabel("direction change ΔD = mean(1 - cos)")
    ax.set_ylabel("magnitude change ΔM = mean |Δ‖row‖|")
    ax.set_title("weight decomposition per layer (DoRA analysis)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_analyze(args: Any) -> int:
    """The ``qdelta analyze`` command."""
    import sys

    from qdelta.errors import QDeltaError

    try:
        result = analyze(args.base, args.finetuned, max_planes=args.planes)
    except QDeltaError as e:
        print(f"qdelta analyze: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_analysis(result))
    if args.json:
        _write_atomic(Path(args.json), json.dumps(result, indent=2, default=_jsonable))
    if args.plot:
        plot_analysis(result, args.plot)
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)


def _write_atomic(path: Path, text: str) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
