"""``qdelta compress BASE_DIR FINETUNED_DIR -o out.qdelta``: compress, optionally
distill the scales on a text file, save, and print a summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdelta.atomic_io import check_output
from qdelta.compress import compress
from qdelta.delta import Delta
from qdelta.errors import CalibrationError, QDeltaError
from qdelta.optional import require
from qdelta.sources import load_hf_model, storage_key
from qdelta.store_cli import printable
from qdelta.tokenizer import TOKENIZER_FILE, ByteTokenizer

# Files one of which a directory holds when it carries a Hugging Face tokenizer.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _vocab_rows(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return getattr(emb, "num_embeddings", None)


def calibration_tokenizer(finetuned: str | Path, base: str | Path, model: nn.Module) -> Any:
    """The tokenizer for ``--calib`` text (:func:`local_tokenizer` of the fine-tune dir,
    then the base dir), or a :class:`CalibrationError`."""
    return local_tokenizer([finetuned, base], model, "--calib", CalibrationError)


def local_tokenizer(
    directories: list[str | Path], model: nn.Module, purpose: str, error: type[QDeltaError]
) -> Any:
    """qdelta's byte tokenizer (``qdelta_tokenizer.json``) in the first of
    ``directories`` that has one; else a Hugging Face tokenizer from the first that
    has one (local files only); else ``error`` saying ``purpose`` needs one."""
    dirs = [Path(d) for d in directories]
    rows = _vocab_rows(model)
    for d in dirs:
        if (d / TOKENIZER_FILE).is_file():
            try:
                tok = ByteTokenizer.load(d)
            except QDeltaError as e:
                raise error(f"{purpose} tokenizer: {e}") from e
            if rows is not None and rows < tok.vocab_size:
                raise error(
                    f"{purpose} tokenizer {d / TOKENIZER_FILE}: expected a model with at least "
                    f"{tok.vocab_size} embedding rows for its ids, found {rows}"
                )
            return tok
    failures = []
    for d in dirs:
        if not any((d / name).is_file() for name in HF_TOKENIZER_FILES):
            continue
        AutoTokenizer = require("transformers", f"the tokenizer in {d}").AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(d, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, TypeError, ...
            failures.append(f"{d}: {type(e).__name__}: {' '.join(str(e).split())}")
    found = "; ".join(failures) if failures else "none"
    where = " or ".join(str(d) for d in dirs)
    raise error(
        f"{purpose} needs a tokenizer: expected {TOKENIZER_FILE} or a Hugging Face tokenizer "
        f"({', '.join(HF_TOKENIZER_FILES)}) in {where}, found {found}"
    )


def _distinct_layers(model, delta: Delta) -> dict[str, torch.Tensor]:
    """Layer name -> the fine-tune's weight, one name per tensor (a tied embedding
    and head are one weight, stored once)."""
    state = model.state_dict(keep_vars=True)
    first: dict[tuple, str] = {}
    for n in delta.layers:
        first.setdefault(storage_key(state[f"{n}.weight"]), n)
    return {n: state[f"{n}.weight"] for n in first.values()}


def _sizes(model, delta: Delta) -> tuple[int, int]:
    """(packed, dense) bytes of the compressed layers, each distinct weight once
    (dense: in the fine-tune's own dtype)."""
    layers = _distinct_layers(model, delta)
    packed = sum(delta.layers[n].nbytes for n in layers)
    return packed, sum(w.numel() * w.element_size() for w in layers.values())


def run_compress(args: argparse.Namespace) -> int:
    # Before any work: -o must not be (or be inside the model dirs as) an existing input.
    inputs = [args.base, args.finetuned, *([args.calib] if args.calib else [])]
    check_output(args.output, "-o", inputs)
    base = load_hf_model(args.base)
    finetuned = load_hf_model(args.finetuned)
    tokenizer = calibration_tokenizer(args.finetuned, args.base, finetuned) if args.calib else None
    delta = compress(
        base,
        finetuned,
        bits=args.bits,
        scale=args.scale,
        targets=args.target,
        exclude=args.exclude,
        compress_embeddings=args.embeddings,
        tenant=args.tenant,
    )
    line = ""
    if args.calib:
        from qdelta.distill import distill

        result = distill(
            base,
            finetuned,
            delta,
            args.calib,
            tokenizer=tokenizer,
            steps=args.steps,
            seed=args.seed,
            seq_len=args.seq_len,
            keep_best=not args.keep_trained,
        )
        delta = result.delta
        line = f"distillation loss: {result.loss_before:.6g} -> {result.loss_after:.6g}"
        if result.kept_initial:
            line += " (rose: kept the initial scales; --keep-trained keeps the trained ones)"
        line += "\n"
    delta.save(args.output)
    packed, dense = _sizes(finetuned, delta)
    whole = sum(t.numel() * t.element_size() for t in delta.params.values())
    written = Path(args.output).stat().st_size
    print(
        f"{len(delta.layers)} layers, {args.bits} bit(s), scale={args.scale}: "
        f"{packed / 2**20:.3f} MiB packed vs {dense / 2**20:.3f} MiB dense "
        f"(ratio {dense / max(packed, 1):.1f}x); whole tensors {whole / 2**20:.3f} MiB\n"
        f"{line}wrote {printable(args.output)} ({written / 2**20:.3f} MiB on disk)"
    )
    return 0
