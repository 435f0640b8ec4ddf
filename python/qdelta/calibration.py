"""Calibration data for scale distillation as padded token batches.

Accepted: a list of strings (one sequence each, needs a tokenizer), the path
of a text file (tokenized whole and cut into ``seq_len`` windows, needs a
tokenizer), token ids as a tensor (``[n, L]`` rows or a 1-D stream), or a
mapping with ``input_ids`` (and optionally ``attention_mask``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdelta.atomic_io import file_kind, read_regular_text
from qdelta.errors import CalibrationError, FileError

Calibration = (
    Sequence[str] | Sequence[Sequence[int]] | str | os.PathLike | torch.Tensor | Mapping[str, Any]
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _int_tensor(ids: torch.Tensor, what: str) -> torch.Tensor:
    # bool and complex are not floating point either, and are no token ids
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(
            f"{what}: expected integer token ids, found {ids.dtype} {list(ids.shape)}"
        )
    return ids


def _check_ids(ids: list[int], what: str) -> list[int]:
    bad = next((i for i in ids if i < 0), None)
    if bad is not None:
        raise CalibrationError(f"{what}: expected token ids >= 0, found {bad}")
    return ids


def _check_min(ids: torch.Tensor, what: str) -> None:
    if ids.numel() and int(ids.min()) < 0:
        raise CalibrationError(f"{what}: expected token ids >= 0, found {int(ids.min())}")


def _encode(tokenizer: Callable[..., Any] | None, text: str, what: str) -> list[int]:
    if tokenizer is None:
        raise CalibrationError(
            f"calibration {what}: expected a tokenizer to encode text, found None"
        )
    if not callable(tokenizer):
        raise CalibrationError(
            f"calibration {what}: expected a callable tokenizer (text -> token ids), "
            f"found {type(tokenizer).__name__}"
        )
    out = tokenizer(text)
    if isinstance(out, Mapping) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
        if "input_ids" not in out:
            raise CalibrationError(
                f"tokenizer output for {what}: expected 'input_ids', found {sorted(out.keys())}"
            )
        out = out["input_ids"]
    if isinstance(out, np.ndarray):
        out = torch.as_tensor(out)
    if isinstance(out, torch.Tensor):
        out = _int_tensor(out, f"tokenizer output for {what}")
        if out.dim() == 2 and out.shape[0] == 1:  # one row, as from return_tensors="pt"
            out = out[0]
        if out.dim() != 1:
            raise CalibrationError(
                f"tokenizer output for {what}: expected token ids [L] or [1, L], "
                f"found shape {list(out.shape)}"
            )
        out = out.tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise CalibrationError(
            f"tokenizer output for {what}: expected token ids (a list of ints or a mapping "
            f"with input_ids), found {type(out).__name__}"
        )
    if len(out) == 1 and isinstance(out[0], Sequence) and not isinstance(out[0], str):
        out = out[0]  # one row of a batch
    bad = next((i for i in out if not _is_int(i)), None)
    if bad is not None:
        raise CalibrationError(
            f"tokenizer output for {what}: expected int token ids, found "
            f"{type(bad).__name__} {bad!r}"
        )
    return _check_ids([int(i) for i in out], f"tokenizer output for {what}")


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, strings, objects
        raise CalibrationError(
            f"calibration mapping {what}: expected a rectangular [n, L] or [L] array of "
            f"numbers, found {type(value).__name__} ({e})"
        ) from e


def _windows(stream: list[int], seq_len: int) -> list[list[int]]:
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), seq_len), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _sequences(calib: Calibration, tokenizer: Any, seq_len: int) -> list[list[int]]:
    if isinstance(calib, torch.Tensor):
        if calib.dim() not in (1, 2):
            raise CalibrationError(
                f"calibration tensor: expected integer token ids [n, L] or [L], "
                f"found {calib.dtype} {list(calib.shape)}"
            )
        _int_tensor(calib, "calibration tensor [n, L] or [L]")
        _check_min(calib, "calibration tensor")
        if calib.dim() == 1:
            return _windows(calib.tolist(), seq_len)
        return [row[:seq_len] for row in calib.tolist()]
    if isinstance(calib, Mapping):
        if "input_ids" not in calib:
            raise CalibrationError(
                f"calibration mapping: expected 'input_ids', found {sorted(calib)}"
            )
        ids = _as_tensor(calib["input_ids"], "input_ids")
        mask = ids.new_ones(ids.shape)
        if calib.get("attention_mask") is not None:
            mask = _as_tensor(calib["attention_mask"], "attention_mask")
        if ids.dim() not in (1, 2) or mask.shape != ids.shape:
            raise CalibrationError(
                "calibration mapping: expected input_ids [n, L] or [L] and an attention_mask "
                f"of the same shape, found shape {list(ids.shape)} and {list(mask.shape)}"
            )
        _int_tensor(ids, "calibration mapping input_ids")
        _check_min(ids[mask.bool()], "calibration mapping input_ids")  # padding may be anything
        if ids.dim() == 1:
            ids, mask = ids[None], mask[None]
        return [r[m.bool()].tolist()[:seq_len] for r, m in zip(ids, mask, strict=True)]
    if isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # a name too long for a path, or a NUL in it
            is_file = False
        if not is_file:
            shown = str(calib)
            if len(shown) > 80 or "\n" in shown:
                shown = f"{shown[:60]!r}... ({len(shown)} characters)"
            kind = file_kind(path)
            found = "no file" if kind == "nothing" else kind
            raise CalibrationError(
                f"calibration: expected a text file path, found {found} {shown}; pass "
                "calibration text as a list of strings"
            )
        try:
            text = read_regular_text(path)
        except UnicodeDecodeError as e:
            raise CalibrationError(
                f"calibration file {path}: expected UTF-8 text, found byte "
                f"0x{e.object[e.start]:02x} at offset {e.start} ({e.reason})"
            ) from e
        except (OSError, FileError) as e:
            raise CalibrationError(
                f"calibration file {path}: expected a readable file, found {e}"
            ) from e
        return _windows(_encode(tokenizer, text, str(path)), seq_len)
    if isinstance(calib, Sequence) and all(isinstance(s, str) for s in calib):
        return [_encode(tokenizer, s, "text")[:seq_len] for s in calib]
    if isinstance(calib, Sequence) and all(_is_id_row(s) for s in calib):
        return [_id_row(s, i)[:seq_len] for i, s in enumerate(calib)]
    raise CalibrationError(
        "calibration: expected a list of strings, a text file, token ids (a list of id "
        f"lists, a tensor or a mapping with input_ids), found {_describe(calib)}"
    )


def _is_id_row(row: Any) -> bool:
    """A list, tuple or 1-D integer array: one tokenized sequence (ragged rows are fine)."""
    if isinstance(row, np.ndarray):
        return row.ndim == 1
    return isinstance(row, list | tuple)


def _id_row(row: Any, index: int) -> list[int]:
    values = row.tolist() if isinstance(row, np.ndarray) else list(row)
    for value in values:
        if not _is_int(value) or value < 0:
            raise CalibrationError(
                f"calibration id list {index}: expected token ids (ints >= 0), found "
                f"{value!r} ({type(value).__name__})"
            )
    return [int(v) for v in values]


def _describe(calib: Any) -> str:
    if isinstance(calib, Sequence) and not isinstance(calib, str | bytes):
        kinds = sorted({type(s).__name__ for s in calib})
        return f"a {type(calib).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(calib).__name__


def prepare_calibration(
    calib: Calibration, tokenizer: Any = None, *, seq_len: int = 128, min_sequences: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both int64 ``[n, L]``, right-padded, ``L <= seq_len``.

    Empty sequences are dropped; fewer than ``min_sequences`` remaining is a
    :class:`CalibrationError`.
    """
    for name, value in (("seq_len", seq_len), ("min_sequences", min_sequences)):
        if not _is_int(value) or value < 1:
            raise CalibrationError(f"{name}: expected an int >= 1, found {value!r}")
    seqs = [s for s in _sequences(calib, tokenizer, seq_len) if s]
    if len(seqs) < min_sequences:
        tokens = sum(len(s) for s in seqs)
        raise CalibrationError(
            f"calibration data too short: expected at least {min_sequences} non-empty sequences "
            f"of up to {seq_len} tokens, found {len(seqs)} ({tokens} tokens)"
        )
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0
    return _pad(seqs, pad_id)
