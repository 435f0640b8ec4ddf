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
import math
import os
import pickle
import warnings
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdelta.algebra import DenseDelta
from qdelta.bitplane import MAX_PLANES, words_per_row
from qdelta.checks import as_int
from qdelta.compress import check_same_architecture
from qdelta.errors import FileError, FormatError, ModelMismatchError, NonFiniteError, ShapeError
from qdelta.optional import require
from qdelta.store import fingerprint

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order of preference


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_config(directory: Path) -> Any:
    """The adapter's LoraConfig, checked: PEFT itself takes r="x" or alpha NaN."""
    require("peft", "qdelta.from_peft")
    from peft import PeftConfig, PeftType

    path = directory / CONFIG_NAME
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSON, fields, unknown peft_type
        raise FormatError(
            f"{path}: expected a valid PEFT adapter config, found: {type(e).__name__}: {e}"
        ) from e
    if config.peft_type != PeftType.LORA:
        raise ModelMismatchError(
            f"{path}: expected a LoRA / DoRA adapter, found peft_type {config.peft_type}"
        )
    ranks = {
        "r": config.r,
        **{f"rank_pattern[{k!r}]": v for k, v in (config.rank_pattern or {}).items()},
    }
    for what, r in ranks.items():
        if not _is_int(r) or r < 1:
            raise FormatError(f"{path} {what}: expected an int >= 1, found {r!r}")
    alphas = {
        "lora_alpha": config.lora_alpha,
        **{f"alpha_pattern[{k!r}]": v for k, v in (config.alpha_pattern or {}).items()},
    }
    for what, alpha in alphas.items():
        if isinstance(alpha, bool) or not isinstance(alpha, Real):
            raise FormatError(f"{path} {what}: expected a number, found {alpha!r}")
        if not math.isfinite(alpha):
            raise NonFiniteError(f"{path} {what}: expected a finite number, found {alpha}")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors as saved (keys without the adapter name), checked finite."""
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    found = [directory / n for n in WEIGHT_NAMES if (directory / n).is_file()]
    if not found:
        # PEFT would take the directory for a hub repo id and fail obscurely.
        raise FileError(
            f"{directory}: expected {' or '.join(WEIGHT_NAMES)} with the adapter weights, found neither"
        )
    try:
        weights = load_peft_weights(str(directory), device="cpu")
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
        raise FormatError(
            f"{found[0]}: expected a readable adapter weights file, found: "
            f"{type(e).__name__}: {' '.join(str(e).split())}"
        ) from e
    for key, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{found[0]} {key}: expected finite values, found NaN/Inf")
    return weights


def _check_keys(peft_model: Any, name: str, weights: Mapping[str, Any], directory: Path) -> None:
    """Every adapter tensor the model expects was in the file, and none was left over:
    PEFT only warns, keeping A's random init or B's zeros (a wrong delta)."""
    from peft.utils import get_peft_model_state_dict

    expected = {k for k in get_peft_model_state_dict(peft_model, adapter_name=name) if "lora_" in k}
    missing = sorted(expected - set(weights))
    if missing:
        raise ModelMismatchError(
            f"{directory}: expected a tensor for every adapted layer, found {len(missing)} "
            f"missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}"
        )
    unused = sorted(k for k in set(weights) - expected if "lora_" in k)
    if unused:
        raise ModelMismatchError(
            f"{directory}: expected adapter tensors for layers of base_model, found "
            f"{len(unused)} not in the model: {unused[:4]}{' ...' if len(unused) > 4 else ''} "
            "(is base_model the adapter's base?)"
        )


def _load_directory(base_model: nn.Module, directory: Path, name: str) -> Any:
    from peft import PeftModel

    try:
        from peft.utils.error import NoMatchingPeftModuleError
    except ImportError:  # older PEFT raises a plain ValueError
        NoMatchingPeftModuleError = ValueError

    config = _read_config(directory)
    weights = _read_weights(directory)
    try:
        with warnings.catch_warnings():
            # _check_keys raises on missing keys instead of PEFT's warning
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            # PEFT injects its layers in place: keep the caller's model untouched.
            model = PeftModel.from_pretrained(
                copy.deepcopy(base_model), str(directory), adapter_name=name, config=config
            )
    except NoMatchingPeftModuleError as e:
        raise ModelMismatchError(
            f"{directory}: expected a base model with the adapter's target modules "
            f"{config.target_modules}, found none in {type(base_model).__name__} ({e})"
        ) from e
    except RuntimeError as e:  # load_state_dict: the adapter's tensors do not fit
        if "size mismatch" not in str(e):
            raise
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise ShapeError(
            f"{directory}: expected adapter tensors of the shapes base_model and {CONFIG_NAME} "
            f"(r={config.r}) give, found: {detail}"
        ) from e
    _check_keys(model, name, weights, directory)
    return model


def _peft_model(base_model: nn.Module | None, adapter: Any, name: str) -> Any:
    from peft import PeftModel

    if isinstance(adapter, PeftModel):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        directory = Path(adapter)
        if not (directory / CONFIG_NAME).is_file():
            raise ModelMismatchError(
                f"{directory}: expected a PEFT adapter directory with {CONFIG_NAME}, found none"
            )
        if not isinstance(base_model, nn.Module):
            raise ModelMismatchError(
                "base_model: expected the nn.Module the adapter was trained on, "
                f"found {type(base_model).__name__}"
            )
        return _load_directory(base_model, directory, name)
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
        if "trainable_tokens_" in key:  # trained token rows, not base weights
            raise ModelMismatchError(
                f"{key}: expected an adapter without trainable tokens, found them (not supported)"
            )
        out[key.replace(".base_layer.", ".")] = value.detach()
    return out


def _check_config(config: Any, name: str) -> None:
    """Adapter settings whose trained values a weight delta does not carry."""
    bias = getattr(config, "bias", "none")
    if bias != "none":
        raise ModelMismatchError(
            f"adapter {name!r}: expected bias='none', found bias={bias!r} (trained biases "
            "are not carried over: not supported)"
        )
    if getattr(config, "trainable_token_indices", None):
        raise ModelMismatchError(
            f"adapter {name!r}: expected no trainable_token_indices, found "
            f"{config.trainable_token_indices!r} (not supported)"
        )


def _check_given_base(base_model: Any, peft_model: Any, peft_base: dict, peft_fp: str) -> None:
    """A base_model given with a PeftModel must be the PeftModel's base, or the
    delta would silently be made against (and fingerprinted as) the other one."""
    if base_model is peft_model or base_model is peft_model.get_base_model():
        return
    if not isinstance(base_model, nn.Module):
        raise ModelMismatchError(
            f"base_model: expected None or the PeftModel's base nn.Module, found "
            f"{type(base_model).__name__}"
        )
    given = _clean_base_state(base_model)
    check_same_architecture(peft_base, given, names=("PeftModel's base", "base_model"))
    found = fingerprint(given)
    if found != peft_fp:
        raise ModelMismatchError(
            f"base_model: expected the weights the PeftModel wraps (fingerprint {peft_fp}), "
            f"found other weights (fingerprint {found}); pass base_model=None to use the "
            "PeftModel's own base"
        )


def from_peft(
    base_model: nn.Module | None,
    adapter: Any,
    *,
    adapter_name: str | None = None,
    tenant: str = "",
) -> DenseDelta:
    """A PEFT LoRA or DoRA adapter as a :class:`DenseDelta` against ``base_model``.

    ``adapter``: a ``PeftModel`` (``base_model`` may then be None; if given it
    must be the PeftModel's base) or a local directory written by
    ``save_pretrained`` (loaded onto a copy of ``base_model``; every adapter
    tensor must be in it). ``adapter_name``: which adapter (default: the active
    one). ``metadata["source"]`` is ``"lora"`` or ``"dora"``, with the rank and the
    adapter's own size in bytes (``adapter_bytes``) for :func:`memory_report`.
    """
    LoraLayer = require("peft.tuners.lora", "qdelta.from_peft").LoraLayer

    peft_model = _peft_model(base_model, adapter, adapter_name or "default")
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ModelMismatchError(
            f"adapter {name!r}: expected one of the PeftModel's adapters "
            f"{sorted(peft_model.peft_config)}, found none by that name"
        )
    _check_config(peft_model.peft_config[name], name)
    inner = peft_model.get_base_model()
    base_sd = _clean_base_state(inner)
    base_fp = fingerprint(base_sd)
    if base_model is not None and adapter is peft_model:
        _check_given_base(base_model, peft_model, base_sd, base_fp)
    layers, transposed, ranks, adapter_bytes, dora = {}, set(), set(), 0, set()
    for mod_name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if name in getattr(module, "lora_embedding_A", {}):
            raise ModelMismatchError(
                f"layer {mod_name}: expected LoRA on linear layers, found one on an embedding "
                "(not supported)"
            )
        if name not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "merged", False) or name in getattr(module, "merged_adapters", []):
            # The base weight then already holds W + BA: the delta would count twice.
            raise ModelMismatchError(
                f"layer {mod_name}: expected an unmerged adapter, found {name!r} merged into "
                "the base weights; call peft_model.unmerge_adapter() first"
            )
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
        if not bool(torch.isfinite(delta).all()):
            raise NonFiniteError(
                f"layer {mod_name}: expected a finite delta, found NaN/Inf (scaling "
                f"{float(module.scaling[name])}: check the adapter's weights and lora_alpha)"
            )
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
        base_fingerprint=base_fp,
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

    ``shapes``: ``{layer name: (out, in)}``. ``break_even_rank`` is the largest
    rank at which the LoRA is no larger.
    """
    if not isinstance(shapes, Mapping):
        raise ShapeError(
            "memory_report shapes: expected a mapping {layer name: (out, in)}, found "
            f"{type(shapes).__name__}"
        )
    rank = as_int("memory_report rank", rank, 0)
    bits = as_int("memory_report bits", bits, 1, MAX_PLANES + 1, f"{MAX_PLANES + 1}")
    dtype_bytes = as_int("memory_report dtype_bytes", dtype_bytes, 1)
    rows = []
    for name, shape in shapes.items():
        if not isinstance(shape, tuple | list) or len(shape) != 2:
            raise ShapeError(f"memory_report shapes[{name!r}]: expected (out, in), found {shape!r}")
        out, inp = (as_int(f"memory_report shapes[{name!r}]", d, 1) for d in shape)
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
