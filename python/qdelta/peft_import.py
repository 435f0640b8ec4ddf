"""PEFT LoRA / DoRA adapters as dense deltas, and what each form costs in memory.

:func:`from_peft` computes, per adapted layer, the weight PEFT's own
``merge_and_unload()`` would write, minus the base weight:

- LoRA: ``scaling * B @ A``;
- DoRA: ``m / ||W + scaling * B @ A||_row * (W + scaling * B @ A) - W``
  (the merged magnitude / direction weight), norms per output row as PEFT.

It reads the adapter tensors itself (float64), so the result is an
independent computation that the tests compare against PEFT's merge.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdelta.algebra import DenseDelta
from qdelta.bitplane import words_per_row
from qdelta.errors import ModelMismatchError
from qdelta.store import fingerprint


def _peft_model(base_model: nn.Module | None, adapter: Any) -> Any:
    from peft import PeftModel

    if isinstance(adapter, PeftModel):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        directory = Path(adapter)
        if not (directory / "adapter_config.json").is_file():
            raise ModelMismatchError(
                f"{directory}: expected a PEFT adapter directory with adapter_config.json, "
                "found none"
            )
        if not isinstance(base_model, nn.Module):
            raise ModelMismatchError(
                "base_model: expected the nn.Module the adapter was trained on, "
                f"found {type(base_model).__name__}"
            )
        # PEFT injects its layers in place: keep the caller's model untouched.
        return PeftModel.from_pretrained(copy.deepcopy(base_model), directory, is_trainable=False)
    raise ModelMismatchError(
        f"adapter: expected a PeftModel or an adapter directory, found {type(adapter).__name__}"
    )


def _clean_base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under their original names (PEFT's wrappers removed)."""
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        if ".modules_to_save." in key or ".original_module." in key:
            raise ModelMismatchError(
                f"{key}: expected an adapter without modules_to_save, found one (not supported)"
            )
        out[key.replace(".base_layer.", ".")] = value.detach()
    return out


def from_peft(
    base_model: nn.Module | None,
    adapter: Any,
    *,
    adapter_name: str | None = None,
    tenant: str = "",
) -> DenseDelta:
    """A PEFT LoRA or DoRA adapter as a :class:`DenseDelta` against ``base_model``.

    ``adapter``: a ``PeftModel`` (``base_model`` may then be None) or a local
    directory written by ``save_pretrained`` (loaded onto a copy of
    ``base_model``). ``adapter_name``: which adapter (default: the active one).
    ``metadata["source"]`` is ``"lora"`` or ``"dora"``, with the rank and the
    adapter's own size in bytes (``adapter_bytes``) for :func:`memory_report`.
    """
    from peft.tuners.lora import LoraLayer

    peft_model = _peft_model(base_model, adapter)
    name = adapter_name or peft_model.active_adapter
    inner = peft_model.get_base_model()
    base_sd = _clean_base_state(inner)
    layers, transposed, ranks, adapter_bytes, dora = {}, set(), set(), 0, set()
    for mod_name, module in inner.named_modules():
        if not isinstance(module, LoraLayer) or name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module.lora_A[name], nn.Linear):
            raise ModelMismatchError(
                f"layer {mod_name}: expected a LoRA on a linear layer, found "
                f"{type(module.lora_A[name]).__name__} (not supported)"
            )
        if getattr(module, "lora_bias", {}).get(name, False):
            raise ModelMismatchError(f"layer {mod_name}: lora_bias=True is not supported")
        a = module.lora_A[name].weight.detach().double()  # [r, in]
        b = module.lora_B[name].weight.detach().double()  # [out, r]
        w = base_sd[f"{mod_name}.weight"].double()
        fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
        if fan_in_fan_out:
            w = w.T
        lora = float(module.scaling[name]) * (b @ a)
        delta = lora
        if module.use_dora.get(name, False):
            magnitude = module.lora_magnitude_vector[name].weight.detach().double()
            merged = w + lora
            norm = torch.linalg.norm(merged, dim=1)
            delta = (magnitude / norm)[:, None] * merged - w
            adapter_bytes += (
                magnitude.numel() * module.lora_magnitude_vector[name].weight.element_size()
            )
            dora.add(mod_name)
        layers[mod_name] = delta.float().contiguous()
        if fan_in_fan_out:
            transposed.add(mod_name)
        ranks.add(a.shape[0])
        size = module.lora_A[name].weight.element_size()
        adapter_bytes += (a.numel() + b.numel()) * size
    if not layers:
        raise ModelMismatchError(f"adapter {name!r}: expected LoRA / DoRA layers, found none")
    config = peft_model.peft_config[name]
    return DenseDelta(
        layers=layers,
        params={},
        base_fingerprint=fingerprint(base_sd),
        transposed=frozenset(transposed),
        tenant=tenant,
        metadata={
            "source": "dora" if dora else "lora",
            "lora_rank": ",".join(str(r) for r in sorted(ranks)),
            "lora_alpha": f"{config.lora_alpha:g}",
            "adapter_bytes": str(adapter_bytes),
        },
    )


# --------------------------------------------------------------------------- memory


def lora_bytes(shape: tuple[int, int], rank: int, dtype_bytes: int = 2, dora: bool = False) -> int:
    """Bytes of a rank-``rank`` LoRA (A ``[r, in]`` + B ``[out, r]``; DoRA adds ``m [out]``)."""
    out, inp = shape
    return dtype_bytes * (rank * (inp + out) + (out if dora else 0))


def bitdelta_bytes(shape: tuple[int, int], bits: int = 1, scale: str = "matrix") -> int:
    """Bytes of a ``bits``-plane delta: packed signs + float32 scales."""
    out, inp = shape
    return bits * (4 * out * words_per_row(inp) + 4 * (out if scale == "row" else 1))


def memory_report(
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    *,
    bits: int = 1,
    dtype_bytes: int = 2,
    dora: bool = False,
) -> list[dict[str, Any]]:
    """Per layer: LoRA bytes vs ``bits``-plane delta bytes, and which is smaller.

    ``break_even_rank`` is the largest rank at which the LoRA is no larger.
    """
    rows = []
    for name, (out, inp) in shapes.items():
        lb = lora_bytes((out, inp), rank, dtype_bytes, dora)
        db = bitdelta_bytes((out, inp), bits)
        per_rank = dtype_bytes * (inp + out)
        extra = dtype_bytes * out if dora else 0
        rows.append(
            {
                "layer": name,
                "shape": [out, inp],
                "rank": rank,
                "lora_bytes": lb,
                "delta_bytes": db,
                "smaller": "lora" if lb < db else "delta",
                "break_even_rank": max(0, (db - extra) // per_rank),
            }
        )
    return rows


def format_memory_report(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'layer':<40} {'shape':>11} {'rank':>4} {'LoRA B':>10} {'delta B':>10}  smaller"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['layer']:<40} {shape:>11} {r['rank']:>4} {r['lora_bytes']:>10,} "
            f"{r['delta_bytes']:>10,}  {r['smaller']} (break-even rank {r['break_even_rank']})"
        )
    return "\n".join(lines)
