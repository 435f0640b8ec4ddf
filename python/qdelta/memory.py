"""Memory arithmetic for serving N fine-tunes: N full models vs one base + N deltas.

The measured side (actual tensors) lives with the runtime
(:meth:`qdelta.MultiTenantModel.memory`); this module does the same sums for
model shapes we cannot build here, such as a 7B Llama.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, fields
from typing import Any

from qdelta.bitplane import MAX_PLANES
from qdelta.errors import ShapeError

LLAMA_7B = {"layers": 32, "hidden": 4096, "mlp": 11008, "vocab": 32000}


def _words(cols: int) -> int:
    return -(-cols // 32)


def _count(value: Any, what: str, most: int | None = None) -> int:
    """``value`` as an int in ``1..=most`` (Python or numpy int, not bool), else ShapeError."""
    n = None
    if not isinstance(value, bool):
        try:
            n = operator.index(value)
        except TypeError:
            pass
    if n is None or n < 1 or (most is not None and n > most):
        want = "an int >= 1" if most is None else f"an int in 1..={most}"
        raise ShapeError(f"{what}: expected {want}, found {value!r}")
    return n


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    mlp: int
    vocab: int

    def __post_init__(self) -> None:
        # Every dimension is a size: zero or negative gives no model (and 0 / 0 ratios).
        for f in fields(self):
            object.__setattr__(self, f.name, _count(getattr(self, f.name), f.name))

    @property
    def linear_weights(self) -> int:
        """q, k, v, o (hidden x hidden) and gate, up, down (hidden x mlp) per block."""
        return self.layers * (4 * self.hidden**2 + 3 * self.hidden * self.mlp)

    @property
    def linear_sign_bytes(self) -> int:
        """One sign plane of every block linear as packed: each row padded to whole
        32-bit words (``ceil(in / 32)`` of them), as the files and kernels hold it."""
        h, m = self.hidden, self.mlp
        return self.layers * 4 * (4 * h * _words(h) + 2 * m * _words(h) + h * _words(m))

    @property
    def embedding_sign_bytes(self) -> int:
        """One sign plane of the embedding (or the head), ``[vocab, hidden]``, packed."""
        return 4 * self.vocab * _words(self.hidden)

    @property
    def linear_rows(self) -> int:
        return self.layers * (4 * self.hidden + 2 * self.mlp + self.hidden)

    @property
    def norm_weights(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def embedding_weights(self) -> int:
        return self.vocab * self.hidden


def llama_serving_bytes(
    shape: LlamaShape,
    n: int,
    *,
    bits: int = 1,
    row_scales: bool = True,
    pack_embeddings: bool = False,
    dtype_bytes: int = 2,
) -> dict:
    """Bytes of N full models vs one base + N deltas, for an untied Llama.

    Each delta: ``bits`` sign planes of every block linear, float32 scales (per
    row or per matrix), norms whole; embeddings and head whole (BitDelta's
    choice) or packed like the linears (``pack_embeddings``). ``n`` (tenants),
    ``bits`` (1 to ``MAX_PLANES``) and ``dtype_bytes`` must be positive ints:
    with no tenant there is nothing to serve or compare.
    """
    if not isinstance(shape, LlamaShape):
        raise ShapeError(f"shape: expected a LlamaShape, found {type(shape).__name__}")
    n = _count(n, "n")
    bits = _count(bits, "bits", MAX_PLANES)
    dtype_bytes = _count(dtype_bytes, "dtype_bytes")
    full = dtype_bytes * (shape.linear_weights + 2 * shape.embedding_weights + shape.norm_weights)
    scales_per_plane = shape.linear_rows if row_scales else 7 * shape.layers
    delta = bits * shape.linear_sign_bytes + 4 * bits * scales_per_plane
    delta += dtype_bytes * shape.norm_weights
    if pack_embeddings:
        delta += 2 * bits * shape.embedding_sign_bytes
        delta += 2 * 4 * bits * (shape.vocab if row_scales else 1)
    else:
        delta += dtype_bytes * 2 * shape.embedding_weights
    return {
        "n": n,
        "full_models_bytes": n * full,
        "base_plus_deltas_bytes": full + n * delta,
        "ratio": n * full / (full + n * delta),
        "delta_bytes": delta,
        "shape": asdict(shape),
        "pack_embeddings": pack_embeddings,
    }
