"""Delta algebra: dense deltas, model soups and task arithmetic over fine-tunes.

A :class:`DenseDelta` is a fine-tune of one base as float32 weight deltas
(``finetuned - base``, ``[out, in]`` oriented like :class:`PackedLayer`) plus
the parameters kept whole (the fine-tune's *values*, as in ``Delta.params``).
Compressed :class:`Delta` s decompress to it and it recompresses through the
Rust core (:meth:`DenseDelta.compress`).

:func:`combine` is the one primitive: ``sum_i w_i * delta_i`` in float64.
:func:`soup` is its average (weights summing to 1), :func:`greedy_soup` the
model soups paper's greedy recipe. Parameters kept whole combine as
``base + sum_i w_i (value_i - base)``; the base is only needed when the
weights do not sum to 1 or some input lacks a parameter another one has.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qdelta.bitplane import ScaleMode, pack_residual
from qdelta.compress import Patterns, kept_params, prepare_pair, weight_delta
from qdelta.delta import Delta, PackedLayer
from qdelta.errors import (
    AlgebraError,
    BaseMismatchError,
    DTypeError,
    ModelMismatchError,
    NonFiniteError,
    ShapeError,
)
from qdelta.nn import added_delta, check_delta_fits, merge_param_targets
from qdelta.sources import ModelSource, as_module, state_dict_of, storage_key
from qdelta.store import check_base, fingerprint


@dataclass(eq=False)  # identity hash: a DenseDelta can key a combine() mapping
class DenseDelta:
    """A fine-tune relative to one base, uncompressed.

    ``layers``: module name -> float32 ``[out, in]`` weight delta.
    ``params``: state-dict name -> the fine-tune's value (kept whole).
    ``transposed``: layers whose module stores the weight ``[in, out]`` (Conv1D).
    """

    layers: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    base_fingerprint: str
    transposed: frozenset[str] = frozenset()
    tenant: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_delta(cls, delta: Delta) -> DenseDelta:
        """Decompress every layer of ``delta`` (all its planes) to float32."""
        return cls(
            layers={
                n: torch.from_numpy(layer.dense("float32")) for n, layer in delta.layers.items()
            },
            params={k: v.clone() for k, v in delta.params.items()},
            base_fingerprint=delta.base_fingerprint,
            transposed=frozenset(n for n, layer in delta.layers.items() if layer.transposed),
            tenant=delta.tenant,
            metadata=dict(delta.metadata),
        )

    @property
    def nbytes(self) -> int:
        tensors = [*self.layers.values(), *self.params.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def compress(
        self, bits: int = 1, scale: ScaleMode = "matrix", tenant: str | None = None
    ) -> Delta:
        """This delta as ``bits`` sign planes per layer (greedy residual, Rust core)."""
        layers = {}
        for name, d in self.layers.items():
            try:
                planes, scales = pack_residual(d.float().contiguous(), bits=bits, scale=scale)
            except NonFiniteError as err:
                raise NonFiniteError(f"layer {name}: {err}") from None
            layers[name] = PackedLayer(
                planes, scales, tuple(d.shape), transposed=name in self.transposed
            )
        metadata = {**self.metadata, "bits": str(bits), "scale": scale}
        metadata.setdefault("source", "full")
        return Delta(
            layers=layers,
            params={k: v.clone() for k, v in self.params.items()},
            base_fingerprint=self.base_fingerprint,
            tenant=self.tenant if tenant is None else tenant,
            metadata=metadata,
        )

    def save(self, path: Any, bits: int = 1, scale: ScaleMode = "matrix") -> None:
        """Compress to ``bits`` planes and write a .qdelta file (atomically)."""
        self.compress(bits=bits, scale=scale).save(path)

    @torch.no_grad()
    def merge_into(self, model: torch.nn.Module, *, check: bool = True) -> torch.nn.Module:
        """Write base + this delta into ``model`` (the base) in place, like :func:`qdelta.merge`.

        Every layer and param is checked (:class:`ModelMismatchError` for a
        missing one, :class:`ShapeError` for another shape) before anything is
        written, so a refused merge leaves ``model`` as it was.
        """
        if check:
            check_base(self, model)
        weights = {name: self._target_weight(model, name) for name in self.layers}
        # One value per tensor the model ties under several names (a fine-tune that
        # untied its head cannot be written into a model whose head is its embedding).
        targets = merge_param_targets(model, self.params, what=lambda key: f"param {key!r}")
        twins = self._tied_twins(weights)
        for name, weight in weights.items():  # a weight that would overflow: nothing written
            if name not in twins:  # a tied weight takes its (one) delta once
                check_delta_fits(weight, self.weight(name), name)
        for name, weight in weights.items():
            if name not in twins:
                weight.copy_(added_delta(weight, self.weight(name)))
        for key, target in targets.items():
            target.copy_(self.params[key].to(device=target.device, dtype=target.dtype))
        return model

    def _tied_twins(self, weights: Mapping[str, torch.Tensor]) -> set[str]:
        """Layers whose weight is the same tensor as an earlier layer's (tied embeddings
        and head): their delta is already added through that one. Refuses tied layers
        with different deltas (a tied model holds one weight)."""
        sharing: dict[tuple, list[str]] = {}
        for name, w in weights.items():
            where = (id(w),) if w.is_meta else (w.device, w.untyped_storage().data_ptr())
            key = (*where, w.storage_offset(), tuple(w.shape), tuple(w.stride()))
            sharing.setdefault(key, []).append(name)
        twins: set[str] = set()
        for names in (n for n in sharing.values() if len(n) > 1):
            for other in names[1:]:
                if not torch.equal(self.weight(names[0]), self.weight(other)):
                    raise ModelMismatchError(
                        f"layers {names[0]!r} and {other!r}: expected one delta for the "
                        "weight they share (tied), found two different ones; untie the "
                        "weights first (e.g. model.lm_head.weight = "
                        "nn.Parameter(model.lm_head.weight.clone()))"
                    )
                twins.add(other)
        return twins

    def _target_weight(self, model: torch.nn.Module, name: str) -> torch.Tensor:
        """Layer ``name``'s weight in ``model``, checked against this delta's shape."""
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelMismatchError(
                f"layer {name!r}: expected the model to have this module, found none"
            ) from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ModelMismatchError(
                f"layer {name!r}: expected a module with a weight tensor, "
                f"found {type(module).__name__} without one"
            )
        want = tuple(self.weight(name).shape)
        if tuple(weight.shape) != want:
            raise ShapeError(
                f"layer {name}: expected a {list(weight.shape)} delta, found {list(want)}"
            )
        return weight

    def weight(self, name: str) -> torch.Tensor:
        """Layer ``name``'s delta in the module's own orientation (transposed for Conv1D)."""
        d = self.layers[name]
        return d.T if name in self.transposed else d

    def __neg__(self) -> DenseDelta:
        return combine([(self, -1.0)])

    def __mul__(self, weight: float) -> DenseDelta:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise DTypeError(
                f"delta * weight: expected a real number, found {type(weight).__name__}"
            )
        return combine([(self, float(weight))])

    __rmul__ = __mul__

    def __add__(self, other: DenseDelta) -> DenseDelta:
        return combine([(self, 1.0), (other, 1.0)])

    def __sub__(self, other: DenseDelta) -> DenseDelta:
        return combine([(self, 1.0), (other, -1.0)])


AnyDelta = Delta | DenseDelta


def as_dense(delta: AnyDelta) -> DenseDelta:
    """A dense view of ``delta`` (itself when already dense)."""
    if isinstance(delta, DenseDelta):
        return delta
    if isinstance(delta, Delta):
        return DenseDelta.from_delta(delta)
    raise AlgebraError(f"expected a Delta or a DenseDelta, found {type(delta).__name__}")


def dense_delta(
    base: ModelSource,
    finetuned: ModelSource,
    *,
    targets: Patterns = None,
    exclude: Patterns = None,
    compress_embeddings: bool = False,
    tenant: str = "",
) -> DenseDelta:
    """``finetuned - base`` per layer (float32), selected like :func:`qdelta.compress`."""
    base_sd, ft_sd, module, kinds, names = prepare_pair(
        base, finetuned, targets, exclude, compress_embeddings
    )
    layers, transposed = {}, set()
    for n in names:
        d = weight_delta(base_sd[f"{n}.weight"], ft_sd[f"{n}.weight"])
        if kinds[n] == "conv1d":
            d = d.T
            transposed.add(n)
        layers[n] = d.contiguous()
    params = kept_params(base_sd, ft_sd, names)
    return DenseDelta(
        layers=layers,
        params=params,
        base_fingerprint=fingerprint(base_sd),
        transposed=frozenset(transposed),
        tenant=tenant,
        metadata={
            "source": "full",
            "architecture": type(module).__name__ if module is not None else "state_dict",
        },
    )


# --------------------------------------------------------------------------- combine


def _label(delta: AnyDelta, i: int) -> str:
    return delta.tenant or f"#{i}"


def _check_compatible(deltas: Sequence[AnyDelta]) -> None:
    """Same base fingerprint, same layers, shapes and orientation; else a clear error."""
    first = deltas[0]
    ref = _layer_specs(first)
    for i, other in enumerate(deltas[1:], start=1):
        if other.base_fingerprint != first.base_fingerprint:
            raise BaseMismatchError(
                f"deltas {_label(first, 0)!r} and {_label(other, i)!r}: expected one base, "
                f"found base fingerprints {first.base_fingerprint} and {other.base_fingerprint}"
            )
        specs = _layer_specs(other)
        if set(specs) != set(ref):
            only_a = sorted(set(ref) - set(specs))[:5]
            only_b = sorted(set(specs) - set(ref))[:5]
            raise ModelMismatchError(
                f"deltas {_label(first, 0)!r} and {_label(other, i)!r}: expected the same layers, "
                f"found layers only in the first: {only_a}, only in the second: {only_b}"
            )
        for name, spec in ref.items():
            if specs[name] != spec:
                raise ShapeError(
                    f"layer {name}: expected shape {list(spec[0])} (transposed={spec[1]}) as in "
                    f"{_label(first, 0)!r}, found {list(specs[name][0])} "
                    f"(transposed={specs[name][1]}) in {_label(other, i)!r}"
                )


def _layer_specs(delta: AnyDelta) -> dict[str, tuple[tuple[int, int], bool]]:
    if isinstance(delta, DenseDelta):
        return {n: (tuple(d.shape), n in delta.transposed) for n, d in delta.layers.items()}
    return {n: (layer.shape, layer.transposed) for n, layer in delta.layers.items()}


def _pairs(deltas: Any) -> list[tuple[AnyDelta, float]]:
    items = deltas.items() if isinstance(deltas, Mapping) else deltas
    pairs = []
    for item in items:
        try:
            delta, weight = item
        except (TypeError, ValueError):
            raise AlgebraError(
                "combine: expected a mapping {delta: weight} or (delta, weight) pairs, "
                f"found an item of type {type(item).__name__}"
            ) from None
        if not isinstance(delta, (Delta, DenseDelta)):
            raise AlgebraError(f"combine: expected a Delta or DenseDelta, found {type(delta)}")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise AlgebraError(
                f"combine: expected a number as the weight of input #{len(pairs)}, found {weight!r}"
            ) from None
        if not math.isfinite(w):
            raise AlgebraError(f"combine: expected finite weights, found {weight!r}")
        pairs.append((delta, w))
    if not pairs:
        raise AlgebraError("combine: expected at least one delta, found none")
    return pairs


def _combine_params(
    pairs: list[tuple[DenseDelta, float]], base: ModelSource | None, fp: str
) -> dict[str, torch.Tensor]:
    total_w = sum(w for _, w in pairs)
    keys = sorted({k for d, _ in pairs for k in d.params})
    affine = math.isclose(total_w, 1.0, rel_tol=0, abs_tol=1e-9)
    needs_base = [k for k in keys if not affine or any(k not in d.params for d, _ in pairs)]
    base_sd: dict[str, torch.Tensor] = {}
    if needs_base:
        if base is None:
            why = (
                f"the weights sum to {total_w:g}, not 1" if not affine else "not every input has it"
            )
            raise AlgebraError(
                f"param {needs_base[0]!r}: expected base= (the base model) to combine parameters "
                f"kept whole, because {why}"
            )
        mod = as_module(base)
        base_sd = state_dict_of(mod if mod is not None else base)  # type: ignore[arg-type]
        check_base(pairs[0][0], fingerprint(base_sd))
    tied: dict[tuple, list[str]] = {}  # the base's tensors under several names
    for k, v in base_sd.items():
        tied.setdefault(storage_key(v), []).append(k)

    def held(d: DenseDelta, k: str) -> torch.Tensor | None:
        """The input's value of ``k``: kept under ``k``, or under a name the base ties
        to it (a delta keeps a tied tensor once), else None (the base's value)."""
        if k in d.params:
            return d.params[k]
        names = tied.get(storage_key(base_sd[k]), []) if k in base_sd else []
        return next((d.params[n] for n in names if n in d.params), None)

    out = {}
    for k in keys:
        first = next(d.params[k] for d, _ in pairs if k in d.params)
        ref = base_sd[k].double() if k in base_sd else None
        acc = torch.zeros(first.shape, dtype=torch.float64)
        if ref is not None and ref.shape != acc.shape:
            raise ShapeError(
                f"param {k}: expected the base's shape {list(ref.shape)} in every input, "
                f"found {list(acc.shape)}"
            )
        for i, (d, w) in enumerate(pairs):
            mine = held(d, k)
            value = mine.double() if mine is not None else ref
            if value is None:
                raise AlgebraError(f"param {k}: expected the base (base=) to have it, found none")
            if value.shape != acc.shape:
                raise ShapeError(
                    f"param {k}: expected shape {list(acc.shape)} in every input, found "
                    f"{list(value.shape)} in {_label(d, i)}"
                )
            acc += w * (value - ref if ref is not None else value)
        if ref is not None:
            acc += ref
        out[k] = _cast_back(acc, first.dtype, k)
    return out


def _check_finite_result(
    tensors: Mapping[str, torch.Tensor], pairs: list[tuple[DenseDelta, float]]
) -> None:
    """A combination is finite, or a NonFiniteError naming the tensor and the input
    that brought the NaN/Inf (or an overflow of the weighted sum)."""
    for name, t in tensors.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        culprits = [
            _label(d, i)
            for i, (d, _) in enumerate(pairs)
            if not bool(
                torch.isfinite(d.layers.get(name, d.params.get(name, t.new_zeros(())))).all()
            )
        ]
        where = f"from {', '.join(culprits)}" if culprits else "(the weighted sum overflowed)"
        raise NonFiniteError(
            f"{name}: expected finite values in the combination, found NaN/Inf {where}"
        )


def _cast_back(acc: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """``acc`` (float64) as ``dtype``; an integer or bool param must come out exact."""
    out = acc.to(dtype)
    if dtype.is_floating_point or dtype.is_complex or torch.equal(out.double(), acc):
        return out
    # A cast would truncate (or wrap) silently: (1 + 2) / 2 is not 1.
    bad = acc[out.double() != acc].flatten()[0].item()
    raise DTypeError(
        f"param {key!r}: expected a result exact in its dtype {dtype}, found {bad:g} "
        "(writing it back would truncate it)"
    )


def combine(
    deltas: Mapping[AnyDelta, float] | Iterable[tuple[AnyDelta, float]],
    *,
    base: ModelSource | None = None,
    bits: int | None = None,
    scale: ScaleMode | None = None,
    dense: bool = False,
    source: str = "combine",
) -> AnyDelta:
    """Task arithmetic: ``sum_i w_i * delta_i`` (weights may be negative).

    ``deltas``: ``{delta: weight}`` or ``(delta, weight)`` pairs, any mix of
    :class:`Delta` and :class:`DenseDelta` (both hash by identity, so one
    object is one key; pass pairs to list an object twice). All must share one
    base fingerprint
    (:class:`BaseMismatchError` naming both) and the same layers and shapes.
    The result is a :class:`Delta` with ``bits`` planes (default: the most any
    compressed input has) when an input is compressed or ``bits`` is given,
    else a :class:`DenseDelta` (``dense=True`` forces dense). The compressed
    result's scale mode (``scale``) defaults to ``"row"`` when every compressed
    input has row scales, else ``"matrix"``. A sum is recompressed greedily, except
    one compressed delta times a weight (``soup([d])``, ``combine([(d, w)])``) with
    its own planes and scale mode: that one is exact (scales times ``|w|``, signs
    flipped for ``w < 0``). Integer or bool
    parameters kept whole must come out whole (else :class:`DTypeError`).
    """
    pairs = _pairs(deltas)
    _check_compatible([d for d, _ in pairs])
    compressed = [d for d, _ in pairs if isinstance(d, Delta)]
    dense_pairs = [(as_dense(d), w) for d, w in pairs]
    first = dense_pairs[0][0]
    layers = {}
    for name, ref in first.layers.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for d, w in dense_pairs:
            acc.add_(d.layers[name].double(), alpha=w)
        layers[name] = acc.float()
    params = _combine_params(dense_pairs, base, first.base_fingerprint)
    _check_finite_result({**layers, **params}, dense_pairs)
    result = DenseDelta(
        layers=layers,
        params=params,
        base_fingerprint=first.base_fingerprint,
        transposed=first.transposed,
        metadata={
            "source": source,
            "ingredients": ",".join(_label(d, i) for i, (d, _) in enumerate(pairs)),
            "weights": ",".join(f"{w:.6g}" for _, w in pairs),
        },
    )
    if dense or (bits is None and not compressed):
        return result
    if bits is None:
        bits = max(max(layer.bits for layer in d.layers.values()) for d in compressed)
    if scale is None:
        modes = {layer.scale_mode for d in compressed for layer in d.layers.values()}
        scale = "row" if modes == {"row"} else "matrix"
    exact = _scaled_exactly(pairs, bits, scale)
    if exact is not None:
        metadata = {**result.metadata, "bits": str(bits), "scale": scale}
        return Delta(
            layers=exact,
            params={k: v.clone() for k, v in params.items()},
            base_fingerprint=first.base_fingerprint,
            tenant=result.tenant,
            metadata=metadata,
        )
    return result.compress(bits=bits, scale=scale)


def _scaled_exactly(
    pairs: list[tuple[AnyDelta, float]], bits: int, scale: str
) -> dict[str, PackedLayer] | None:
    """``w * delta`` of one compressed delta (listed once or more) with the planes
    and scale mode asked for, without recompressing (a greedy refit of its own
    dense sum would change a residual delta): scales times ``|w|``, the signs
    flipped for ``w < 0``. None where that does not apply."""
    delta = pairs[0][0]
    if not isinstance(delta, Delta) or any(d is not delta for d, _ in pairs):
        return None
    w = math.fsum(weight for _, weight in pairs)
    layers = delta.layers.values()
    if w == 0 or any(layer.bits != bits or layer.scale_mode != scale for layer in layers):
        return None
    out = {}
    for name, layer in delta.layers.items():
        planes = layer.planes if w > 0 else _flipped(layer.planes, layer.shape[1])
        scales = (layer.scales.astype(np.float64) * abs(w)).astype(np.float32)
        if not np.isfinite(scales).all():
            return None  # the recompression path names the layer that overflows
        out[name] = PackedLayer(planes, scales, layer.shape, layer.transposed)
    return out


def _flipped(planes: np.ndarray, in_features: int) -> np.ndarray:
    """Every sign negated; the tail padding bits of each row stay 0 (docs/FORMAT.md)."""
    flipped = ~planes
    tail = in_features % 32
    if tail:
        flipped[..., -1] &= np.uint32((1 << tail) - 1)
    return flipped


def soup(
    deltas: Sequence[AnyDelta],
    weights: Sequence[float] | None = None,
    *,
    base: ModelSource | None = None,
    bits: int | None = None,
    scale: ScaleMode | None = None,
    dense: bool = False,
) -> AnyDelta:
    """A model soup in delta space: the uniform (or ``weights``-normalised) average.

    Compressed inputs are decompressed, averaged and recompressed to their bits
    (``bits`` / ``dense`` as in :func:`combine`). Save the result with
    ``.save(path)`` (compressed) like any tenant. ``weights``: one finite,
    non-negative number per delta, not all zero. Integer (or bool) parameters
    kept whole must average to whole values: a fraction raises
    :class:`DTypeError` rather than being truncated.
    """
    deltas = list(deltas)
    if not deltas:
        raise AlgebraError("soup: expected at least one delta, found none")
    weights = _soup_weights(weights, len(deltas))
    return combine(
        list(zip(deltas, weights, strict=True)),
        base=base,
        bits=bits,
        scale=scale,
        dense=dense,
        source="soup",
    )


def _soup_weights(weights: Any, n: int) -> list[float]:
    """``weights`` (or uniform) normalised to sum to 1, each checked first."""
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise AlgebraError(f"soup: expected a sequence of weights, found {type(weights).__name__}")
    out = []
    for i, w in enumerate(weights):
        try:
            f = float(w)
        except (TypeError, ValueError):
            raise AlgebraError(f"soup: weight {i}: expected a number, found {w!r}") from None
        if not math.isfinite(f):
            raise AlgebraError(f"soup: weight {i}: expected a finite number, found {f}")
        if f < 0:
            raise AlgebraError(f"soup: weight {i}: expected a non-negative number, found {f}")
        out.append(f)
    if len(out) != n:
        raise AlgebraError(f"soup: expected {n} weights, found {len(out)}")
    # Divide by the largest first: the sum of huge weights cannot overflow to inf.
    top = max(out)
    if not top > 0:
        raise AlgebraError(f"soup: expected weights with a positive sum, found {out}")
    scaled = [w / top for w in out]
    total = sum(scaled)
    return [w / total for w in scaled]


@dataclass
class GreedySoup:
    """What :func:`greedy_soup` chose: the soup, the kept ingredients (input
    indices, in the order tried) and every score it measured.

    ``selection_score``: the score of the dense uniform soup of ``chosen``, the
    one the selection compared. ``soup_score``: the score of ``soup`` as
    returned; it differs from ``selection_score`` when the result was
    recompressed (any input compressed, or ``bits=``), and is measured again
    on it then, else equal.
    """

    soup: AnyDelta
    chosen: list[int]
    order: list[int]
    individual_scores: list[float]
    soup_score: float
    history: list[tuple[int, float, bool]]  # (ingredient tried, soup score with it, kept)
    selection_score: float


def greedy_soup(
    deltas: Iterable[AnyDelta],
    score_fn: Callable[[DenseDelta], float],
    *,
    lower_is_better: bool = True,
    base: ModelSource | None = None,
    bits: int | None = None,
) -> GreedySoup:
    """The model soups paper's greedy soup (Wortsman et al. 2022, Algorithm 1).

    Score every ingredient alone, sort best first (stable: ties keep input
    order), start the soup with the best and add each next ingredient only if
    the held-out score of the dense uniform soup with it is strictly better
    than without it: a tie leaves the ingredient out (the smaller soup).
    ``score_fn`` gets a :class:`DenseDelta` (e.g. held-out perplexity:
    ``lower_is_better``). The returned soup is recompressed like :func:`soup`
    when an input is compressed or ``bits`` is given; its own score is
    ``soup_score`` (see :class:`GreedySoup`). Every score must be a finite
    number: NaN or infinity raises :class:`AlgebraError` naming what was scored.
    """
    deltas = list(deltas)  # indexed again at the end: a generator would be spent
    dense = [as_dense(d) for d in deltas]
    if not dense:
        raise AlgebraError("greedy_soup: expected at least one delta, found none")
    _check_compatible(dense)

    def score(d: DenseDelta, what: str) -> float:
        # NaN sorts and compares arbitrarily and an infinite score ties or wins for
        # good: neither can rank ingredients, so refuse it rather than pick by it.
        value = score_fn(d)
        try:
            s = float(value)
        except (TypeError, ValueError):
            s = math.nan
        if not math.isfinite(s):
            raise AlgebraError(
                f"greedy_soup: score_fn on {what}: expected a finite number, found {value!r}"
            )
        return s

    def name(i: int) -> str:
        return f"ingredient {i} ({_label(deltas[i], i)!r})"

    scores = [score(d, name(i)) for i, d in enumerate(dense)]

    def better(a: float, b: float) -> bool:
        return a < b if lower_is_better else a > b

    order = sorted(range(len(dense)), key=lambda i: scores[i], reverse=not lower_is_better)
    chosen, best, history = [order[0]], scores[order[0]], []
    for i in order[1:]:
        candidate = soup([dense[j] for j in [*chosen, i]], base=base, dense=True)
        s = score(candidate, f"the soup with {name(i)}")  # type: ignore[arg-type]
        kept = better(s, best)
        history.append((i, s, kept))
        if kept:
            chosen.append(i)
            best = s
    inputs = [deltas[j] for j in chosen]
    result = soup(inputs, base=base, bits=bits)
    result.metadata["source"] = "soup"
    result.metadata["recipe"] = "greedy"
    # A dense result is the soup scored last for ``chosen``; a recompressed one is not.
    final = score(as_dense(result), "the recompressed soup") if isinstance(result, Delta) else best
    return GreedySoup(result, chosen, order, scores, final, history, best)
