"""``qdelta compress BASE_DIR FINETUNED_DIR -o out.qdelta``: compress, optionally
distill the scales on a text file, save, and print a summary."""

from __future__ import annotations

import argparse

from qdelta.compress import compress
from qdelta.delta import Delta
from qdelta.errors import QDeltaError
from qdelta.sources import load_hf_model


def _dense_bytes(model, delta: Delta) -> int:
    """Bytes the compressed layers take in the fine-tune's own dtype."""
    state = model.state_dict()
    return sum(
        state[f"{n}.weight"].numel() * state[f"{n}.weight"].element_size() for n in delta.layers
    )


def run_compress(args: argparse.Namespace) -> int:
    if not hasattr(Delta, "save"):
        raise QDeltaError("compress: expected the .qdelta store (Delta.save), found none")
    base = load_hf_model(args.base)
    finetuned = load_hf_model(args.finetuned)
    delta = compress(base, finetuned, bits=args.bits, scale=args.scale)
    line = ""
    if args.calib:
        from transformers import AutoTokenizer

        from qdelta.distill import distill

        tokenizer = AutoTokenizer.from_pretrained(args.finetuned, local_files_only=True)
        result = distill(
            base,
            finetuned,
            delta,
            args.calib,
            tokenizer=tokenizer,
            steps=args.steps,
            seed=args.seed,
        )
        delta = result.delta
        line = f"distillation loss: {result.loss_before:.6g} -> {result.loss_after:.6g}\n"
    delta.save(args.output)  # type: ignore[attr-defined]
    packed = sum(layer.nbytes for layer in delta.layers.values())
    dense = _dense_bytes(finetuned, delta)
    print(
        f"{len(delta.layers)} layers, {args.bits} bit(s), scale={args.scale}: "
        f"{packed / 2**20:.3f} MiB packed vs {dense / 2**20:.3f} MiB dense "
        f"(ratio {dense / max(packed, 1):.1f}x); whole tensors {(delta.nbytes - packed) / 2**20:.3f} MiB\n"
        f"{line}wrote {args.output}"
    )
    return 0
