"""Perplexity and kept-fraction math against hand computations in float64."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from qdelta.errors import EvalError
from qdelta.eval import (
    ResultRow,
    evaluate_models,
    format_table,
    kept_fraction,
    perplexity,
    quality_rows,
    read_results,
    token_stream_nll,
    write_results,
)
from qdelta.tokenizer import ByteTokenizer


class BigramWithPosition(nn.Module):
    """logits[b, t] = table[x[b, t]] + pos[t]: depends on the position inside the window,
    so a wrong windowing changes the result."""

    def __init__(self, table: np.ndarray, pos: np.ndarray):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))
        self.pos = nn.Parameter(torch.tensor(pos, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x] + self.pos[: x.shape[1]]


def hand_nll(stream: list[int], window: int, table: np.ndarray, pos: np.ndarray) -> float:
    table = table.astype(np.float32).astype(np.float64)
    pos = pos.astype(np.float32).astype(np.float64)
    total = 0.0
    for j in range(1, len(stream)):
        logits = table[stream[j - 1]] + pos[(j - 1) % window]
        m = logits.max()
        total += m + math.log(sum(math.exp(v - m) for v in logits)) - logits[stream[j]]
    return total


@pytest.mark.parametrize(
    ("length", "window", "batch"), [(53, 8, 3), (49, 8, 1), (7, 16, 4), (2, 1, 2)]
)
def test_stream_nll_matches_hand_computation(rng, length, window, batch):
    vocab = 11
    table = rng.normal(size=(vocab, vocab)) * 2
    pos = rng.normal(size=(window, vocab))
    stream = rng.integers(0, vocab, size=length).tolist()
    model = BigramWithPosition(table, pos)
    got = token_stream_nll(model, stream, window=window, batch_size=batch)
    expected = hand_nll(stream, window, table, pos)
    assert got.tokens == length - 1
    assert got.nll_sum == pytest.approx(expected, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(expected / (length - 1)), rel=1e-5)
    # The batch size only groups windows; it never changes the result.
    again = token_stream_nll(model, stream, window=window, batch_size=batch + 2)
    assert again.nll_sum == pytest.approx(got.nll_sum, rel=1e-6)


def test_perplexity_of_text_predicts_every_byte_after_bos(rng):
    tok = ByteTokenizer()
    table = rng.normal(size=(tok.vocab_size, tok.vocab_size))
    pos = rng.normal(size=(16, tok.vocab_size))
    text = "héllo, wörld: " + "".join(chr(int(c)) for c in rng.integers(32, 127, size=37))
    got = perplexity(BigramWithPosition(table, pos), text, tok, window=16, batch_size=2)
    ids = list(text.encode("utf-8"))
    assert got.tokens == len(ids)
    assert got.nll_sum == pytest.approx(hand_nll([tok.bos_id, *ids], 16, table, pos), rel=1e-5)
    capped = perplexity(BigramWithPosition(table, pos), text, tok, window=16, max_tokens=10)
    assert capped.tokens == 10


def test_perplexity_matches_transformers_loss_on_a_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from uniform predictions
    text = "def f(x):\n    return x * 2  # twice\n" * 2
    window = 16
    stream = torch.tensor([tok.bos_id, *tok.encode(text)])
    # Reference: transformers' own mean loss per window, weighted by its predicted tokens.
    total, count = 0.0, 0
    for start in range(0, stream.numel() - 1, window):
        chunk = stream[start : start + window + 1].unsqueeze(0)
        with torch.no_grad():
            loss = model(input_ids=chunk, labels=chunk).loss
        total += float(loss) * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    got = perplexity(model, text, tok, window=window, batch_size=3)
    assert got.tokens == count == len(text)
    assert got.mean_nll == pytest.approx(total / count, rel=1e-4)


def test_evaluate_models_is_generic_over_models_and_texts(rng):
    tok = ByteTokenizer()
    models = {
        name: BigramWithPosition(
            rng.normal(size=(tok.vocab_size, tok.vocab_size)), rng.normal(size=(8, tok.vocab_size))
        )
        for name in ("a", "b")
    }
    texts = {"code": "x = [i for i in range(3)]", "prose": "The quick brown fox."}
    out = evaluate_models(models, texts, tok, window=8, batch_size=2, progress=False)
    assert set(out) == {"a", "b"} and all(set(v) == set(texts) for v in out.values())
    for m, per_text in out.items():
        for t, r in per_text.items():
            direct = perplexity(models[m], texts[t], tok, window=8)
            assert r["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
            assert r["tokens"] == len(texts[t].encode())
    single = evaluate_models({"a": models["a"]}, "abc", tok, window=8, progress=False)
    assert set(single["a"]) == {"text"}


def test_eval_errors_are_explicit(rng):
    tok = ByteTokenizer()
    model = BigramWithPosition(rng.normal(size=(259, 259)), rng.normal(size=(8, 259)))
    with pytest.raises(EvalError, match="non-empty"):
        perplexity(model, "", tok, window=8)

    class Flat(nn.Module):
        def forward(self, x):
            return x.float().sum(-1)

    with pytest.raises(EvalError, match="logits"):
        perplexity(Flat(), "abc", tok, window=8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size: expected an int >= 1, found 0"),
        ({"batch_size": -1}, "batch_size: expected an int >= 1, found -1"),
        ({"batch_size": 2.5}, "batch_size: expected an int >= 1, found float"),
        ({"window": 2.5}, "window: expected an int >= 1, found float"),
        ({"window": 0}, "window: expected an int >= 1, found 0"),
        ({"max_tokens": -3}, "max_tokens: expected an int >= 1, found -3"),
        ({"max_tokens": 0}, "max_tokens: expected an int >= 1, found 0"),
    ],
)
def test_bad_settings_are_refused_not_scored(rng, kwargs, match):
    """batch_size=-1 used to score nothing and report a perplexity of 1.0."""
    model = BigramWithPosition(rng.normal(size=(259, 259)), rng.normal(size=(8, 259)))
    with pytest.raises(EvalError, match=match):
        perplexity(model, "some text", ByteTokenizer(), **{"window": 8, **kwargs})


def test_a_non_finite_logit_at_a_padded_position_does_not_reach_the_sum(rng):
    """The last window is padded; a model giving the pad id a -inf logit there
    (a masked vocabulary entry) must give the same perplexity as without padding."""
    tok = ByteTokenizer()
    table = rng.normal(size=(259, 259))
    table[tok.pad_id] = -np.inf  # the pad token's row: every logit -inf
    model = BigramWithPosition(table, np.zeros((8, 259)))
    text = "abcdefghijkl"  # 13 ids with <bos>: 12 predicted, the second window of 8 padded
    got = perplexity(model, text, tok, window=8)
    stream = [tok.bos_id, *tok.encode(text)]
    want = hand_nll(stream, 8, table, np.zeros((8, 259)))
    assert math.isfinite(got.nll_sum) and got.nll_sum == pytest.approx(want, rel=1e-6)


def test_kept_fraction_by_hand():
    assert kept_fraction(10.0, 6.0, 7.0) == pytest.approx(0.75)
    assert kept_fraction(10.0, 6.0, 6.0) == pytest.approx(1.0)
    assert kept_fraction(10.0, 6.0, 10.0) == pytest.approx(0.0)
    assert kept_fraction(10.0, 6.0, 11.0) == pytest.approx(-0.25)
    assert kept_fraction(5.5, 4.25, 4.5) == pytest.approx(1.0 / 1.25)
    with pytest.raises(EvalError, match="undefined"):
        kept_fraction(3.0, 3.0, 2.0)
    with pytest.raises(EvalError, match="finite"):
        kept_fraction(3.0, 2.0, float("nan"))


def test_results_rows_table_and_json(tmp_path):
    ppls = {"3-bit": 4.01, "base": 5.0, "bitdelta-distilled": 4.1, "finetune": 4.0}
    rows = quality_rows(
        "code",
        "code",
        ppls,
        sizes={"3-bit": {"bits": 3, "delta_bytes": 1234, "compression": 5.3}},
    )
    assert [r.variant for r in rows] == ["base", "finetune", "bitdelta-distilled", "3-bit"]
    by = {r.variant: r for r in rows}
    assert by["bitdelta-distilled"].kept == pytest.approx(0.9)
    assert by["3-bit"].kept == pytest.approx(0.99)
    assert by["3-bit"].delta_bytes == 1234 and by["base"].delta_bytes is None
    table = format_table(rows)
    assert "90.0%" in table and "99.0%" in table and "5.3x" in table and "1,234" in table
    path = write_results(tmp_path / "out" / "quality.json", rows, meta={"zoo": "tiny"})
    meta, back = read_results(path)
    assert meta == {"zoo": "tiny"} and back == rows
    assert isinstance(back[0], ResultRow)
    with pytest.raises(EvalError, match="finetune"):
        quality_rows("x", "code", {"base": 3.0})


def test_a_stream_the_model_cannot_take_is_refused_up_front():
    """Ids past the vocabulary, a window past a learned position table, a float
    stream: each an EvalError naming it, not an IndexError from inside the model."""
    from tests.tiny_models import tiny_gpt2  # vocab 61, 64 learned positions

    model = tiny_gpt2(0)
    vocab, limit = model.config.vocab_size, model.config.n_positions
    ok = torch.randint(0, vocab, (3 * limit,))
    assert token_stream_nll(model, ok, window=limit).tokens == 3 * limit - 1
    bad = ok.clone()
    bad[7] = vocab
    with pytest.raises(EvalError, match=f"vocabulary of {vocab} .*found {vocab} at position 7"):
        token_stream_nll(model, bad, window=16)
    with pytest.raises(
        EvalError, match=f"pad_id: expected ids in the model's vocabulary of {vocab}"
    ):
        token_stream_nll(model, ok, window=16, pad_id=vocab + 3)
    with pytest.raises(EvalError, match=f"window: expected at most {limit} tokens"):
        token_stream_nll(model, ok, window=limit + 1)
    with pytest.raises(EvalError, match="window: expected at most"):  # windows are padded
        token_stream_nll(model, ok[: limit // 2], window=limit + 1)
    with pytest.raises(EvalError, match=r"expected integer token ids, found torch\.float32"):
        token_stream_nll(model, ok.float() + 0.5, window=16)
    with pytest.raises(EvalError, match="found 256"):  # bytes need a vocabulary of >= 259
        perplexity(model, "hello", window=16)
