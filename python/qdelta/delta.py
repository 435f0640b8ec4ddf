"""The in-memory form of a compressed fine-tune: what compress() makes, what
a .qdelta file holds, what the modules and the runtime consume."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from qdelta.bitplane import FloatName, unpack_residual, words_per_row
from qdelta.errors import DTypeError, NonFiniteError, ShapeError


@dataclass
class PackedLayer:
    """The weight delta of one linear layer as k sign planes + scales.

    ``shape`` is ``(out, in)``: the delta of ``nn.Linear.weight``. For modules
    that store the weight transposed (transformers' GPT-2 ``Conv1D``, weight
    ``[in, out]``) ``transposed`` is True and the planes still pack ``[out, in]``.
    """

    planes: np.ndarray  # uint32 [bits, out, ceil(in/32)]
    scales: np.ndarray  # float32 [bits] ("matrix") or [bits, out] ("row")
    shape: tuple[int, int]
    transposed: bool = False

    def __post_init__(self) -> None:
        out, inp = _layer_shape(self.shape)
        self.shape = (out, inp)
        for name in ("planes", "scales"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise DTypeError(
                    f"{name}: expected a numpy array, found {type(getattr(self, name)).__name__}"
                )
        if self.planes.dtype != np.uint32 or self.planes.ndim != 3:
            raise DTypeError(
                f"planes: expected uint32 [bits, out, words], found {self.planes.dtype} "
                f"with shape {self.planes.shape}"
            )
        bits = self.planes.shape[0]
        if self.planes.shape[1:] != (out, words_per_row(inp)):
            raise ShapeError(
                f"planes: expected shape [{bits}, {out}, {words_per_row(inp)}] for a "
                f"[{out}, {inp}] layer, found {list(self.planes.shape)}"
            )
        if self.scales.dtype != np.float32 or self.scales.shape not in ((bits,), (bits, out)):
            raise ShapeError(
                f"scales: expected float32 [{bits}] or [{bits}, {out}], found "
                f"{self.scales.dtype} {list(self.scales.shape)}"
            )
        finite = np.isfinite(self.scales)
        if not finite.all():
            at = np.unravel_index(int(np.argmin(finite)), self.scales.shape)
            raise NonFiniteError(
                f"scales: expected finite values, found {self.scales[at]} at index "
                f"{list(int(i) for i in at)}"
            )

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])

    @property
    def scale_mode(self) -> Literal["matrix", "row"]:
        return "matrix" if self.scales.ndim == 1 else "row"

    @property
    def nbytes(self) -> int:
        return int(self.planes.nbytes + self.scales.nbytes)

    def abs_bound(self) -> float:
        """An upper bound of max |delta| from the scales alone (each plane adds
        +-its scale): sum over planes of the largest |scale|, in float64, with
        room for the float32 rounding of the unpacked sum (under 2**-16 relative)."""
        scales = np.abs(self.scales.astype(np.float64))
        per_plane = scales if scales.ndim == 1 else scales.max(axis=1)
        return float(per_plane.sum()) * (1 + 2.0**-16)

    def dense(self, dtype: FloatName = "float32", bits: int | None = None) -> np.ndarray:
        """The ``[out, in]`` delta reconstructed from the first ``bits`` planes."""
        return unpack_residual(self.planes, self.scales, self.shape, dtype, bits)


def _layer_shape(shape: object) -> tuple[int, int]:
    """``(out, in)`` as two ints >= 1; refuses floats, bools and other lengths."""
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        dims = None
    if (
        dims is None
        or len(dims) != 2
        or not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims)
        or min(dims) < 1
    ):
        raise ShapeError(f"shape: expected (out, in), two ints >= 1, found {shape!r}")
    return int(dims[0]), int(dims[1])


@dataclass(eq=False)  # identity equality and hash: a Delta can key a combine() mapping
class Delta:
    """A fine-tune relative to one base.

    ``layers``: module name (e.g. ``model.layers.0.self_attn.q_proj``) -> packed
    weight delta. ``params``: parameters kept whole (embeddings, norms, head,
    biases that changed): the fine-tune's *value* in its own dtype, by
    state-dict name. ``base_fingerprint``: the fingerprint of the base weights
    the delta was made against.

    Equality is identity (so a ``Delta`` is hashable, e.g. as a key of
    ``qdelta.combine({delta: weight})``); compare contents field by field.
    """

    layers: dict[str, PackedLayer]
    params: dict[str, torch.Tensor]
    base_fingerprint: str
    tenant: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        packed = sum(layer.nbytes for layer in self.layers.values())
        return packed + sum(t.numel() * t.element_size() for t in self.params.values())

    def with_scales(self, scales: Mapping[str, np.ndarray] | None = None) -> Delta:
        """A copy with scales (float32, copied) of its own: ``scales[name]`` where given,
        else this delta's. Planes and whole tensors are shared (never written in place)."""
        scales = {} if scales is None else scales
        unknown = sorted(set(scales) - set(self.layers))
        if unknown:
            raise ShapeError(
                f"with_scales: expected layers of this delta, found {unknown[:5]} "
                f"(layers: {sorted(self.layers)[:5]}{', ...' if len(self.layers) > 5 else ''})"
            )
        layers = {}
        for name, layer in self.layers.items():
            try:
                layers[name] = PackedLayer(
                    layer.planes,
                    np.array(scales.get(name, layer.scales), dtype=np.float32, copy=True),
                    layer.shape,
                    layer.transposed,
                )
            except (ShapeError, DTypeError, NonFiniteError) as err:
                raise type(err)(f"layer {name}: {err}") from None
        return Delta(
            layers=layers,
            params=dict(self.params),
            base_fingerprint=self.base_fingerprint,
            tenant=self.tenant,
            metadata=dict(self.metadata),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write this delta as a .qdelta file, atomically (docs/FORMAT.md, "File format")."""
        from qdelta.store import save

        save(self, path)
