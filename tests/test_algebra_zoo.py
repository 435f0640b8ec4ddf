"""Soups on the tiny zoo: the delta-space soup is the zoo's soup tenant; held-out perplexities."""

from __future__ import annotations

import math

import pytest

import qdelta
from qdelta.algebra_zoo import _ppl, format_report, soup_report


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo


def test_soup_report_on_tiny_zoo(zoo):
    report = soup_report(zoo, bits=(1,))
    # The zoo's soup tenant is the fp32 average of the same two fine-tunes.
    assert report["soup"]["max_abs_diff_vs_zoo_soup"] < 1e-5
    rows = {(r["model"], r["form"]): r["ppl"] for r in report["soup"]["rows"]}
    assert set(rows) == {
        ("base", "-"),
        ("code", "dense"),
        ("code-b", "dense"),
        ("soup", "dense"),
        ("soup", "1-bit"),
    }
    assert all(math.isfinite(p) and p > 1 for p in rows.values())
    # The zoo measured its soup tenant on the same text: the same perplexity.
    recorded = zoo.manifest["quality"]["code-soup"]["code"]["ppl"]
    assert rows[("soup", "dense")] == pytest.approx(recorded, rel=1e-4)
    assert "ppl" in format_report(report)
    lora = report["lora"]
    assert lora["rows"][0]["form"].startswith("dense")


def test_greedy_soup_and_tenant_round_trip_on_zoo(zoo, tmp_path):
    base = zoo.load("base")
    deltas = [qdelta.compress(base, zoo.load(n), tenant=n) for n in ("code", "code-b")]
    result = qdelta.greedy_soup(deltas, lambda d: _ppl(zoo, base, d, "code"))
    best = min(range(2), key=lambda i: result.individual_scores[i])
    assert result.chosen[0] == best
    assert isinstance(result.soup, qdelta.Delta) and result.soup.metadata["recipe"] == "greedy"
    store = qdelta.DeltaStore(tmp_path)
    store.add("code-soup-1bit", result.soup)
    back = qdelta.load(tmp_path / "code-soup-1bit.qdelta")
    qdelta.check_base(back, base)
    assert _ppl(zoo, base, back, "code") == pytest.approx(_ppl(zoo, base, result.soup, "code"))
