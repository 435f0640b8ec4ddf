"""The ```python blocks of the README and docs/, as the test of them finds them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Snippet:
    doc: str  # path relative to the repository root
    index: int  # 0-based among the doc's python blocks
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def key(self) -> str:
        return f"{self.doc}#{self.index}"

    def compiled(self):
        # Compiled under the doc's name and line, so a failure points into the doc.
        padded = "\n" * self.line + self.code
        return compile(padded, f"{self.doc} (python block {self.index})", "exec")


def snippets(doc: str) -> list[Snippet]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [
        Snippet(doc, i, text.count("\n", 0, m.start()) + 1, m.group(1))
        for i, m in enumerate(_FENCE.finditer(text))
    ]


def all_snippets() -> list[Snippet]:
    return [s for doc in DOCS for s in snippets(doc)]
