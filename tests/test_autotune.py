"""Autotuning of the delta-matmul kernel choice (qdelta.kernels.autotune).

The decision logic and the cache file are tested with injected timers; the glue
into multi_tenant_delta_matmul runs the real kernels under the CPU emulator.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.delta_cases import assert_close, oracle, random_planes, random_scales

from qdelta.errors import FileError
from qdelta.kernels import autotune, choices
from qdelta.kernels import cuda as cuda_backend


def fake_timer(times: dict[str, float], calls: list[str]):
    """time_us that reports ``times[candidate]``; ``run`` records which candidate ran."""
    state = {}

    def run(candidate: str) -> None:
        calls.append(candidate)
        state["last"] = candidate

    def time_us(fn) -> float:
        fn()
        return times[state["last"]]

    return run, time_us


def test_choose_picks_the_fastest_and_times_once(tmp_path):
    cache = autotune.DecisionCache(tmp_path / "tune.json")
    calls: list[str] = []
    run, time_us = fake_timer({"a": 5.0, "b": 2.0, "c": 9.0}, calls)
    assert autotune.choose("k1", ("a", "b", "c"), run, time_us, cache=cache) == "b"
    assert calls == ["a", "b", "c"]
    assert autotune.choose("k1", ("a", "b", "c"), run, time_us, cache=cache) == "b"
    assert calls == ["a", "b", "c"]  # decided: nothing timed again
    data = json.loads((tmp_path / "tune.json").read_text())
    assert data["format"] == autotune.FORMAT and data["version"] == autotune.VERSION
    assert data["entries"]["k1"] == {"choice": "b", "us": {"a": 5.0, "b": 2.0, "c": 9.0}}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_decisions_survive_a_new_process_and_merge(tmp_path):
    path = tmp_path / "sub" / "tune.json"  # the folder is made on first write
    calls: list[str] = []
    run, time_us = fake_timer({"a": 1.0, "b": 2.0}, calls)
    autotune.choose("k1", ("a", "b"), run, time_us, cache=autotune.DecisionCache(path))
    other = autotune.DecisionCache(path)  # another process, same file
    run2, time_us2 = fake_timer({"a": 3.0, "b": 1.0}, calls)
    assert autotune.choose("k2", ("a", "b"), run2, time_us2, cache=other) == "b"
    fresh = autotune.DecisionCache(path)
    assert fresh.get("k1") == "a" and fresh.get("k2") == "b"
    assert len(calls) == 4


def test_a_failing_candidate_is_skipped_and_all_failing_raises(tmp_path):
    cache = autotune.DecisionCache(tmp_path / "tune.json")

    def run(candidate: str) -> None:
        if candidate != "ok":
            raise RuntimeError(f"{candidate} needs more shared memory")

    assert autotune.choose("k", ("big", "ok"), run, lambda fn: fn() or 1.0, cache=cache) == "ok"
    entry = json.loads((tmp_path / "tune.json").read_text())["entries"]["k"]
    assert entry["us"] == {"big": None, "ok": 1.0}  # JSON has no infinity
    with pytest.raises(RuntimeError, match="big needs"):
        autotune.choose("k2", ("big",), run, lambda fn: fn() or 1.0, cache=cache)
    assert cache.get("k2") is None
    with pytest.raises(ValueError, match="at least one candidate"):
        autotune.choose("k3", (), run, lambda fn: 1.0, cache=cache)


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b'{"format": "other"}',
        b"\xff\xfe\x00",
        b"[" * 200_000,
        b'{"format": "qdelta-autotune", "version": 2, "entries": {}}',
        b'{"format": "qdelta-autotune", "entries": {}}',
        b'{"format": "qdelta-autotune", "version": 1, "entries": []}',
    ],
    ids=[
        "not json",
        "a list",
        "other format",
        "not utf-8",
        "nested too deep",
        "a newer version",
        "no version",
        "entries not an object",
    ],
)
def test_unreadable_cache_file_warns_and_is_left_alone(tmp_path, content):
    path = tmp_path / "tune.json"
    path.write_bytes(content)
    cache = autotune.DecisionCache(path)
    calls: list[str] = []
    run, time_us = fake_timer({"a": 1.0}, calls)
    with pytest.warns(autotune.AutotuneWarning, match="expected.*left alone"):
        assert autotune.choose("k", ("a",), run, time_us, cache=cache) == "a"
    assert path.read_bytes() == content  # not someone's file lost
    assert cache.get("k") == "a"  # the decision is kept in memory
    calls.clear()
    assert autotune.choose("k", ("a",), run, time_us, cache=cache) == "a"
    assert calls == []  # decided: not timed again


def test_other_version_is_measured_again_and_stale_choice_retuned(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"format": autotune.FORMAT, "version": 0, "entries": {}}))
    cache = autotune.DecisionCache(path)
    assert cache.get("k") is None
    cache.put("k", "gone", {"gone": 1.0})  # a choice that is no longer a candidate
    calls: list[str] = []
    run, time_us = fake_timer({"a": 1.0}, calls)
    assert autotune.choose("k", ("a",), run, time_us, cache=cache) == "a" and calls == ["a"]


def test_unwritable_cache_warns_and_keeps_deciding(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = autotune.DecisionCache(blocker / "tune.json")  # parent is a file
    calls: list[str] = []
    run, time_us = fake_timer({"a": 2.0, "b": 1.0}, calls)
    with pytest.warns(autotune.AutotuneWarning, match="writable"):
        assert autotune.choose("k", ("a", "b"), run, time_us, cache=cache) == "b"
    assert autotune.choose("k", ("a", "b"), run, time_us, cache=cache) == "b"
    assert len(calls) == 2


def test_a_write_the_writer_refuses_warns_too(tmp_path, monkeypatch):
    """The atomic writer's errors are FileErrors (a full disk, a read-only folder):
    the decision still holds, in memory."""

    def refuse(path, *args, **kwargs):
        raise FileError(f"cannot write {path}: No space left on device (os error 28)")

    monkeypatch.setattr(autotune, "write_json_atomic", refuse)
    cache = autotune.DecisionCache(tmp_path / "tune.json")
    calls: list[str] = []
    run, time_us = fake_timer({"a": 2.0, "b": 1.0}, calls)
    with pytest.warns(autotune.AutotuneWarning, match="No space left"):
        assert autotune.choose("k", ("a", "b"), run, time_us, cache=cache) == "b"
    assert autotune.choose("k", ("a", "b"), run, time_us, cache=cache) == "b"
    assert len(calls) == 2


def test_switches(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "ENABLED", None)
    monkeypatch.delenv(autotune.ENV, raising=False)
    assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV, "1")
    assert autotune.enabled()
    monkeypatch.setattr(autotune, "ENABLED", False)
    assert not autotune.enabled()
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "t.json"))
    assert autotune.cache_path() == tmp_path / "t.json"


def test_candidates_keys_and_buckets():
    assert [choices.row_bucket(m) for m in (1, 2, 3, 16, 17, 64, 65)] == [
        1, 2, 4, 16, 32, 64, 128,
    ]  # fmt: skip
    fp16, fp32 = cuda_backend.DTYPE_CODES[torch.float16], cuda_backend.DTYPE_CODES[torch.float32]
    assert choices.tuning_candidates(1, fp16, 1) == (
        "mma",
        "lut",
        "lut-prefetch",
        "lut-narrow",
    )
    assert choices.tuning_candidates(16, fp16, 1)[-3:] == (
        "expand",
        "expand-overlap",
        "gemm64",
    )
    assert choices.tuning_candidates(16, fp32, 1)[-1] == "expand-overlap"
    assert choices.tuning_candidates(512, fp16, 1) == (
        "expand", "expand-overlap", "gemm128", "gemm64",
    )  # fmt: skip
    assert choices.tuning_candidates(512, fp16, 9) == ("expand", "expand-overlap")
    every = {c for b in (1, 16, 512) for c in choices.tuning_candidates(b, fp16, 1)}
    assert every == set(choices.KERNEL_CHOICES)
    key = choices.tuning_key("card", 16, False, 300, 4097, 2, True, fp16)
    assert key != choices.tuning_key("other card", 16, False, 300, 4097, 2, True, fp16)
    assert key != choices.tuning_key("card", 32, False, 300, 4097, 2, True, fp16)
    assert "src=" in key  # an edited kernel source is measured afresh


def _choice_case(gen, m, k, n, t, dtype):
    """Inputs for run_choice: x, two planes per tenant, per-row scales, ids in -1..T-1."""
    x = torch.randn(m, k, generator=gen).to(dtype)
    planes = random_planes(t, 2, n, k, generator=gen)
    scales = random_scales(t, 2, n, True, generator=gen)
    ids = torch.randint(-1, t, (m,), generator=gen)
    return x, planes, scales, ids, cuda_backend.DTYPE_CODES[dtype]


def test_every_choice_computes_the_same_delta(emulated, gen):
    """Each kernel choice autotuning may pick, against the float64 oracle."""
    m, n = 17, 70
    x, planes, scales, ids, dt = _choice_case(gen, m, 300, n, 3, torch.float16)
    want = oracle(x, planes, scales, ids)
    for choice in choices.KERNEL_CHOICES:
        out = torch.full((m, n), math.nan, dtype=torch.float16)
        choices.run_choice(choice, x, planes, scales, ids, None, out, 2, True, dt)
        assert_close(out, want, f"choice {choice}")
    with pytest.raises(cuda_backend.ShapeError, match="kernel choice"):
        choices.run_choice("nope", x, planes, scales, ids, None, out, 2, True, dt)


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Autotuning on, decisions in a fresh file, a timer that makes ``favorite`` win."""
    cache = autotune.DecisionCache(tmp_path / "tune.json")
    monkeypatch.setattr(autotune, "CACHE", cache)
    monkeypatch.setattr(autotune, "ENABLED", True)
    state = {"favorite": None, "timed": []}
    real_run = choices.run_choice

    def spy(choice, *args):
        state["last"] = choice
        return real_run(choice, *args)

    def time_us(device, fn) -> float:
        fn()
        state["timed"].append(state["last"])
        return 1.0 if state["last"] == state["favorite"] else 10.0

    monkeypatch.setattr(choices, "run_choice", spy)
    monkeypatch.setattr(cuda_backend.RUNTIME, "time_us", time_us)
    return state, cache


@pytest.mark.parametrize("favorite", ["lut-prefetch", "gemm64", "expand", "expand-overlap"])
def test_auto_path_runs_the_measured_winner(emulated, gen, tuned, favorite):
    """In place (out is base): tuning writes a scratch output, base gets the delta once."""
    state, cache = tuned
    state["favorite"] = favorite
    m, k, n, t = 16, 200, 40, 2
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(t, 1, n, k, generator=gen)
    scales = random_scales(t, 1, n, False, generator=gen)
    ids = torch.randint(0, t, (m,), generator=gen)
    base = torch.randn(m, n, generator=gen).half()
    want = oracle(x, planes, scales, ids, base)
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids, base=base, out=base)
    assert y is base
    assert_close(y, want, f"autotuned ({favorite}), in place")
    candidates = choices.tuning_candidates(16, 0, 1)
    assert state["timed"] == list(candidates)
    (key,) = json.loads(cache._file_path().read_text())["entries"]
    assert cache.get(key) == favorite and "emulator" in key
    state["timed"].clear()
    y2 = cuda_backend.multi_tenant_delta_matmul(x[:9], planes, scales, ids[:9])  # same bucket
    assert state["timed"] == [] and state["last"] == favorite
    assert_close(y2, oracle(x[:9], planes, scales, ids[:9]), "decided bucket")


def test_no_timing_while_capturing_and_when_off(emulated, gen, tuned, monkeypatch):
    state, _ = tuned
    state["favorite"] = "lut"
    x = torch.randn(3, 64, generator=gen).half()
    planes = random_planes(1, 1, 8, 64, generator=gen)[0]
    scales = random_scales(1, 1, 8, False, generator=gen)[0]
    monkeypatch.setattr(emulated, "capturing", lambda device: True)
    cuda_backend.delta_matmul(x, planes, scales)
    assert state["timed"] == [] and state["last"] == choices.path_choice("decode")
    monkeypatch.setattr(autotune, "ENABLED", False)
    monkeypatch.setattr(emulated, "capturing", lambda device: False)
    cuda_backend.delta_matmul(x[:1], planes, scales)
    assert state["timed"] == [] and state["last"] == "mma"  # the fixed rule


def _decide_then_call(gen, cache, choice: str):
    """Record ``choice`` for a 16-row multi-tenant fp16 shape, then run that shape."""
    m, k, n, t = 16, 96, 24, 2
    x = torch.randn(m, k, generator=gen).half()
    planes = random_planes(t, 1, n, k, generator=gen)
    scales = random_scales(t, 1, n, False, generator=gen)
    ids = torch.randint(0, t, (m,), generator=gen)
    key = choices.tuning_key(cuda_backend.RUNTIME.device_name(0), 16, False, n, k, 1, False, 0)
    cache.put(key, choice, {choice: 1.0})
    y = cuda_backend.multi_tenant_delta_matmul(x, planes, scales, ids)
    assert_close(y, oracle(x, planes, scales, ids), f"decided {choice}")
    return key


def test_a_recorded_choice_this_version_does_not_offer_is_retuned(emulated, gen, tuned):
    """A hand-edited file or a renamed choice: re-measured, not an error on every call."""
    state, cache = tuned
    state["favorite"] = "lut"
    key = _decide_then_call(gen, cache, "lut-early")
    assert state["timed"] == list(choices.tuning_candidates(16, 0, 1))
    assert cache.get(key) == "lut"


@pytest.mark.parametrize("decided", ["expand", "gemm64", "lut-prefetch"])
def test_under_capture_a_decision_that_reads_ids_on_the_host_gives_way_to_the_rule(
    emulated, gen, tuned, monkeypatch, decided
):
    state, cache = tuned
    monkeypatch.setattr(emulated, "capturing", lambda device: True)
    _decide_then_call(gen, cache, decided)
    want = choices.path_choice("decode") if decided in choices.HOST_SYNCING else decided
    assert state["timed"] == [] and state["last"] == want


def test_cli_shows_and_clears_decisions(tmp_path, capsys):
    from qdelta.cli import main

    path = tmp_path / "tune.json"
    cache = autotune.DecisionCache(path)
    cache.put("delta_matmul|card|rows<=16", "lut", {"lut": 12.5, "mma": 20.0, "expand": math.inf})
    assert main(["autotune", "--file", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "1 kernel decisions" in shown and "lut (12.5 us; timed: lut 12.5, mma 20.0 us)" in shown
    assert "delta_matmul|card|rows<=16" in shown
    assert main(["autotune", "--file", str(path), "--clear"]) == 0
    assert "removed 1 decisions" in capsys.readouterr().out and not path.exists()
    assert main(["autotune", "--file", str(path)]) == 0
    assert "0 kernel decisions" in capsys.readouterr().out


def test_narrow_table_tiles_match_the_oracle(emulated, gen):
    """lut-narrow at N = 600: three feature tiles of at most 256 rows (the last ragged)."""
    m, n, t = 5, 600, 2
    x, planes, scales, ids, dt = _choice_case(gen, m, 700, n, t, torch.bfloat16)
    plan = cuda_backend.lut_plan(m, n, planes.shape[-1], 2, t, 4, max_features=256)
    assert plan["nb"] == 256
    out = torch.full((m, n), math.nan, dtype=torch.bfloat16)
    choices.run_choice("lut-narrow", x, planes, scales, ids, None, out, 2, True, dt)
    assert_close(out, oracle(x, planes, scales, ids), "narrow tiles")


def test_forget_leaves_anything_but_a_decision_file_alone(tmp_path):
    from qdelta.errors import FileError, FormatError

    foreign = tmp_path / "weights.safetensors"
    foreign.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(FormatError, match="not removing"):
        autotune.forget(autotune.DecisionCache(foreign))
    assert foreign.read_bytes() == b"\x08\x00\x00\x00\x00\x00\x00\x00{}"
    with pytest.raises(FileError, match="found a directory"):
        autotune.forget(autotune.DecisionCache(tmp_path))
    assert autotune.forget(autotune.DecisionCache(tmp_path / "none.json")) == 0
    assert autotune.forget(autotune.DecisionCache(foreign / "below.json")) == 0


def test_a_directory_as_decision_file_is_left_alone(tmp_path):
    cache = autotune.DecisionCache(tmp_path)
    calls: list[str] = []
    run, time_us = fake_timer({"a": 2.0, "b": 1.0}, calls)
    with pytest.warns(autotune.AutotuneWarning, match="found a directory; it is left alone"):
        assert autotune.choose("k", ("a", "b"), run, time_us, cache=cache) == "b"
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_malformed_entries_are_skipped_not_trusted(tmp_path):
    path = tmp_path / "tune.json"
    entries = {
        "good": {"choice": "a", "us": {"a": 1.0, "b": None}},
        "us-list": {"choice": "a", "us": [1, 2]},
        "us-text": {"choice": "a", "us": {"a": "fast"}},
        "choice-list": {"choice": ["a"], "us": {}},
    }
    path.write_text(json.dumps({"format": autotune.FORMAT, "version": 1, "entries": entries}))
    with pytest.warns(autotune.AutotuneWarning, match="3 malformed"):
        assert list(autotune.recorded(autotune.DecisionCache(path))) == ["good"]
    cache = autotune.DecisionCache(path)
    with pytest.warns(autotune.AutotuneWarning, match="malformed"):
        cache.put("new", "b", {"b": 1.0})  # rewriting drops the malformed entries
    assert sorted(json.loads(path.read_text())["entries"]) == ["good", "new"]
