"""What a fine-tune changed, per layer: ``qdelta analyze BASE FINETUNED [...]``.

For each layer of each fine-tune (``W1 = W0 + D``, ``[out, in]`` oriented):

- ``rel_norm``: ``||D||_F / ||W0||_F`` (None where ``W0`` is all zeros);
- ``recon_err``: ``||D - D_k||_F / ||D||_F`` for the k-plane reconstruction
  ``D_k`` (k = 1..max_planes; the Rust core's greedy residual planes);
- ``base_sign_agreement``: the fraction of entries where ``D`` has the sign
  of ``W0`` (entries where both are non-zero): above 0.5 the fine-tune grows
  weights away from zero, below 0.5 it shrinks them (weight decay), about 0.5
  for a change unrelated to the base;
- ``sign_agreement``: with several fine-tunes, the fraction of entries where
  this fine-tune's delta has the sign of the first one's (entries where both
  are non-zero);
- the DoRA paper's weight-decomposition view, per output row ``n`` (the
  paper's column of ``W`` in its ``[in, out]`` convention):
  ``delta_m = mean_n |  ||W1[n]|| - ||W0[n]||  |`` and
  ``delta_d = mean_n (1 - cos(W1[n], W0[n]))``.

The 1-plane reconstruction is not scored for sign agreement: its plane *is*
the sign of ``D``, so that agreement is 1 by construction.

With ``steps=True`` (``qdelta analyze --steps``) the fine-tunes are
checkpoints of one fine-tuning run, in order: each row gets its ``step``
(1-based), the result a ``trajectories`` section (per layer, the checkpoints
in order) and the plot one line per layer through the checkpoints, a panel
per layer type (``q_proj``, ``v_proj``, ...), as in the DoRA paper's Figure 2.
Without it the fine-tunes are independent (tenants): one scatter series each.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdelta.algebra import DenseDelta, as_dense, dense_delta
from qdelta.atomic_io import write_text_atomic
from qdelta.bitplane import MAX_PLANES, pack_residual, unpack_residual
from qdelta.delta import Delta
from qdelta.errors import AlgebraError, FileError, ShapeError
from qdelta.optional import require
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
    m0, m1 = torch.linalg.norm(w0, dim=1), torch.linalg.norm(w1, dim=1)
    cos = torch.nn.functional.cosine_similarity(w1, w0, dim=1)
    stats: dict[str, Any] = {
        "shape": list(d32.shape),
        "rel_norm": _ratio(d_norm, float(torch.linalg.norm(w0))),
        "recon_err": errs,
        "base_sign_agreement": _sign_agreement(dd, w0),
        "delta_m": float((m1 - m0).abs().mean()),
        "delta_d": float((1.0 - cos).mean()),
    }
    if reference is not None:
        stats["sign_agreement"] = _sign_agreement(dd, reference.double())
    return stats


def _ratio(num: float, den: float) -> float | None:
    """num / den; None for a zero base (a zero-initialised layer: no relative size)."""
    return num / den if den else None


def _sign_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of the entries, non-zero in both, where ``a`` and ``b`` share a sign."""
    both = (a != 0) & (b != 0)
    same = (torch.sign(a) == torch.sign(b)) & both
    return float(same.sum()) / max(int(both.sum()), 1)


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
    steps: bool = False,
) -> dict[str, Any]:
    """Per-layer statistics of every fine-tune (model, model dir, .qdelta file or delta).

    ``steps``: the fine-tunes are checkpoints of one run in order (at least
    two, of the same layers); rows get a 1-based ``step`` and the result a
    ``trajectories`` section: layer -> one entry per checkpoint, in order.
    """
    if not finetuned:
        raise AlgebraError("finetuned: expected at least one fine-tune, found none")
    if steps and len(finetuned) < 2:
        raise AlgebraError(
            f"--steps: expected at least 2 checkpoints in order, found {len(finetuned)}"
        )
    if isinstance(max_planes, bool) or not isinstance(max_planes, int):
        raise ShapeError(f"max_planes: expected an int, found {type(max_planes).__name__}")
    if labels and len(labels) != len(finetuned):
        raise AlgebraError(
            f"labels: expected one per fine-tune ({len(finetuned)}), found {len(labels)}"
        )
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
    if steps:
        for label, delta in zip(labels[1:], deltas[1:], strict=True):
            if set(delta.layers) != set(first.layers):
                raise AlgebraError(
                    f"--steps: expected every checkpoint to have the layers of {labels[0]!r}, "
                    f"found {label!r} with different ones"
                )
    out: dict[str, Any] = {
        "finetuned": labels,
        "max_planes": max_planes,
        "steps": steps,
        "layers": [],
    }
    for step, (label, delta) in enumerate(zip(labels, deltas, strict=True), start=1):
        for name in delta.layers:
            w0 = base_sd[f"{name}.weight"].float()
            w0 = w0.T if name in delta.transposed else w0
            ref = first.layers.get(name) if delta is not first else None
            row: dict[str, Any] = {"finetuned": label, "layer": name}
            if steps:
                row["step"] = step
            row.update(layer_stats(w0, delta.layers[name], max_planes, ref))
            out["layers"].append(row)
    if steps:
        keep = ("step", "finetuned", "rel_norm", "delta_m", "delta_d", "recon_err")
        # The rows are in checkpoint order, so each layer's entries are too.
        out["trajectories"] = {
            name: [{k: r[k] for k in keep} for r in out["layers"] if r["layer"] == name]
            for name in first.layers
        }
    return out


def format_analysis(result: dict[str, Any]) -> str:
    k = result["max_planes"]
    several = len(result["finetuned"]) > 1
    steps = bool(result.get("steps"))
    head = ["layer", "rel_norm", *[f"err@{i}" for i in range(1, k + 1)], "sign vs W0", "dM", "dD"]
    if several:
        head = ["step" if steps else "finetuned", *head, "sign vs ft0"]
    rows = []
    for r in result["layers"]:
        cells = [
            r["layer"],
            "n/a" if r["rel_norm"] is None else f"{r['rel_norm']:.4f}",
            *[f"{e:.3f}" for e in r["recon_err"]],
            f"{r['base_sign_agreement']:.3f}",
            f"{r['delta_m']:.4g}",
            f"{r['delta_d']:.4g}",
        ]
        if several:
            agree = r.get("sign_agreement")
            first = (
                f"{r['step']} {Path(r['finetuned']).name}" if steps else Path(r["finetuned"]).name
            )
            cells = [first, *cells, "-" if agree is None else f"{agree:.3f}"]
        rows.append(cells)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join([*lines, *(fmt.format(*r) for r in rows)])


_X_LABEL = "direction change ΔD = mean(1 - cos)"
_Y_LABEL = "magnitude change ΔM = mean |Δ‖row‖|"


def plot_analysis(result: dict[str, Any], path: str | Path) -> Path:
    """ΔM vs ΔD per layer: a scatter series per fine-tune, or with ``steps``
    one trajectory per layer through the checkpoints (a panel per layer type)."""
    matplotlib = require("matplotlib", "qdelta analyze --plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.get("steps"):
        fig = _plot_trajectories(plt, result)
    else:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for label in result["finetuned"]:
            rows = [r for r in result["layers"] if r["finetuned"] == label]
            ax.scatter(
                [r["delta_d"] for r in rows],
                [r["delta_m"] for r in rows],
                label=Path(label).name,
                s=18,
            )
        ax.set_xlabel(_X_LABEL)
        ax.set_ylabel(_Y_LABEL)
        ax.set_title("weight decomposition per layer (DoRA analysis)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    from qdelta.plots import save_figure

    return save_figure(fig, path, dpi=120)


def _layer_type(name: str) -> tuple[str, str]:
    """``model.layers.0.self_attn.q_proj`` -> (``q_proj``, ``model.layers.0.self_attn``)."""
    head, _, kind = name.rpartition(".")
    return kind, head


def _plot_trajectories(plt: Any, result: dict[str, Any]) -> Any:
    by_type: dict[str, list[str]] = {}
    for name in result["trajectories"]:
        by_type.setdefault(_layer_type(name)[0], []).append(name)
    ncols = min(4, len(by_type))
    nrows = math.ceil(len(by_type) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows + 0.5), squeeze=False)
    for ax, (kind, names) in zip(axes.flat, by_type.items(), strict=False):
        for name in names:
            points = result["trajectories"][name]
            xs, ys = [p["delta_d"] for p in points], [p["delta_m"] for p in points]
            (line,) = ax.plot(xs, ys, "o-", ms=3.5, lw=1, label=_layer_type(name)[1])
            for p, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(
                    str(p["step"]),
                    (x, y),
                    xytext=(3, 3),
                    textcoords="offset points",
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("ΔD", fontsize=8)
        ax.set_ylabel("ΔM", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(names) <= 8:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(by_type) :]:
        ax.axis("off")
    steps = ", ".join(f"{i} = {Path(f).name}" for i, f in enumerate(result["finetuned"], 1))
    fig.suptitle(
        f"weight decomposition over fine-tuning (DoRA analysis): {_Y_LABEL} vs {_X_LABEL}\n"
        f"checkpoints {steps}",
        fontsize=8,
    )
    return fig


def _plot_formats() -> dict[str, str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return FigureCanvasBase.get_supported_filetypes()


def check_outputs(args: Any) -> None:
    """``--json`` / ``--plot``, checked before the (slow) analysis: a FileError unless
    each can be written without touching an input or writing into a folder."""
    from qdelta.atomic_io import check_output

    inputs = [args.base, *args.finetuned]
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output(path, flag, inputs)
    if args.json and args.plot and Path(args.json).resolve() == Path(args.plot).resolve():
        raise FileError(f"--json and --plot: expected two different files, found {args.json}")
    if args.plot:
        suffix = Path(args.plot).suffix.lstrip(".").lower() or "png"
        if suffix not in _plot_formats():
            raise FileError(
                f"--plot {args.plot}: expected an image suffix ({', '.join(_plot_formats())}), "
                f"found .{suffix}"
            )


def run_analyze(args: Any) -> int:
    """The ``qdelta analyze`` command."""
    import sys

    from qdelta.errors import QDeltaError

    try:
        check_outputs(args)
        result = analyze(
            args.base,
            args.finetuned,
            max_planes=args.planes,
            steps=bool(getattr(args, "steps", False)),
        )
    except QDeltaError as e:
        message = " ".join(str(e).split())
        print(f"qdelta analyze: error: {message}", file=sys.stderr)  # as every command says it
        return 1
    print(format_analysis(result))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(result, indent=2, default=_jsonable))
    if args.plot:
        plot_analysis(result, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qdelta.analysis BASE FT [FT ...] [--steps] [--json] [--plot]``."""
    parser = argparse.ArgumentParser(prog="qdelta analyze", description=__doc__.split("\n")[0])
    from qdelta.cli import add_analyze_arguments

    return run_analyze(add_analyze_arguments(parser).parse_args(argv))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    import sys

    sys.exit(main())
