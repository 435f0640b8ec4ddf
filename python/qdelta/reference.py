"""Pure-torch reference of the bit layout: the oracle every backend is tested
against. Written for clarity, not speed; it shares no code with the Rust core.

Packed words are torch.int32 tensors holding the u32 bit patterns (torch has
no full uint32 support); ``>>`` on int32 then ``& 1`` still reads bit j.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.arange(WORD_BITS, device=device, dtype=torch.int64)


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` float -> ``[rows, ceil(cols/32)]`` int32 words (bit = sign bit)."""
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, found {delta.dim()}-D")
    if not torch.isfinite(delta).all():
        raise ValueError("expected finite values")
    rows, cols = delta.shape
    words = -(-cols // WORD_BITS)
    neg = torch.signbit(delta).to(torch.int64)
    neg = torch.nn.functional.pad(neg, (0, words * WORD_BITS - cols))
    packed = (neg.view(rows, words, WORD_BITS) << _bit_weights(delta.device)).sum(-1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """``[..., words]`` int32 words -> ``[..., cols]`` int64 bits (0/1)."""
    bits = (packed.to(torch.int64)[..., None] >> _bit_weights(packed.device)) & 1
    return bits.flatten(-2)[..., :cols]


def unpack_signs(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Packed words -> +1 / -1 (bit 1 = -1)."""
    return 1 - 2 * unpack_bits(packed, cols)


def unpack_planes(
    planes: torch.Tensor,
    scales: torch.Tensor,
    cols: int,
    bits: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``planes [k, rows, words]``, ``scales [k]`` or ``[k, rows]`` -> dense ``[rows, cols]``."""
    k = planes.shape[0] if bits is None else bits
    signs = unpack_signs(planes[:k], cols).to(torch.float64)
    s = scales[:k].to(torch.float64)
    s = s[:, None, None] if s.dim() == 1 else s[:, :, None]
    return (signs * s).sum(0).to(dtype)


def pack_residual(
    delta: torch.Tensor, bits: int, scale: str = "matrix"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual binarisation, float32 residuals, float64 means."""
    residual = delta.to(torch.float32).clone()
    planes, scales = [], []
    for _ in range(bits):
        mag = residual.abs().to(torch.float64)
        alpha = mag.mean() if scale == "matrix" else mag.mean(dim=1)
        alpha32 = alpha.to(torch.float32)
        planes.append(pack_signs(residual))
        scales.append(alpha32)
        sign = torch.where(torch.signbit(residual), -1.0, 1.0)
        a = alpha32 if scale == "matrix" else alpha32[:, None]
        residual = residual - a * sign
    return torch.stack(planes), torch.stack(scales)
