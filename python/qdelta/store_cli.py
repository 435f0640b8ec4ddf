"""``qdelta inspect FILE`` and ``qdelta verify FILE``."""

from __future__ import annotations

import os
import sys

import numpy as np

from qdelta.errors import QDeltaError
from qdelta.store import DeltaFile


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def printable(text: str | os.PathLike[str]) -> str:
    """``text`` (or a path) safe for a terminal: control and other non-printable
    characters from a file (tenant names, metadata) escaped, so a file cannot forge or
    recolour lines; a path's undecodable bytes (surrogates) escaped too, so a strict
    UTF-8 stdout cannot fail on them."""
    text = os.fspath(text)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def describe(f: DeltaFile) -> str:
    """A readable summary: header facts, a layer table, params, totals."""
    rows, fp16, n_shared = [], 0, 0
    table = f.layer_table
    # Planes tensor -> the layer that owns it: the one it is named after (as qdelta
    # writes), else the first naming it. Tensor names are free in the format: a layer
    # is shared only when another layer names the same tensor.
    owners: dict[str, str] = {}
    for name, *_, planes, _ in table:
        if planes == f"{name}.qdelta_planes":
            owners[planes] = name
        else:
            owners.setdefault(planes, name)
    for name, (out, inp), bits, scale, transposed, planes, scales in table:
        alphas = f.tensor(scales)
        owner = owners[planes]
        tied = owner != name
        name = printable(name)
        if tied:  # tied to another layer: its tensors, stored once
            n_shared += 1
            mean = f"{float(np.abs(alphas[0]).mean()):.3g}"
            shared = f"shared with {printable(owner)}"
            flag = "yes" if transposed else "no"
            rows.append([name, f"{out}x{inp}", str(bits), scale, mean, flag, shared, "-"])
            continue
        size = sum(nbytes for t, _, _, nbytes in f.tensors if t in (planes, scales))
        dense = 2 * out * inp
        fp16 += dense
        rows.append(
            [
                name,
                f"{out}x{inp}",
                str(bits),
                scale,
                f"{float(np.abs(alphas[0]).mean()):.3g}",
                "yes" if transposed else "no",
                _fmt_bytes(size),
                f"{dense / size:.1f}x",
            ]
        )
    params = []
    kinds = {t: (dtype, shape, nbytes) for t, dtype, shape, nbytes in f.tensors}
    for name in f._file.params:
        dtype, shape, nbytes = kinds[name]
        numel = int(np.prod(shape, dtype=np.int64))
        fp16 += 2 * numel
        shape_text = "x".join(map(str, shape)) or "scalar"
        params.append([printable(name), dtype, shape_text, _fmt_bytes(nbytes)])
    lines = [
        f"file         {printable(str(f.path))} ({_fmt_bytes(f.nbytes)})",
        f"format       qdelta v{f.format_version}, written by {printable(f.creator)}",
        f"tenant       {printable(f.tenant) or '(none)'}",
        f"base         fingerprint {printable(f.base_fingerprint)}",
        f"bit layout   {printable(f.metadata['bit_layout'])}",
    ]
    lines += [
        f"metadata     {printable(k)} = {printable(v)}" for k, v in sorted(f.user_metadata.items())
    ]
    lines += _form_lines(f)
    lines += ["", f"{len(rows)} compressed layer(s):"]
    lines.append(
        _table(
            ["layer", "shape", "bits", "scale", "mean|alpha_0|", "transposed", "size", "vs fp16"],
            rows,
        )
    )
    if params:
        lines += ["", f"{len(params)} parameter(s) kept whole:"]
        lines.append(_table(["param", "dtype", "shape", "size"], params))
    ratio = fp16 / f.nbytes if f.nbytes else float("nan")
    lines += [
        "",
        f"total        {_fmt_bytes(f.nbytes)} on disk; the same weights as an fp16 fine-tune: "
        f"{_fmt_bytes(fp16)}; compression {ratio:.2f}x",
    ]
    if n_shared:
        lines.append(
            f"             ({n_shared} layer(s) sharing another's tensors are counted once, "
            "as a tied fp16 model stores them)"
        )
    return "\n".join(lines)


_SOURCES = {
    "full": "a full fine-tune",
    "lora": "a LoRA adapter, merged",
    "dora": "a DoRA adapter, merged",
    "soup": "a model soup (average of fine-tunes)",
    "combine": "a task-arithmetic combination of fine-tunes",
}


def _form_lines(f: DeltaFile) -> list[str]:
    """Which form the tenant is stored in, and what it came from (Delta.metadata["source"])."""
    meta = f.user_metadata
    planes = sorted({bits for _, _, bits, *_ in f.layer_table})
    stored = "/".join(map(str, planes)) + "-bit sign planes + scales per layer"
    source = meta.get("source")
    if source is None:
        return [f"stored form  {stored} (source not recorded)"]
    lines = [f"stored form  {stored}, from {printable(_SOURCES.get(source, source))}"]
    if source in ("lora", "dora") and "adapter_bytes" in meta:
        planes_bytes = sum(n for t, _, _, n in f.tensors if t not in f._file.params)
        try:
            adapter: int | None = int(meta["adapter_bytes"])
        except (TypeError, ValueError):  # user metadata is free text: show it as written
            adapter = None
        if adapter is None:
            shown, smaller = repr(meta["adapter_bytes"]), ""
        else:
            shown = _fmt_bytes(adapter)
            smaller = f" (smaller: {'adapter' if adapter < planes_bytes else 'planes'})"
        lines.append(
            f"vs adapter   rank {printable(meta.get('lora_rank', '?'))} {source} adapter: "
            f"{shown}; these planes: {_fmt_bytes(planes_bytes)}{smaller}"
        )
    return lines


def inspect(path: str) -> int:
    try:
        print(describe(DeltaFile(path)))
    except QDeltaError as e:
        print(f"qdelta inspect: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def verify(path: str) -> int:
    try:
        f = DeltaFile(path)
        n = f.verify()
    except QDeltaError as e:
        print(f"qdelta verify: error: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    shown = printable(path)  # a valid path need not be valid UTF-8
    if f.header_covered:
        print(f"{shown}: OK (the header and {n} tensors, every checksum matches)")
    else:
        print(
            f"{shown}: OK ({n} tensors, every checksum matches; the header has no checksum: "
            "written before header checksums, so its tensor names, shapes and layer table "
            "are not covered; re-save the file to cover them)"
        )
    return 0
