"""`qdelta compress BASE_DIR FINETUNED_DIR -o out.qdelta` (needs the .qdelta store)."""

from __future__ import annotations

import pytest
from tests.tiny_models import fake_finetune, tiny_llama

import qdelta
from qdelta.cli import build_parser, main


def test_parser_accepts_the_documented_flags():
    args = build_parser().parse_args(
        ["compress", "b", "f", "-o", "x.qdelta", "--bits", "2", "--calib", "c.txt", "--steps", "9"]
    )
    assert (args.base, args.finetuned, args.output) == ("b", "f", "x.qdelta")
    assert (args.bits, args.calib, args.steps) == (2, "c.txt", 9)


@pytest.mark.skipif(
    not hasattr(qdelta.Delta, "save"), reason="needs the .qdelta store (Delta.save)"
)
def test_compress_writes_a_delta_and_prints_a_summary(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    fake_finetune(base).save_pretrained(tmp_path / "ft")
    out = tmp_path / "ft.qdelta"
    assert (
        main(
            [
                "compress",
                str(tmp_path / "base"),
                str(tmp_path / "ft"),
                "-o",
                str(out),
                "--bits",
                "2",
            ]
        )
        == 0
    )
    assert out.is_file()
    text = capsys.readouterr().out
    assert "14 layers, 2 bit(s)" in text and "ratio" in text
    loaded = qdelta.load(out)
    assert sorted(loaded.layers) == sorted(qdelta.compress(base, tmp_path / "ft", bits=2).layers)
