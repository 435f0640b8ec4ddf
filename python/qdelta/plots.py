"""PNG plots of the demo's results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qdelta.atomic_io import atomic_open
from qdelta.eval import ResultRow
from qdelta.optional import require

# (variant, bits per weight) for the two series: greedy initial scales, distilled scales.
_INITIAL = (("bitdelta-init", 1.0), ("2-bit", 2.0), ("3-bit", 3.0))
_DISTILLED = (("bitdelta-distilled", 1.0), ("2-bit-distilled", 2.0))
_ROW_DISTILLED = (("bitdelta-row-distilled", 1.0),)


def _pyplot():
    matplotlib = require("matplotlib", "plotting")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it;
    the format follows the suffix (PNG without one)."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            # The temporary's name ends in .tmp, so the format is given, not guessed.
            fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    return path


def plot_quality(rows: Sequence[ResultRow], path: str | Path) -> Path:
    """Perplexity vs bits per weight, one panel per tenant, base and fine-tune as lines."""
    plt = _pyplot()
    tenants = sorted({r.tenant for r in rows})
    fig, axes = plt.subplots(1, len(tenants), figsize=(4 * len(tenants), 3.6), squeeze=False)
    for ax, tenant in zip(axes[0], tenants, strict=True):
        by_variant = {r.variant: r for r in rows if r.tenant == tenant}
        ax.axhline(by_variant["base"].ppl, color="grey", ls="--", label="base")
        ax.axhline(by_variant["finetune"].ppl, color="black", ls=":", label="fine-tune (fp)")
        for series, color, style, label in (
            (_INITIAL, "tab:orange", "o-", "initial scales (mean |delta|)"),
            (_DISTILLED, "tab:blue", "o-", "distilled scales"),
            (_ROW_DISTILLED, "tab:green", "s", "distilled, one scale per row"),
        ):
            xs = [(x, by_variant[v].ppl) for v, x in series if v in by_variant]
            if xs:
                ax.plot(*zip(*xs, strict=True), style, color=color, label=label)
        ax.set_title(f"{tenant} ({by_variant['base'].domain})")
        ax.set_xlabel("bits per delta weight")
        ax.set_xticks([1, 2, 3])
    axes[0][0].set_ylabel("perplexity (held-out, per byte)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_memory(
    table: Sequence[dict],
    path: str | Path,
    title: str,
    packed: Sequence[dict] | None = None,
) -> Path:
    """Resident bytes vs number of tenants: N full models vs one base + N deltas
    (and, with ``packed``, deltas whose embeddings and head are packed too)."""
    plt = _pyplot()
    ns = [r["n"] for r in table]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(ns, [r["full_models_bytes"] / 2**20 for r in table], "o-", label="N full fp16 models")
    ax.plot(
        ns,
        [r["base_plus_deltas_bytes"] / 2**20 for r in table],
        "o-",
        label="base + N 1-bit deltas",
    )
    if packed is not None:
        ax.plot(
            [r["n"] for r in packed],
            [r["base_plus_deltas_bytes"] / 2**20 for r in packed],
            "o--",
            label="... embeddings and head packed too",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tenants N")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
