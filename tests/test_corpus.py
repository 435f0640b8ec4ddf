"""Corpus building: text extraction, deterministic file-level train / eval split."""

import pytest

from qdelta.corpus import (
    DOC_SEPARATOR,
    Source,
    build_domain,
    domain_sources,
    is_eval_key,
    python_docstrings,
    troff_to_text,
)


def test_troff_to_text_keeps_words_and_drops_markup():
    page = "\n".join(
        [
            '.\\" a comment that must vanish',
            ".TH FROB 1",
            ".SH NAME",
            "frob \\- turn the \\fBknob\\fR until it clicks",
            ".SH DESCRIPTION",
            ".B frob",
            "reads \\fIfiles\\fP and writes \\(lqoutput\\(rq\\(emquickly, using \\e escapes.",
            ".TP",
            '.BR "\\-v" ", " \\-\\-verbose',
            "Print more.",
            "Filler text so that the page is long enough to count as a real manual page here.",
        ]
    )
    text = troff_to_text(page)
    assert text is not None
    assert "comment" not in text and ".TH" not in text and "\\f" not in text
    assert "frob - turn the knob until it clicks" in text
    assert '"output"--quickly' in text and "using \\ escapes" in text
    assert "-v, --verbose" in text
    assert text.startswith("NAME")
    assert troff_to_text(".so man1/other.1\n" + "x" * 300) is None


def test_python_docstrings_in_source_order():
    src = (
        '"""Module doc long enough to be kept by the extractor, yes indeed."""\n'
        "def f():\n"
        '    """Function doc long enough to be kept by the extractor, surely."""\n'
        "class C:\n"
        '    """short"""\n'
        "    def m(self):\n"
        '        """Method doc long enough to be kept by the extractor, certainly."""\n'
    )
    docs = python_docstrings(src)
    assert docs is not None
    parts = docs.split(DOC_SEPARATOR)
    assert [p.split()[0] for p in parts] == ["Module", "Function", "Method"]
    assert python_docstrings("def broken(:\n") is None


def _fake_sources(rng, n=300):
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega"]
    texts = {}
    for i in range(n):
        body = " ".join(rng.choice(words, size=int(rng.integers(20, 200))))
        texts[f"doc{i:03d}"] = f"document {i}: {body}"
    texts["dup"] = texts["doc007"]  # byte-identical copy: must be taken at most once
    return [Source(label, label, (lambda t=t: t)) for label, t in sorted(texts.items())]


def test_split_is_by_document_deterministic_and_within_budget(rng):
    sources = _fake_sources(rng)
    kwargs = dict(train_bytes=20_000, eval_bytes=4_000, max_doc_bytes=600, eval_fraction=0.2)
    a = build_domain("prose", seed=3, sources=sources, **kwargs)
    b = build_domain("prose", seed=3, sources=list(reversed(sources)), **kwargs)
    c = build_domain("prose", seed=4, sources=sources, **kwargs)
    # Deterministic: input order does not matter (sorted), the seed does.
    assert (a.train_text, a.eval_text) == (b.train_text, b.eval_text)
    assert a.train_text != c.train_text
    assert not set(a.train_docs) & set(a.eval_docs)
    assert all(is_eval_key(d, 0.2) for d in a.eval_docs)
    assert not any(is_eval_key(d, 0.2) for d in a.train_docs)
    assert not {"dup", "doc007"} <= set(a.train_docs) | set(a.eval_docs)
    assert len(a.train_text.encode()) <= 20_000 and len(a.eval_text.encode()) <= 4_000
    assert len(a.train_text.encode()) > 15_000 and len(a.eval_text.encode()) > 2_000
    for label in a.eval_docs:
        doc = next(s.read() for s in sources if s.label == label)
        assert doc[:40] not in a.train_text


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_required_domains_have_sources_on_this_machine(domain):
    sources = domain_sources(domain)
    assert len(sources) > 100
    assert sources == sorted(sources, key=lambda s: s.label)
