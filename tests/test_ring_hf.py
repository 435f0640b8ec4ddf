"""A Hugging Face Llama model run as ring attention over 2 gloo ranks equals its plain forward."""

import pytest

pytest.importorskip("transformers")

from qdelta.ring.demo import run_ring_demo


@pytest.mark.timeout(300)
def test_llama_ring_logits_equal_single_process():
    summary = run_ring_demo(world_size=2, seq_len=77, layout="zigzag", seed=3, timeout=240)
    assert summary["max_abs_logit"] > 0.1  # the comparison is not trivially between zeros
    assert summary["ok"], summary


def test_cli_has_ring_demo():
    from qdelta.cli import build_parser

    args = build_parser().parse_args(["ring-demo", "--world-size", "3", "--layout", "contiguous"])
    assert (
        args.world_size == 3 and args.layout == "contiguous" and args.seq_len is None
    )  # 1024 unless --zoo


def test_cli_ring_demo_zoo_flag():
    from qdelta.cli import build_parser

    assert build_parser().parse_args(["ring-demo", "--zoo"]).zoo == "default"
    assert build_parser().parse_args(["ring-demo", "--zoo", "tiny"]).zoo == "tiny"
    assert build_parser().parse_args(["ring-demo"]).zoo is None


@pytest.mark.timeout(300)
def test_ring_demo_with_a_sliding_window_model():
    summary = run_ring_demo(
        world_size=3, seq_len=61, layout="contiguous", seed=1, timeout=240, sliding_window=9
    )
    assert summary["sliding_window"] == 9 and summary["ok"], summary


def test_ring_demo_sliding_window_is_checked():
    from qdelta.ring.errors import RingError

    with pytest.raises(RingError, match="sliding window >= 1"):
        run_ring_demo(sliding_window=0)
    with pytest.raises(RingError, match="not with a model directory"):
        run_ring_demo(sliding_window=8, model_dir="/nonexistent")
    from qdelta.cli import build_parser

    assert build_parser().parse_args(["ring-demo", "--sliding-window", "8"]).sliding_window == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ring-demo", "--sliding-window", "0"])


def test_cli_refuses_sliding_window_with_the_zoo(capsys):
    from qdelta.cli import main

    assert main(["ring-demo", "--sliding-window", "8", "--zoo"]) == 2
    assert "expected no --zoo" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, named", [(["--model", "/nonexistent"], "--model"), (["--seq-len", "40"], "--seq-len")]
)
def test_cli_refuses_zoo_with_a_model_or_a_length(capsys, extra, named):
    from qdelta.cli import main

    assert main(["ring-demo", "--zoo", "tiny", *extra]) == 2
    assert f"expected no {named} with it" in capsys.readouterr().err
