"""The main job end to end on the tiny zoo configuration (what `make demo` runs at full size)."""

from __future__ import annotations

import json

import pytest

import qdelta
from qdelta.cli import main
from qdelta.eval import VARIANTS, read_results


@pytest.fixture(scope="module")
def cache(tiny_zoo):
    return tiny_zoo.root.parent  # the session's tiny zoo, already built


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--tiny", "--cache", str(cache), "--out", str(out), "--steps", "8"])
    return code, out, json.loads((out / "demo.json").read_text())


def test_demo_runs_and_serves_every_row_like_its_dense_model(demo):
    code, _, result = demo
    assert code == 0
    rows = result["mixed_batch"]
    assert {r["tenant"] for r in rows} >= {"(base)", *result["tenants"]}
    assert all(r["matches_merged_dense_model"] for r in rows)


def test_quality_table_is_consistent(demo):
    _, _, result = demo
    by_tenant: dict[str, dict[str, dict]] = {}
    for row in result["quality"]:
        by_tenant.setdefault(row["tenant"], {})[row["variant"]] = row
    assert len(by_tenant) >= 4
    for variants in by_tenant.values():
        assert set(variants) == set(VARIANTS)
        base, ft = variants["base"]["ppl"], variants["finetune"]["ppl"]
        for row in variants.values():
            assert row["kept"] == pytest.approx((base - row["ppl"]) / (base - ft))
        sizes = [variants[v]["delta_bytes"] for v in ("bitdelta-distilled", "2-bit", "3-bit")]
        assert sizes == sorted(sizes) and sizes[0] < sizes[1]


def test_ring_attention_step_matches_the_single_process_forward(demo):
    _, _, result = demo
    ring = result["ring"]
    assert ring["world_size"] == 2 and ring["layout"] == "zigzag"
    assert ring["seq_len"] > 64  # held-out text as long as the position table allows
    assert ring["ok"] and ring["max_abs_error"] <= 1e-4 < ring["max_abs_logit"]
    window = result["ring_sliding_window"]
    assert window["sliding_window"] == 128 and window["world_size"] == 3
    assert window["ok"] and window["max_abs_error"] <= 1e-4


def test_memory_table_is_measured_and_grows_sublinearly(demo):
    _, _, result = demo
    zoo_rows = result["memory"]["zoo"]
    assert [r["n"] for r in zoo_rows] == [1, 2, 4, 8, 16, 32, 64]
    for row in zoo_rows:
        assert row["base_plus_deltas_bytes"] == row["base_bytes"] + row["tenant_bytes"]
        assert row["tenants_loaded"] == row["n"]
    ratios = [r["ratio"] for r in zoo_rows]
    assert ratios == sorted(ratios)
    # Packing embeddings and head too saves memory at every N, below the 1-bit bound.
    packed = result["memory"]["zoo_embeddings_packed"]
    assert [r["n"] for r in packed] == [r["n"] for r in zoo_rows]
    for whole_row, packed_row in zip(zoo_rows, packed, strict=True):
        assert packed_row["full_models_bytes"] == whole_row["full_models_bytes"]
        assert packed_row["base_plus_deltas_bytes"] < whole_row["base_plus_deltas_bytes"]
        n = packed_row["n"]
        assert packed_row["ratio"] < 2 * n / (2 + n / 8)  # fp16 base + 1-bit deltas
    llama = result["memory"]["llama_7b"]["embeddings_packed"]
    assert 7.5 < next(r["ratio"] for r in llama if r["n"] == 16) < 8.0  # 16x bytes / (1 + 1)


def test_outputs_on_disk(demo):
    _, out, result = demo
    for path in result["plots"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    store = qdelta.DeltaStore(out / "deltas")
    assert sorted(store.tenants()) == sorted(result["tenants"])
    for name in store.tenants():
        store.open(name).verify()
        assert store.open(name).user_metadata["source"] == result["tenants"][name]["kind"]


def test_eval_command_writes_the_quality_table(demo, cache, tmp_path, capsys):
    _, _, result = demo  # the zoo is built (and cached) by the demo
    assert (
        main(["eval", "--tiny", "--cache", str(cache), "--out", str(tmp_path), "--steps", "2"]) == 0
    )
    printed = capsys.readouterr().out
    meta, rows = read_results(tmp_path / "quality.json")
    assert meta["distill_steps"] == 2
    assert {r.tenant for r in rows} == set(result["tenants"])
    assert {r.variant for r in rows} == set(VARIANTS)
    for r in rows:
        assert f"{r.ppl:.4f}" in printed
    # Same zoo, same seed: the undistilled variants do not depend on the steps.
    demo_ppl = {(r["tenant"], r["variant"]): r["ppl"] for r in result["quality"]}
    for r in rows:
        if r.variant in ("base", "finetune", "bitdelta-init", "2-bit", "3-bit"):
            assert r.ppl == pytest.approx(demo_ppl[r.tenant, r.variant], rel=1e-6)
    assert sorted(qdelta.DeltaStore(tmp_path / "deltas").tenants()) == sorted(result["tenants"])


def test_ring_demo_command_on_the_zoo_base(demo, cache, capsys):
    # The demo built the tiny zoo into `cache`; the contiguous layout this time.
    code = main(["ring-demo", "--zoo", "tiny", "--cache", str(cache), "--layout", "contiguous"])
    printed = capsys.readouterr().out
    assert code == 0 and "(contiguous)" in printed and "OK" in printed
