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
    assert args.world_size == 3 and args.layout == "contiguous" and args.seq_len == 1024


def test_cli_ring_demo_zoo_flag():
    from qdelta.cli import build_parser

    assert build_parser().parse_args(["ring-demo", "--zoo"]).zoo == "default"
    assert build_parser().parse_args(["ring-demo", "--zoo", "tiny"]).zoo == "tiny"
    assert build_parser().parse_args(["ring-demo"]).zoo is None
