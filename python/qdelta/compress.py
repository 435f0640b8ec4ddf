"""BitDelta compression: the weight deltas of a fine-tune as sign planes + scales.

Which layers: by default every linear layer inside the transformer blocks
(``nn.Linear`` and transformers' ``Conv1D``); embeddings, the head and norms
are kept whole in ``Delta.params``. The planes and the initial scales
(``alpha = mean |delta|``, per matrix or per row) come from the Rust core.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from qdelta.bitplane import ScaleMode, check_scale_mode, pack_residual
from qdelta.delta import Delta, PackedLayer
from qdelta.errors import (
    DTypeError,
    ModelMismatchError,
    NonFiniteError,
    ShapeError,
    TargetError,
)
from qdelta.sources import (
    LayerKind,
    ModelSource,
    as_module,
    guess_layer_kinds,
    layer_kinds,
    state_dict_of,
    storage_key,
)
from qdelta.store import fingerprint

Patterns = str | Sequence[str] | None


def pattern_matches(pattern: str, name: str) -> bool:
    """PEFT-style selection: exact name, ``.``-suffix, or a regex matching the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def in_block(name: str) -> bool:
    """Inside a repeated transformer block: a numbered path component (``layers.3.``)."""
    return any(part.isdigit() for part in name.split("."))


def _as_list(patterns: Patterns, what: str = "targets") -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    try:
        items = list(patterns)
    except TypeError:
        items = None
    if items is None or not all(isinstance(p, str) for p in items):
        raise TargetError(
            f"{what}: expected a layer name pattern (str) or a list of them, found {patterns!r}"
        )
    return items


def select_targets(
    kinds: Mapping[str, LayerKind],
    targets: Patterns = None,
    exclude: Patterns = None,
    compress_embeddings: bool = False,
) -> list[str]:
    """Names of the layers to compress, in model order.

    Every pattern in ``targets`` and ``exclude`` must select at least one
    layer: a typo is an error, not a silently uncompressed model.
    """
    wanted, unwanted = _as_list(targets, "targets"), _as_list(exclude, "exclude")
    if wanted:
        candidates = [n for n, k in kinds.items() if k != "embedding" or compress_embeddings]
        _require_matches(wanted, candidates, "target")
        chosen = [n for n in candidates if any(pattern_matches(p, n) for p in wanted)]
    elif compress_embeddings:
        chosen = list(kinds)
    else:
        chosen = [n for n, k in kinds.items() if k != "embedding" and in_block(n)]
    _require_matches(unwanted, chosen, "exclude")
    chosen = [n for n in chosen if not any(pattern_matches(p, n) for p in unwanted)]
    if not chosen:
        raise TargetError(
            f"expected at least one layer to compress, found none among {len(kinds)} "
            f"candidate layers (targets={wanted or 'default'}, exclude={unwanted})"
        )
    return chosen


def _require_matches(patterns: Iterable[str], names: Sequence[str], what: str) -> None:
    for p in patterns:
        if not any(pattern_matches(p, n) for n in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise TargetError(
                f"{what} pattern {p!r}: expected to match at least one layer "
                f"(exact name, suffix or regex), matched none of: {sample or 'no layers'}"
            )


def check_same_architecture(
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    kinds: Mapping[str, LayerKind] | None = None,
    names: tuple[str, str] = ("base", "fine-tune"),
) -> None:
    """Same tensor names and shapes, else an error naming the first difference.
    ``names``: what to call the two sides in the message."""
    base_name, ft_name = names
    missing = [k for k in finetuned if k not in base]
    extra = [k for k in base if k not in finetuned]
    if missing or extra:
        raise ModelMismatchError(
            f"{base_name} and {ft_name}: expected the same architecture, found tensors only "
            f"in the {ft_name}: {missing[:5]}, only in the {base_name}: {extra[:5]}"
        )
    embeddings = {f"{n}.weight" for n, k in (kinds or {}).items() if k == "embedding"}
    for key, ft in finetuned.items():
        if ft.shape != base[key].shape:
            hint = ""
            if key in embeddings and ft.dim() == 2 == base[key].dim():
                # [vocab, hidden]: say which of the two differs.
                hint = (
                    " (vocabulary sizes must match)"
                    if ft.shape[0] != base[key].shape[0]
                    else " (hidden sizes must match)"
                )
            raise ShapeError(
                f"{key}: expected the {ft_name}'s shape to equal the {base_name}'s "
                f"{list(base[key].shape)}, found {list(ft.shape)}{hint}"
            )


def check_finite(state: Mapping[str, torch.Tensor], which: str) -> None:
    for key, value in state.items():
        if value.is_meta:
            raise DTypeError(
                f"{which} {key}: expected a tensor with data, found a meta tensor "
                "(load the weights first, e.g. without device_map='meta' / low_cpu_mem_usage)"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = (~torch.isfinite(value)).nonzero()[0].tolist()
            raise NonFiniteError(f"{which} {key}: expected finite values, found NaN/Inf at {bad}")


def weight_delta(base_w: torch.Tensor, ft_w: torch.Tensor) -> torch.Tensor:
    """``ft - base`` as float32 on the CPU, subtracted in float64 for float64 weights
    (in float32 a delta far under the weights' float32 resolution would vanish)."""
    wide = torch.float64 in (base_w.dtype, ft_w.dtype)
    ct = torch.float64 if wide else torch.float32
    return (ft_w.detach().cpu().to(ct) - base_w.detach().cpu().to(ct)).float()


def pack_layer(
    name: str, base_w: torch.Tensor, ft_w: torch.Tensor, kind: LayerKind, bits: int, scale: str
) -> PackedLayer:
    """One layer's delta ``ft - base`` (float32) as planes + scales, ``[out, in]`` oriented."""
    delta = weight_delta(base_w, ft_w)
    transposed = kind == "conv1d"
    if transposed:
        delta = delta.T
    delta = delta.contiguous()
    try:
        planes, scales = pack_residual(delta, bits=bits, scale=scale)  # type: ignore[arg-type]
    except NonFiniteError as err:
        raise NonFiniteError(f"layer {name}: {err}") from None
    return PackedLayer(planes, scales, tuple(delta.shape), transposed=transposed)


def tied_aliases(
    base_sd: Mapping[str, torch.Tensor], ft_sd: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> dict[str, str]:
    """Key -> the first of ``keys`` that is the very same tensor in both the base and
    the fine-tune (tied embeddings and head), for every later such key."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key in keys:
        owner = first.setdefault((storage_key(base_sd[key]), storage_key(ft_sd[key])), key)
        if owner != key:
            aliases[key] = owner
    return aliases


def tied_twins(
    base_sd: Mapping[str, torch.Tensor],
    ft_sd: Mapping[str, torch.Tensor],
    names: Sequence[str],
    kinds: Mapping[str, LayerKind],
) -> dict[str, str]:
    """Layer -> the earlier layer of ``names`` whose weight is the very same tensor in
    both the base and the fine-tune (tied embeddings and head), in one orientation."""
    first: dict[tuple, str] = {}
    twins: dict[str, str] = {}
    for n in names:
        key = (
            storage_key(base_sd[f"{n}.weight"]),
            storage_key(ft_sd[f"{n}.weight"]),
            kinds[n] == "conv1d",
        )
        twin = first.setdefault(key, n)
        if twin != n:
            twins[n] = twin
    return twins


def _with_tied_twins(
    names: list[str],
    kinds: Mapping[str, LayerKind],
    base_sd: Mapping[str, torch.Tensor],
    ft_sd: Mapping[str, torch.Tensor],
    exclude: Patterns,
) -> list[str]:
    """``names`` plus every layer whose weight is one tensor with a chosen layer's
    (tied in both models): one tensor cannot be half compressed and half whole."""
    keys = [f"{n}.weight" for n in kinds]
    groups: dict[str, list[str]] = {}
    for key, owner in tied_aliases(base_sd, ft_sd, keys).items():
        groups.setdefault(owner, [owner]).append(key)
    chosen = set(names)
    unwanted = _as_list(exclude, "exclude")
    for group in groups.values():
        layers = [k.removesuffix(".weight") for k in group]
        picked = [n for n in layers if n in chosen]
        if not picked or len(picked) == len(layers):
            continue
        left = [n for n in layers if n not in chosen]
        excluded = [n for n in left if any(pattern_matches(p, n) for p in unwanted)]
        if excluded:
            raise TargetError(
                f"layers {picked} and {excluded} share one weight tensor (tied): expected "
                f"both compressed or both excluded, found {excluded} excluded"
            )
        chosen.update(left)
    return [n for n in kinds if n in chosen]


def kept_params(
    base_sd: Mapping[str, torch.Tensor], ft_sd: Mapping[str, torch.Tensor], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The fine-tune's tensors outside the compressed layers that differ from the base,
    kept whole; a tensor tied under several names (embeddings and head) is kept once,
    under its first name (consumers give it to every name the base ties to it)."""
    covered = {f"{n}.weight" for n in names}
    changed = [
        key
        for key, value in ft_sd.items()
        if key not in covered and not torch.equal(value, base_sd[key].to(value.device))
    ]
    aliases = tied_aliases(base_sd, ft_sd, changed)
    return {key: ft_sd[key].cpu().clone() for key in changed if key not in aliases}


def prepare_pair(
    base: ModelSource,
    finetuned: ModelSource,
    targets: Patterns,
    exclude: Patterns,
    compress_embeddings: bool,
) -> tuple[dict, dict, nn.Module | None, dict[str, str], list[str]]:
    """Both state dicts, the module (if any), layer kinds and the selected layer names,
    after checking the pair has one architecture and finite weights."""
    base_mod, ft_mod = as_module(base), as_module(finetuned)
    base_sd = state_dict_of(base_mod if base_mod is not None else base)  # type: ignore[arg-type]
    ft_sd = state_dict_of(ft_mod if ft_mod is not None else finetuned)  # type: ignore[arg-type]
    module = ft_mod if ft_mod is not None else base_mod
    kinds = layer_kinds(module) if module is not None else guess_layer_kinds(ft_sd)
    kinds = {n: k for n, k in kinds.items() if f"{n}.weight" in ft_sd}
    check_same_architecture(base_sd, ft_sd, kinds)
    check_finite(base_sd, "base")
    check_finite(ft_sd, "fine-tune")
    names = select_targets(kinds, targets, exclude, compress_embeddings)
    names = _with_tied_twins(names, kinds, base_sd, ft_sd, exclude)
    return base_sd, ft_sd, module, kinds, names


def compress(
    base: ModelSource,
    finetuned: ModelSource,
    *,
    bits: int = 1,
    scale: ScaleMode = "matrix",
    targets: Patterns = None,
    exclude: Patterns = None,
    compress_embeddings: bool = False,
    tenant: str = "",
) -> Delta:
    """The fine-tune as a :class:`Delta` against ``base``.

    ``base`` / ``finetuned``: ``nn.Module``, state dict, or a local Hugging
    Face model directory. ``bits``: sign planes per layer (1 = BitDelta).
    ``scale``: one scale per plane (``"matrix"``) or per plane and output row
    (``"row"``). ``targets`` / ``exclude``: exact names, suffixes or regexes of
    layers (see :func:`select_targets`). Tensors not compressed are stored
    whole when they differ from the base. With only state dicts, every 2-D
    ``*.weight`` is taken for an ``nn.Linear`` weight ``[out, in]``.
    """
    check_scale_mode(scale)  # before the (slow) state-dict work
    base_sd, ft_sd, module, kinds, names = prepare_pair(
        base, finetuned, targets, exclude, compress_embeddings
    )
    twins = tied_twins(base_sd, ft_sd, names, kinds)
    layers: dict[str, PackedLayer] = {}
    for n in names:
        if n in twins:
            # The same tensor as an earlier layer (tied embeddings and head): the same
            # planes, bit for bit, so merge() can add it once to the one weight.
            src = layers[twins[n]]
            layers[n] = PackedLayer(src.planes.copy(), src.scales.copy(), src.shape, src.transposed)
        else:
            layers[n] = pack_layer(
                n, base_sd[f"{n}.weight"], ft_sd[f"{n}.weight"], kinds[n], bits, scale
            )
    params = kept_params(base_sd, ft_sd, names)
    metadata = {
        "bits": str(bits),
        "scale": scale,
        "architecture": type(module).__name__ if module is not None else "state_dict",
        "compress_embeddings": str(bool(compress_embeddings)).lower(),
    }
    return Delta(
        layers=layers,
        params=params,
        base_fingerprint=fingerprint(base_sd),
        tenant=tenant,
        metadata=metadata,
    )
