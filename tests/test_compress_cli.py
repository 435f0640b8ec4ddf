"""`qdelta compress BASE_DIR FINETUNED_DIR -o out.qdelta`."""

from __future__ import annotations

import copy
import importlib
import re

import numpy as np
import pytest
import torch
from tests.tiny_models import fake_finetune, one_thread, output, tiny_llama

import qdelta
from qdelta.cli import build_parser, main
from qdelta.tokenizer import TOKENIZER_FILE, ByteTokenizer

SEQ_LEN = 128  # distill's default window
BATCH = 4  # distill's default batch


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_thread()


def test_parser_accepts_the_documented_flags():
    args = build_parser().parse_args(
        ["compress", "b", "f", "-o", "x.qdelta", "--bits", "2", "--calib", "c.txt", "--steps", "9"]
    )
    assert (args.base, args.finetuned, args.output) == ("b", "f", "x.qdelta")
    assert (args.bits, args.calib, args.steps) == (2, "c.txt", 9)


def _summary(text: str) -> dict:
    m = re.search(
        r"(\d+) layers, (\d+) bit\(s\), scale=(\w+): ([\d.]+) MiB packed vs ([\d.]+) MiB dense "
        r"\(ratio ([\d.]+)x\); whole tensors ([\d.]+) MiB",
        text,
    )
    assert m, text
    return {
        "layers": int(m[1]),
        "bits": int(m[2]),
        "scale": m[3],
        "packed": float(m[4]),
        "dense": float(m[5]),
        "whole": float(m[7]),
    }


def _check_summary(text: str, loaded: qdelta.Delta, ft: torch.nn.Module, bits: int, scale: str):
    s = _summary(text)
    assert s["layers"] == len(loaded.layers)
    assert (s["bits"], s["scale"]) == (bits, scale)
    assert all(layer.bits == bits for layer in loaded.layers.values())
    assert all(layer.scale_mode == scale for layer in loaded.layers.values())
    packed = sum(layer.planes.nbytes + layer.scales.nbytes for layer in loaded.layers.values())
    assert s["packed"] == pytest.approx(packed / 2**20, abs=6e-4)
    state = ft.state_dict()
    dense = sum(state[f"{n}.weight"].numel() * 4 for n in loaded.layers)  # float32 model
    assert s["dense"] == pytest.approx(dense / 2**20, abs=6e-4)
    whole = sum(t.numel() * t.element_size() for t in loaded.params.values())
    assert s["whole"] == pytest.approx(whole / 2**20, abs=6e-4)


def test_compress_writes_a_delta_and_prints_a_summary(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    ft = fake_finetune(base)
    ft.save_pretrained(tmp_path / "ft")
    out = tmp_path / "ft.qdelta"
    argv = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(out)]
    assert main([*argv, "--bits", "2"]) == 0
    assert out.is_file()
    text = capsys.readouterr().out
    assert "14 layers, 2 bit(s)" in text and "ratio" in text and f"wrote {out}" in text
    assert "distillation" not in text
    loaded = qdelta.load(out)
    want = qdelta.compress(base, tmp_path / "ft", bits=2)
    assert sorted(loaded.layers) == sorted(want.layers)
    for name, layer in want.layers.items():
        np.testing.assert_array_equal(loaded.layers[name].planes, layer.planes)
        np.testing.assert_array_equal(loaded.layers[name].scales, layer.scales)
    _check_summary(text, loaded, ft, 2, "matrix")


def test_compress_flags_select_layers_embeddings_and_tenant(tmp_path, capsys):
    """--target / --exclude / --embeddings / --tenant give what the Python API gives for
    the same arguments; a tied model's embedding and head are stored once."""
    base = tiny_llama(tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    ft = fake_finetune(base)
    ft.save_pretrained(tmp_path / "ft")
    out = tmp_path / "sel.qdelta"
    argv = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(out)]
    targets = ["q_proj", "down_proj", "embed_tokens", "lm_head"]
    flags = [a for t in targets for a in ("--target", t)]
    flags += ["--exclude", "layers.1.mlp.down_proj"]
    assert main([*argv, *flags, "--embeddings", "--tenant", "alice"]) == 0
    text = capsys.readouterr().out
    assert "MiB on disk" in text
    loaded = qdelta.load(out)
    want = qdelta.compress(
        base,
        tmp_path / "ft",
        targets=targets,
        exclude=["layers.1.mlp.down_proj"],
        compress_embeddings=True,
    )
    assert loaded.tenant == "alice"
    assert sorted(loaded.layers) == sorted(want.layers)
    assert "model.layers.1.mlp.down_proj" not in loaded.layers
    assert "model.layers.0.mlp.down_proj" in loaded.layers
    for name, layer in want.layers.items():
        np.testing.assert_array_equal(loaded.layers[name].planes, layer.planes)
    f = qdelta.DeltaFile(out)
    assert f.format_version == 2  # tied embed_tokens / lm_head: one pair on disk
    # A pattern that selects nothing is an error naming it, and nothing is written.
    bad = tmp_path / "bad.qdelta"
    argv[-1] = str(bad)
    assert main([*argv, "--target", "no_such_proj"]) != 0
    assert "no_such_proj" in capsys.readouterr().err and not bad.exists()


def _calib_text(rng: np.random.Generator, n_bytes: int) -> str:
    words = [
        "".join(rng.choice(list("abcdefghij"), size=int(rng.integers(2, 7)))) for _ in range(20)
    ]
    text = ""
    while len(text) < n_bytes:
        text += str(rng.choice(words)) + " "
    return text[:n_bytes]


def _mse(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean over tokens of the per-token MSE of the logits, per batch, then over batches
    (distill's loss on full windows), computed from plain models."""
    with torch.no_grad():
        per_batch = [
            (output(student, b) - output(teacher, b)).pow(2).mean(-1).mean()
            for b in ids.split(BATCH)
        ]
    return float(torch.stack(per_batch).mean())


@pytest.mark.parametrize(("where", "scale"), [("ft", "matrix"), ("base", "row")])
def test_compress_with_calib_uses_the_byte_tokenizer(tmp_path, capsys, rng, where, scale):
    vocab = ByteTokenizer.vocab_size + int(rng.integers(0, 20))
    base = tiny_llama(seed=int(rng.integers(1 << 30)), vocab_size=vocab)
    ft = fake_finetune(base, seed=int(rng.integers(1 << 30)), rel=0.2)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    ByteTokenizer().save(tmp_path / where)
    # 8 full windows of 128 ids: <bos> + 1023 bytes of ASCII.
    text = _calib_text(rng, 8 * SEQ_LEN - 1)
    calib = tmp_path / "calib.txt"
    calib.write_text(text, encoding="utf-8")
    out = tmp_path / "ft.qdelta"
    argv = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(out)]
    argv += ["--bits", "1", "--scale", scale, "--calib", str(calib), "--steps", "40"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    m = re.search(r"distillation loss: (\S+) -> (\S+)\n", captured.out)
    assert m, captured.out
    before, after = float(m[1]), float(m[2])
    assert 0 < after < before

    loaded = qdelta.load(out)
    _check_summary(captured.out, loaded, ft, 1, scale)
    init = qdelta.compress(base, ft, bits=1, scale=scale)
    assert sorted(loaded.layers) == sorted(init.layers)
    for name, layer in init.layers.items():  # same signs, trained scales
        np.testing.assert_array_equal(loaded.layers[name].planes, layer.planes)
    assert any(
        not np.array_equal(loaded.layers[n].scales, layer.scales)
        for n, layer in init.layers.items()
    )
    assert "steps=40" in loaded.metadata["distill"]

    # The printed losses are the output MSE on the byte-tokenized text, before and after.
    ids = torch.tensor(ByteTokenizer().encode(text, bos=True)).view(-1, SEQ_LEN)
    assert ids.shape == (8, SEQ_LEN) and int(ids.max()) < vocab
    want_before = _mse(qdelta.merge(copy.deepcopy(base), init), ft, ids)
    want_after = _mse(qdelta.merge(copy.deepcopy(base), loaded), ft, ids)
    assert before == pytest.approx(want_before, rel=1e-3)
    assert after == pytest.approx(want_after, rel=1e-3)


@pytest.mark.parametrize("keep_trained", [False, True])
def test_a_distillation_that_makes_the_fit_worse_is_reported(
    tmp_path, capsys, rng, monkeypatch, keep_trained
):
    """The CLI has no --lr: a far too large one is forced through distill itself. By
    default the file gets the initial scales and the summary says so."""
    module = importlib.import_module("qdelta.distill")  # qdelta.distill is the function
    real = module.distill
    monkeypatch.setattr(module, "distill", lambda *a, **kw: real(*a, **kw, lr=5.0))
    base = tiny_llama(seed=int(rng.integers(1 << 30)), vocab_size=ByteTokenizer.vocab_size)
    ft = fake_finetune(base, seed=int(rng.integers(1 << 30)), rel=0.2)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    ByteTokenizer().save(tmp_path / "ft")
    calib = tmp_path / "calib.txt"
    calib.write_text(_calib_text(rng, 8 * SEQ_LEN - 1), encoding="utf-8")
    out = tmp_path / "ft.qdelta"
    argv = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(out)]
    argv += ["--calib", str(calib), "--steps", "20"] + (["--keep-trained"] if keep_trained else [])
    if keep_trained:
        with pytest.warns(RuntimeWarning, match="loss rose"):
            assert main(argv) == 0
    else:
        assert main(argv) == 0
    text = capsys.readouterr().out
    m = re.search(r"distillation loss: (\S+) -> (\S+)( \(rose: kept the initial scales;)?", text)
    assert m and float(m[2]) > float(m[1]), text
    assert bool(m[3]) != keep_trained
    init = qdelta.compress(base, ft, bits=1)
    loaded = qdelta.load(out)
    same = all(
        np.array_equal(loaded.layers[n].scales, layer.scales) for n, layer in init.layers.items()
    )
    assert same != keep_trained
    assert loaded.metadata["distill"].endswith(",kept=initial") != keep_trained


def test_compress_with_calib_uses_a_hf_tokenizer(tmp_path, capsys, rng):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(40)]
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    base = tiny_llama(seed=int(rng.integers(1 << 30)))
    ft = fake_finetune(base, seed=int(rng.integers(1 << 30)), rel=0.2)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    hf.save_pretrained(tmp_path / "ft")
    picks = rng.integers(0, len(words), size=8 * SEQ_LEN)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    out = tmp_path / "ft.qdelta"
    argv = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(out)]
    assert main([*argv, "--calib", str(calib), "--steps", "20"]) == 0
    m = re.search(r"distillation loss: (\S+) -> (\S+)\n", capsys.readouterr().out)
    assert m and 0 < float(m[2]) < float(m[1])
    ids = torch.tensor([vocab[words[i]] for i in picks]).view(-1, SEQ_LEN)
    init = qdelta.compress(base, ft, bits=1)
    assert float(m[1]) == pytest.approx(
        _mse(qdelta.merge(copy.deepcopy(base), init), ft, ids), rel=1e-3
    )


def _fails(argv: list[str], capsys) -> str:
    """Runs the CLI, expecting exit code 1 and a one-line error on stderr (no traceback)."""
    capsys.readouterr()  # drop what building the models printed
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    # transformers' loading progress bars may come first; the error is one line, the last.
    lines = [ln for ln in captured.err.splitlines() if "qdelta" in ln]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("qdelta compress: error: ")
    assert captured.err.rstrip("\n").endswith(lines[0])
    return lines[0]


def test_calib_without_a_tokenizer_is_a_clear_error(tmp_path, capsys, rng):
    base = tiny_llama(seed=int(rng.integers(1 << 30)))
    base.save_pretrained(tmp_path / "base")
    fake_finetune(base).save_pretrained(tmp_path / "ft")
    calib = tmp_path / "calib.txt"
    calib.write_text(_calib_text(rng, 2000), encoding="utf-8")
    out = tmp_path / "ft.qdelta"
    argv = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(out)]
    line = _fails([*argv, "--calib", str(calib), "--steps", "2"], capsys)
    assert TOKENIZER_FILE in line and "tokenizer.json" in line
    assert str(tmp_path / "ft") in line and str(tmp_path / "base") in line and "found none" in line
    assert not out.exists()


def _byte_tokenized_pair(tmp_path, rng, base=None, **config) -> list[str]:
    """Base (``base``, else a tiny Llama of ``config``) and fine-tune dirs (the byte
    tokenizer in the fine-tune's) and a calibration text; the compress command line
    for them, with --calib."""
    if base is None:
        base = tiny_llama(seed=int(rng.integers(1 << 30)), **config)
    base.save_pretrained(tmp_path / "base")
    fake_finetune(base).save_pretrained(tmp_path / "ft")
    ByteTokenizer().save(tmp_path / "ft")
    calib = tmp_path / "calib.txt"
    calib.write_text(_calib_text(rng, 2000), encoding="utf-8")
    argv = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(tmp_path / "x")]
    return [*argv, "--calib", str(calib)]


def test_byte_tokenizer_needs_a_big_enough_vocab(tmp_path, capsys, rng):
    argv = _byte_tokenized_pair(tmp_path, rng)  # 61 ids < 259
    line = _fails(argv, capsys)
    assert "at least 259 embedding rows" in line and "found 61" in line


def test_nonexistent_base_dir_is_a_clear_error(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "ft")
    missing = tmp_path / "no-such-base"
    out = tmp_path / "ft.qdelta"
    line = _fails(["compress", str(missing), str(tmp_path / "ft"), "-o", str(out)], capsys)
    assert str(missing) in line and "config.json" in line and "found none" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--steps", "50"],
        ["--seed", "7"],
        ["--seq-len", "64"],
        ["--steps", "5", "--seed", "1"],
        ["--keep-trained"],
    ],
)
def test_distillation_flags_without_calib_are_a_usage_error(tmp_path, capsys, extra):
    """They would be ignored without a word: the user asked for a distillation."""
    out = tmp_path / "x.qdelta"
    assert main(["compress", "b", "f", "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdelta compress: ") and "expected --calib" in err
    assert all(flag in err for flag in extra if flag.startswith("--"))
    assert not out.exists()


@pytest.mark.parametrize("command", ["compress b f -o x", "zoo", "eval", "demo", "ring-demo"])
def test_a_negative_seed_is_refused_before_any_work(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command.split(), "--seed", "-1"])
    assert e.value.code == 2
    assert "expected an int in 0..9223372036854775807, found -1" in capsys.readouterr().err


def test_calibration_windows_longer_than_the_models_positions_are_refused(tmp_path, capsys, rng):
    """A learned position table (GPT-2's 64 here) fails past its end; the byte
    tokenizer's vocabulary fits, so the positions are what fails."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(int(rng.integers(1 << 30)))
    cfg = GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2)
    cfg.n_positions = 64
    argv = [*_byte_tokenized_pair(tmp_path, rng, GPT2LMHeadModel(cfg).eval()), "--steps", "1"]
    line = _fails(argv, capsys)
    assert "expected at most 64 tokens (the model's positions), found windows of 128" in line
    assert "--seq-len" in line and not (tmp_path / "x").exists()
    assert main([*argv, "--seq-len", "64"]) == 0
    assert "seq_len=64" in qdelta.load(tmp_path / "x").metadata["distill"]


def test_a_rotary_model_distills_past_its_declared_positions(tmp_path, capsys, rng):
    """RoPE has no table to run off: 128-token windows on a Llama declaring 64 run."""
    config = {"max_position_embeddings": 64, "vocab_size": ByteTokenizer.vocab_size}
    argv = [*_byte_tokenized_pair(tmp_path, rng, **config), "--steps", "1"]
    assert main(argv) == 0
    assert "seq_len=128" in qdelta.load(tmp_path / "x").metadata["distill"]
