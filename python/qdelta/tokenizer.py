"""A byte-level tokenizer: ids 0..255 are the bytes of UTF-8 text, then a few specials.

No hub tokenizer is reachable offline, and bytes need no training: any text
round-trips exactly (invalid UTF-8 in ``decode`` becomes U+FFFD).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from qdelta.atomic_io import read_regular_text, write_json_atomic
from qdelta.errors import FileError, FormatError

TOKENIZER_FILE = "qdelta_tokenizer.json"


class ByteTokenizer:
    """256 byte ids followed by ``<bos>``, ``<eos>``, ``<pad>``."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    specials: ClassVar[dict[str, int]] = {"<bos>": 256, "<eos>": 257, "<pad>": 258}

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    @property
    def pad_token_id(self) -> int:
        return self.pad_id

    def __call__(self, text: str) -> dict[str, list[int]]:
        """``{"input_ids": ...}`` with a leading ``<bos>`` (as the zoo's models were
        trained), the callable form calibration and Hugging Face code expect."""
        return {"input_ids": self.encode(text, bos=True)}

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids are dropped."""
        data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "qdelta-byte", "vocab_size": self.vocab_size, "specials": self.specials}

    def save(self, directory: str | Path) -> Path:
        return write_json_atomic(Path(directory) / TOKENIZER_FILE, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        tok = cls()
        try:
            text = read_regular_text(path)
        except (OSError, FileError) as e:
            raise FileError(f"expected a byte tokenizer file at {path}, found: {e}") from e
        except ValueError as e:  # not UTF-8
            raise FormatError(f"{path}: expected {tok.to_dict()} as JSON, found: {e}") from e
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise FormatError(f"{path}: expected {tok.to_dict()} as JSON, found: {e}") from e
        # Any JSON value may be there ([] or a number): check it is the object we write.
        if (
            not isinstance(spec, dict)
            or spec.get("type") != "qdelta-byte"
            or spec.get("specials") != tok.specials
        ):
            raise FormatError(f"{path}: expected {tok.to_dict()}, found {spec!r:.200}")
        return tok
