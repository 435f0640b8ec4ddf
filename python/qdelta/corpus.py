"""Offline text corpora for the model zoo, from files every machine of this image has.

Domains and their sources (see docs/ZOO.md):

- ``code``:  the running interpreter's standard library sources (``*.py``,
  test suites and site-packages excluded).
- ``prose``: English prose: the docstrings of those same stdlib files, plus the
  READMEs, NEWS, TODO and *.md / *.rst / *.txt files of /usr/share/doc
  (copyright files and changelogs excluded: they are boilerplate and lists).
- ``man``:   the English man pages (/usr/share/man/man1..8; gcloud's generated
  CLI pages excluded) with troff markup stripped by plain reading (no groff).

Determinism: file lists are sorted, then shuffled by a seeded RNG. Every file
(a "document") goes wholly to train or to eval, decided by a hash of its key,
so held-out text is never seen in training; a stdlib file's code and its
docstrings share one key, hence one side. Documents whose content was already
taken (byte-identical copies) are skipped. Each side is filled up to a fixed
byte budget, each document capped at ``max_doc_bytes``.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import os
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

DOMAINS = ("code", "prose", "man")
DOC_SEPARATOR = "\n\n"
_SPLIT_SALT = "qdelta-corpus-split-v1"

_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_DOC_NAME = re.compile(
    r"^(README|NEWS|TODO|FAQ|BUGS|INSTALL|USAGE|HACKING)([._-].*)?$|\.(md|rst|txt)$", re.I
)
_DOC_SKIP = re.compile(r"^(copyright|changelog.*|authors.*|thanks.*)$", re.I)


@dataclass(frozen=True)
class Source:
    """One candidate document: ``key`` decides its split, ``read`` gives its text (or None)."""

    label: str
    key: str
    read: Callable[[], str | None]


@dataclass
class DomainCorpus:
    """Train and held-out eval text of one domain, and the documents each holds."""

    domain: str
    train_text: str
    eval_text: str
    train_docs: list[str] = field(default_factory=list)
    eval_docs: list[str] = field(default_factory=list)
    candidates: int = 0

    def summary(self) -> dict:
        return {
            "train_bytes": len(self.train_text.encode()),
            "eval_bytes": len(self.eval_text.encode()),
            "train_docs": len(self.train_docs),
            "eval_docs": len(self.eval_docs),
            "candidate_files": self.candidates,
        }


# ---------------------------------------------------------------- readers


def _read_bytes(path: Path) -> bytes | None:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read(4 << 20)
        with open(path, "rb") as f:
            return f.read(4 << 20)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


def _as_text(data: bytes | None) -> str | None:
    """UTF-8 text with Unix newlines, or None for binary / mostly undecodable data."""
    if not data or b"\x00" in data[:4096]:
        return None
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") > len(text) // 100:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[str, Path]]:
    root = stdlib_dir()
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_STDLIB_DIRS)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def python_docstrings(source: str) -> str | None:
    """The module, class and function docstrings of Python source, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = [d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d and len(d) > 40]
    return DOC_SEPARATOR.join(docs) if docs else None


_TROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string interpolation
    (re.compile(r"\\\((em|en)"), "--"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&%|^c:)]"), ""),
    (re.compile(r"\\n(\[[^\]]*\]|\(..|.)"), ""),  # number registers
    (re.compile(r"\\[e\\]"), "\\\\"),  # a literal backslash: last, nothing may follow
]
_TEXT_MACROS = {"B", "I", "SM", "SB", "SH", "SS", "IP", "TP"}
_ALTERNATING_MACROS = {"BR", "RB", "IR", "RI", "BI", "IB"}  # words joined without spaces
_BREAK_MACROS = {"PP", "LP", "P", "TP", "IP", "SH", "SS", "sp", "Sh", "Pp"}


def _troff_inline(text: str) -> str:
    for pattern, repl in _TROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return text


def troff_to_text(source: str) -> str | None:
    """Plain text of a man page: macro lines dropped or reduced to their words."""
    out: list[str] = []
    for line in source.split("\n"):
        if line.startswith(("'", ".")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0].startswith(('\\"', "\\")):
                continue
            macro, args = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro == "so":
                return None  # a redirect to another page, not a page
            if macro in _BREAK_MACROS and out and out[-1] != "":
                out.append("")
            if (macro in _TEXT_MACROS or macro in _ALTERNATING_MACROS) and args:
                words = re.findall(r'"([^"]*)"|(\S+)', args)
                glue = "" if macro in _ALTERNATING_MACROS else " "
                joined = glue.join(a or b for a, b in words)
                out.append(_troff_inline(joined))
            continue
        out.append(_troff_inline(line))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return text if len(text) > 200 else None


# ---------------------------------------------------------------- sources


def _code_sources() -> list[Source]:
    def reader(path: Path) -> Callable[[], str | None]:
        return lambda: _as_text(_read_bytes(path))

    return [Source(f"stdlib:{rel}", f"stdlib:{rel}", reader(p)) for rel, p in _stdlib_files()]


def _prose_sources(doc_root: Path) -> list[Source]:
    def doc_reader(path: Path) -> Callable[[], str | None]:
        return lambda: _as_text(_read_bytes(path))

    def docstring_reader(path: Path) -> Callable[[], str | None]:
        def read() -> str | None:
            text = _as_text(_read_bytes(path))
            return python_docstrings(text) if text else None

        return read

    sources = [
        Source(f"docstrings:{rel}", f"stdlib:{rel}", docstring_reader(p))
        for rel, p in _stdlib_files()
    ]
    if doc_root.is_dir():
        for dirpath, dirnames, filenames in os.walk(doc_root):
            dirnames.sort()
            for name in sorted(filenames):
                bare = name[:-3] if name.endswith(".gz") else name
                path = Path(dirpath) / name
                if _DOC_SKIP.match(bare) or not _DOC_NAME.search(bare) or path.is_symlink():
                    continue
                rel = path.relative_to(doc_root).as_posix()
                sources.append(Source(f"doc:{rel}", f"doc:{rel}", doc_reader(path)))
    return sorted(sources, key=lambda s: s.label)


def _man_sources(man_root: Path) -> list[Source]:
    def reader(path: Path) -> Callable[[], str | None]:
        def read() -> str | None:
            text = _as_text(_read_bytes(path))
            return troff_to_text(text) if text else None

        return read

    sources = []
    for section in range(1, 9):
        sec_dir = man_root / f"man{section}"
        if not sec_dir.is_dir():
            continue
        for entry in sorted(os.scandir(sec_dir), key=lambda e: e.name):
            # gcloud's 16k generated CLI pages would swamp every other page.
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("gcloud"):
                rel = f"man{section}/{entry.name}"
                sources.append(Source(f"man:{rel}", f"man:{rel}", reader(Path(entry.path))))
    return sources


def domain_sources(
    domain: str, doc_root: str | Path = "/usr/share/doc", man_root: str | Path = "/usr/share/man"
) -> list[Source]:
    """Every candidate document of ``domain``, sorted by label (empty if its files are absent)."""
    if domain == "code":
        return _code_sources()
    if domain == "prose":
        return _prose_sources(Path(doc_root))
    if domain == "man":
        return _man_sources(Path(man_root))
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


# ---------------------------------------------------------------- splitting


def is_eval_key(key: str, eval_fraction: float) -> bool:
    """Whether the document with this key is held out (stable across runs and seeds)."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _cap(text: str, max_bytes: int) -> str:
    """The first ``max_bytes`` of ``text`` (UTF-8), cut back to a line end when there is one."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = data[:max_bytes].decode("utf-8", errors="ignore")
    newline = cut.rfind("\n")
    return cut[:newline] if newline > max_bytes // 2 else cut


def _fill(
    docs: Iterator[tuple[str, str, str]], train_bytes: int, eval_bytes: int, bar: tqdm
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    budgets = {"train": train_bytes, "eval": eval_bytes}
    taken: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    for side, label, text in docs:
        if budgets[side] <= 0:
            if all(b <= 0 for b in budgets.values()):
                break
            continue
        size = len(text.encode("utf-8"))
        if size > budgets[side]:
            text = _cap(text, budgets[side])
            size = len(text.encode("utf-8"))
        taken[side].append((label, text))
        budgets[side] -= size + len(DOC_SEPARATOR)
        bar.update(size)
    return taken["train"], taken["eval"]


def build_domain(
    domain: str,
    *,
    train_bytes: int,
    eval_bytes: int,
    max_doc_bytes: int,
    seed: int,
    eval_fraction: float = 0.1,
    sources: list[Source] | None = None,
) -> DomainCorpus:
    """Fill the train and eval sides of ``domain`` from its documents in seeded order."""
    sources = domain_sources(domain) if sources is None else sources
    order = sorted(sources, key=lambda s: s.label)
    random.Random(f"{seed}:{domain}").shuffle(order)
    seen: set[bytes] = set()

    def documents() -> Iterator[tuple[str, str, str]]:
        for src in order:
            text = src.read()
            if not text or not text.strip():
                continue
            text = _cap(text.strip(), max_doc_bytes)
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                continue
            seen.add(digest)
            yield ("eval" if is_eval_key(src.key, eval_fraction) else "train"), src.label, text

    with tqdm(
        total=train_bytes + eval_bytes,
        desc=f"corpus {domain}",
        unit="B",
        unit_scale=True,
        leave=False,
    ) as bar:
        train, held_out = _fill(documents(), train_bytes, eval_bytes, bar)
    return DomainCorpus(
        domain=domain,
        train_text=DOC_SEPARATOR.join(t for _, t in train),
        eval_text=DOC_SEPARATOR.join(t for _, t in held_out),
        train_docs=[label for label, _ in train],
        eval_docs=[label for label, _ in held_out],
        candidates=len(sources),
    )
