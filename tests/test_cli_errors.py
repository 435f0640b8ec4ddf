"""Bad input to the ``qdelta`` commands: a one-line error naming what was expected and
what was found, a non-zero exit, no traceback, no hang, and no input file lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from tests.store_helpers import make_delta
from tests.tiny_models import fake_finetune, one_thread, tiny_llama

from qdelta.calibration import prepare_calibration
from qdelta.cli import main
from qdelta.errors import CalibrationError, FileError, FormatError, ZooError
from qdelta.kernels import autotune
from qdelta.tokenizer import TOKENIZER_FILE, ByteTokenizer


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_thread()


def _error(argv: list[str], capsys, command: str | None = None) -> str:
    """Runs the CLI expecting exit 1 and one ``qdelta CMD: error: ...`` line last on stderr."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("qdelta ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qdelta {command or argv[0]}: error: "), err
    assert err.rstrip("\n").endswith(lines[0])
    return lines[0]


def _usage_error(argv: list[str], capsys) -> str:
    """argparse's rejection: exit 2, the last stderr line ``qdelta CMD: error: ...``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qdelta {argv[0]}: error: "), err
    return last


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved tiny base and fine-tune (byte-tokenizer sized), shared by the tests."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_llama(vocab_size=ByteTokenizer.vocab_size)
    base.save_pretrained(root / "base")
    fake_finetune(base).save_pretrained(root / "ft")
    return root


def _snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ----------------------------------------------------------- outputs that are inputs


@pytest.mark.parametrize("target", ["base/model.safetensors", "base/config.json", "ft/config.json"])
def test_compress_refuses_to_overwrite_an_input(models, capsys, target):
    before = {d: _snapshot(models / d) for d in ("base", "ft")}
    out = models / target
    line = _error(["compress", str(models / "base"), str(models / "ft"), "-o", str(out)], capsys)
    assert str(out) in line and "input directory" in line
    assert {d: _snapshot(models / d) for d in ("base", "ft")} == before


def test_compress_refuses_the_calib_file_and_bad_output_paths(models, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("hello")
    argv = ["compress", str(models / "base"), str(models / "ft"), "--calib", str(calib)]
    line = _error([*argv, "-o", str(calib)], capsys)
    assert "input file" in line and calib.read_text() == "hello"
    line = _error([*argv, "-o", str(tmp_path)], capsys)
    assert "expected a file path, found a directory" in line
    line = _error([*argv, "-o", str(tmp_path / "nodir" / "x.qdelta")], capsys)
    assert "expected an existing directory" in line and "found nothing there" in line


def test_analyze_checks_its_outputs_before_the_work(tmp_path, capsys):
    # Not loadable models: the outputs are refused before anything is loaded.
    for d in ("base", "ft"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text('{"x": 1}')
    args = ["analyze", str(tmp_path / "base"), str(tmp_path / "ft")]
    cases = {
        ("--json", "base/config.json"): "input directory",
        ("--json", "ft/config.json"): "input directory",
        ("--json", "nodir/o.json"): "expected an existing directory",
        ("--json", "base"): "found a directory",
        ("--plot", "nodir/p.png"): "expected an existing directory",
        ("--plot", "p.notanimage"): "expected an image suffix",
    }
    for (flag, rel), want in cases.items():
        line = _error([*args, flag, str(tmp_path / rel)], capsys)
        assert line.startswith("qdelta analyze: error: ") and want in line and flag in line, line
    assert (tmp_path / "base" / "config.json").read_text() == '{"x": 1}'
    same = str(tmp_path / "o.png")
    assert "two different files" in _error([*args, "--json", same, "--plot", same], capsys)


# ----------------------------------------------------------- the autotune decision file


def _put_valid(path) -> None:
    autotune.DecisionCache(path).put("k|card|rows<=16", "lut", {"lut": 1.5, "mma": 2.0})


def test_autotune_clear_leaves_a_foreign_file_alone(rng, tmp_path, capsys):
    foreign = tmp_path / "tenant.qdelta"
    make_delta(rng).save(foreign)
    data = foreign.read_bytes()
    line = _error(["autotune", "--clear", "--file", str(foreign)], capsys)
    assert "not removing" in line and "qdelta-autotune" in line
    assert foreign.read_bytes() == data
    line = _error(["autotune", "--file", str(foreign)], capsys)
    assert "expected a qdelta-autotune JSON file" in line
    other = tmp_path / "other.json"
    other.write_text('{"format": "something else"}')
    assert "found 'something else'" in _error(["autotune", "--clear", "--file", str(other)], capsys)
    assert other.exists()


def test_autotune_refuses_directories_and_fifos(tmp_path, capsys):
    directory = tmp_path / "d"
    directory.mkdir()
    for argv in (
        ["autotune", "--file", str(directory)],
        ["autotune", "--clear", "--file", str(directory)],
    ):
        assert "found a directory" in _error(argv, capsys)
    assert directory.is_dir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    results = []

    def run():  # a FIFO must not block the command
        for argv in (
            ["autotune", "--file", str(fifo)],
            ["autotune", "--clear", "--file", str(fifo)],
        ):
            results.append(_error(argv, capsys))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "qdelta autotune hung on a FIFO"
    assert len(results) == 2 and all("not a regular file" in r for r in results)
    assert fifo.exists() and not fifo.is_file()
    # Tuning with a FIFO as the decision file warns and keeps the decision in memory.
    cache = autotune.DecisionCache(fifo)
    with pytest.warns(autotune.AutotuneWarning, match="not a regular file"):
        cache.put("k", "lut", {"lut": 1.0})
    assert cache._memory == {"k": "lut"} and not fifo.is_file()


def test_autotune_skips_malformed_entries(tmp_path, capsys):
    path = tmp_path / "tune.json"
    _put_valid(path)
    data = json.loads(path.read_text())
    data["entries"].update(
        {
            "bad-us-list": {"choice": "a", "us": [1, 2]},
            "bad-us-text": {"choice": "a", "us": {"a": "fast"}},
            "bad-choice": {"choice": ["a"], "us": {"a": 1.0}},
            "not-a-dict": 3,
        }
    )
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["autotune", "--file", str(path)]) == 0
    captured = capsys.readouterr()
    assert "1 kernel decisions" in captured.out and "lut (1.5 us" in captured.out
    assert "Traceback" not in captured.err
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith("qdelta autotune: warning: ")
    assert "4 malformed" in warning and "bad-us-list" in warning and "bad-choice" in warning
    with pytest.warns(autotune.AutotuneWarning, match="malformed"):
        assert autotune.DecisionCache(path).get("bad-choice") is None
    assert main(["autotune", "--clear", "--file", str(path)]) == 0
    assert "removed 5 decisions" in capsys.readouterr().out and not path.exists()


# ----------------------------------------------------------- model and data files


def test_broken_model_directories(models, tmp_path, capsys):
    bad_json = tmp_path / "bad_json"
    shutil.copytree(models / "ft", bad_json)
    (bad_json / "config.json").write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(models / "ft", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    no_weights = tmp_path / "no_weights"
    shutil.copytree(models / "ft", no_weights)
    (no_weights / "model.safetensors").unlink()
    out = tmp_path / "x.qdelta"
    base = str(models / "base")
    line = _error(["compress", base, str(bad_json), "-o", str(out)], capsys)
    assert str(bad_json / "config.json") in line and "JSON" in line
    line = _error(["compress", base, str(truncated), "-o", str(out)], capsys)
    assert str(truncated) in line and "model.safetensors" in line and "safetensors" in line
    line = _error(["compress", base, str(no_weights), "-o", str(out)], capsys)
    assert str(no_weights) in line and "expected model weights" in line
    assert not out.exists()
    from qdelta.sources import load_hf_model

    with pytest.raises(FormatError):
        load_hf_model(bad_json)
    with pytest.raises(FormatError):
        load_hf_model(truncated)
    with pytest.raises(FileError):
        load_hf_model(no_weights)


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_damaged_pytorch_bin_weights_are_a_format_error(models, tmp_path, capsys, damage):
    import torch

    from qdelta.sources import load_hf_model

    ft = tmp_path / "ft_bin"
    shutil.copytree(models / "ft", ft)
    (ft / "model.safetensors").unlink()
    weights = ft / "pytorch_model.bin"
    torch.save(load_hf_model(models / "ft").state_dict(), weights)
    assert load_hf_model(ft) is not None  # the intact .bin loads
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:2000])
    else:
        weights.write_text("this is not a checkpoint")
    with pytest.raises(
        FormatError, match=r"expected loadable PyTorch weights \(pytorch_model.bin\)"
    ):
        load_hf_model(ft)
    out = tmp_path / "x.qdelta"
    line = _error(["compress", str(models / "base"), str(ft), "-o", str(out)], capsys)
    assert str(ft) in line and "damaged file" in line
    assert not out.exists()


def test_calib_file_that_is_not_utf8(models, tmp_path, capsys):
    calib = tmp_path / "calib.bin"
    calib.write_bytes(b"plain text then \xff\xfe bytes")
    with pytest.raises(CalibrationError, match=r"offset 16"):
        prepare_calibration(calib, ByteTokenizer())
    ft = tmp_path / "ft"
    shutil.copytree(models / "ft", ft)
    ByteTokenizer().save(ft)
    argv = ["compress", str(models / "base"), str(ft), "-o", str(tmp_path / "x.qdelta")]
    line = _error([*argv, "--calib", str(calib), "--steps", "1"], capsys)
    assert str(calib) in line and "expected UTF-8 text" in line and "0xff at offset 16" in line


@pytest.mark.parametrize("content", ["[]", "3", '"qdelta-byte"', "{not json", '{"type": 1}'])
def test_byte_tokenizer_file_that_is_not_an_object(models, tmp_path, capsys, content):
    (tmp_path / TOKENIZER_FILE).write_text(content)
    with pytest.raises(FormatError, match="expected") as exc:
        ByteTokenizer.load(tmp_path)
    assert TOKENIZER_FILE in str(exc.value)
    ft = tmp_path / "ft"
    shutil.copytree(models / "ft", ft)
    (ft / TOKENIZER_FILE).write_text(content)
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 50)
    argv = ["compress", str(models / "base"), str(ft), "-o", str(tmp_path / "x.qdelta")]
    line = _error([*argv, "--calib", str(calib)], capsys)
    assert str(ft / TOKENIZER_FILE) in line and "qdelta-byte" in line


# ----------------------------------------------------------- argument values


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        (
            ["compress", "b", "f", "-o", "x.qdelta", "--steps", "-5"],
            "expected an int >= 0, found -5",
        ),
        (["eval", "--steps", "-3"], "expected an int >= 0, found -3"),
        (["demo", "--steps", "-1"], "expected an int >= 0, found -1"),
        (["demo", "--steps", "many"], "expected an int >= 0, found 'many'"),
        (["ring-demo", "--world-size", "0"], "expected an int >= 1, found 0"),
        (["ring-demo", "--world-size", "-1"], "expected an int >= 1, found -1"),
        (["ring-demo", "--seq-len", "0"], "expected an int >= 1, found 0"),
        (["analyze", "b", "f", "--planes", "0"], "expected an int in 1..32, found 0"),
        (
            ["compress", "b", "f", "-o", "x.qdelta", "--bits", "0"],
            "expected an int in 1..32, found 0",
        ),
        (
            ["compress", "b", "f", "-o", "x.qdelta", "--bits", "33"],
            "expected an int in 1..32, found 33",
        ),
    ],
)
def test_bad_numbers_are_usage_errors(argv, found, capsys):
    last = _usage_error(argv, capsys)
    assert found in last


def test_ring_demo_needs_a_token_per_chunk_and_a_local_model(tmp_path, capsys):
    line = _error(["ring-demo", "--world-size", "2", "--seq-len", "3"], capsys)
    assert "at least 4 tokens" in line and "found world size 2 and 3 tokens" in line
    nope = tmp_path / "nope"
    line = _error(["ring-demo", "--model", str(nope), "--seq-len", "8"], capsys)
    assert str(nope) in line and "no such directory" in line
    line = _error(["ring-demo", "--model", "nope", "--seq-len", "8"], capsys)  # not a hub id
    assert "expected a local model directory" in line


def test_inspect_shows_non_numeric_metadata_as_written(rng, tmp_path, capsys):
    delta = make_delta(rng)
    delta.metadata.update({"source": "lora", "adapter_bytes": "n/a", "lora_rank": "x"})
    path = tmp_path / "t.qdelta"
    delta.save(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rank x lora adapter: 'n/a'; these planes:" in out


# ----------------------------------------------------------- directories that are files


@pytest.mark.parametrize(
    "argv",
    [["zoo", "--tiny", "--cache"], ["eval", "--tiny", "--out"], ["demo", "--tiny", "--out"]],
)
def test_a_file_where_a_directory_is_expected(tmp_path, capsys, argv):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    line = _error([*argv, str(blocker)], capsys)
    assert str(blocker) in line and "expected a directory, found a file" in line
    line = _error([*argv, str(blocker / "below")], capsys)
    assert f"found a file ({blocker})" in line
    assert blocker.read_text() == "keep me"


def _broken_zoo(tmp_path, manifest_edit=None, remove=None):
    from qdelta.zoo import MANIFEST, ZooConfig

    config = ZooConfig.tiny(0)
    root = tmp_path / f"zoo-{config.cache_key()}"
    (root / "data").mkdir(parents=True)
    (root / "base").mkdir()
    ByteTokenizer().save(root / "base")
    for name in ("config.json", "model.safetensors"):  # opening checks they exist
        (root / "base" / name).write_text("{}")
    manifest = {
        "key": config.cache_key(),
        "config": config.to_dict(),
        "corpora": {"man": {}},
        "models": {},
    }
    for name in ("man.eval.txt", "man.train.txt"):
        (root / "data" / name).write_text("text")
    if manifest_edit:
        manifest_edit(manifest)
    if remove:
        (root / remove).unlink()
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_an_incomplete_zoo_cache_says_to_rebuild(tmp_path, capsys):
    from qdelta.zoo import open_zoo

    root = _broken_zoo(tmp_path / "a", remove="data/man.eval.txt")
    with pytest.raises(ZooError, match=r"data/man\.eval\.txt.*rebuild"):
        open_zoo(root)
    line = _error(["zoo", "--tiny", "--cache", str(tmp_path / "a")], capsys)
    assert str(root) in line and "man.eval.txt" in line and "rebuild" in line
    root = _broken_zoo(tmp_path / "b", manifest_edit=lambda m: m.pop("config"))
    line = _error(["zoo", "--tiny", "--cache", str(tmp_path / "b")], capsys)
    assert "zoo.json" in line and "found no 'config'" in line and "rebuild" in line
    root = _broken_zoo(tmp_path / "c", remove="base/" + TOKENIZER_FILE)
    line = _error(["zoo", "--tiny", "--cache", str(tmp_path / "c")], capsys)
    assert TOKENIZER_FILE in line and "rebuild" in line
    # A model's weights removed after the build: named when the zoo opens, before any work.
    root = _broken_zoo(tmp_path / "d", remove="base/model.safetensors")
    line = _error(
        ["eval", "--tiny", "--cache", str(tmp_path / "d"), "--out", str(tmp_path)], capsys
    )
    assert "no model.safetensors in" in line and str(root / "base") in line and "rebuild" in line


def test_ctrl_c_is_one_line_not_a_traceback(capsys, monkeypatch):
    from qdelta import cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_cmd_inspect", interrupted)
    assert cli_module.main(["inspect", "whatever.qdelta"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qdelta inspect: interrupted" in err


def test_algebra_zoo_checks_its_output_before_building(tmp_path, capsys):
    from qdelta import algebra_zoo

    cache = tmp_path / "cache"
    assert algebra_zoo.main(["--tiny", "--cache", str(cache), "--out", str(tmp_path)]) == 1
    assert "expected a file path, found a directory" in capsys.readouterr().err
    assert not cache.exists()  # nothing built


# ----------------------------------------------------------- paths that are not UTF-8


def test_paths_that_are_not_utf8_are_printed_escaped(models, tmp_path, capsys):
    """A valid path need not be UTF-8 (nor free of escape codes): printed raw it fails
    on a strict UTF-8 stdout (capsys is one) after the work is done."""
    raw = os.fsencode(tmp_path) + b"/out\xff\x1b[2J.qdelta"
    out = os.fsdecode(raw)
    shown = f"{tmp_path}/out\\udcff\\x1b[2J.qdelta"
    assert main(["compress", str(models / "base"), str(models / "ft"), "-o", out]) == 0
    text = capsys.readouterr().out
    assert f"wrote {shown} (" in text and "\x1b" not in text
    assert os.path.isfile(raw)
    assert main(["verify", out]) == 0
    assert capsys.readouterr().out.startswith(f"{shown}: OK (the header and ")
    assert main(["inspect", out]) == 0
    assert f"file         {shown} (" in capsys.readouterr().out
    tune = os.fsdecode(os.fsencode(tmp_path) + b"/tune\xfe.json")
    assert main(["autotune", "--file", tune]) == 0
    assert capsys.readouterr().out == f"0 kernel decisions in {tmp_path}/tune\\udcfe.json\n"


def test_python_m_qdelta_zoo_reports_an_error_in_one_line(tmp_path):
    """The documented `python -m qdelta.zoo` goes through the CLI: no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    run = subprocess.run(
        [sys.executable, "-m", "qdelta.zoo", "--tiny", "--cache", str(blocker / "zoo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().startswith("qdelta zoo: error: zoo cache"), run.stderr
