"""distill and prepare_calibration refuse bad input with clear errors, before the delta is applied."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.tiny_models import VOCAB, fake_finetune, one_thread, tiny_gpt2, tiny_llama

import qdelta
from qdelta.errors import CalibrationError, DTypeError, ModelMismatchError, ShapeError


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def pair():
    base = tiny_llama(0)
    ft = fake_finetune(base, seed=1)
    return base, ft, qdelta.compress(base, ft)


def _calib(n: int = 8, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


def _untouched(model) -> bool:
    return not any(isinstance(m, qdelta.BitDeltaLinear) for m in model.modules())


def _refused(pair, error, match, calib=None, finetuned=None, **kw):
    base, ft, delta = pair
    base.train()  # the failed call must leave the mode as it was, too
    try:
        with pytest.raises(error, match=match):
            qdelta.distill(
                base,
                ft if finetuned is None else finetuned,
                delta,
                _calib() if calib is None else calib,
                **{"steps": 1, "batch_size": 2, "progress": False, **kw},
            )
        assert _untouched(base) and base.training
    finally:
        base.eval()


def test_valid_call_still_trains(pair):
    base, ft, delta = pair
    result = qdelta.distill(base, ft, delta, _calib(), steps=2, batch_size=2, progress=False)
    assert len(result.losses) == 2 and _untouched(base)
    zero = qdelta.distill(base, ft, delta, _calib(), steps=0, batch_size=2, progress=False)
    assert zero.losses == [] and zero.loss_before == zero.loss_after


def test_another_architecture_is_refused(pair):
    deeper = tiny_llama(0, num_hidden_layers=3)  # same vocabulary, one more layer
    _refused(pair, ModelMismatchError, "expected the same architecture", finetuned=deeper)
    _refused(pair, ModelMismatchError, "expected the same architecture", finetuned=tiny_gpt2(0))
    wider_vocab = tiny_llama(0, vocab_size=VOCAB + 5)
    _refused(
        pair, ShapeError, r"embed_tokens.weight.*\[61, 32\].*\[66, 32\]", finetuned=wider_vocab
    )


def test_a_base_with_a_delta_applied_is_refused(pair):
    base, ft, delta = pair
    applied = qdelta.apply(copy.deepcopy(base), delta)
    with pytest.raises(ModelMismatchError, match=r"found a delta applied \(qdelta.unapply it"):
        qdelta.distill(applied, ft, delta, _calib(), steps=1, batch_size=2, progress=False)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"steps": -3}, ShapeError, r"steps: expected an int >= 0, found -3"),
        ({"steps": 2.5}, DTypeError, r"steps: expected an int, found float"),
        ({"steps": True}, DTypeError, r"steps: expected an int, found bool"),
        ({"batch_size": 0}, ShapeError, r"batch_size: expected an int >= 1, found 0"),
        ({"batch_size": -1}, ShapeError, r"batch_size: expected an int >= 1, found -1"),
        ({"seq_len": 2.5}, DTypeError, r"seq_len: expected an int, found float"),
        ({"seq_len": 0}, ShapeError, r"seq_len: expected an int >= 1, found 0"),
        ({"lr": float("nan")}, ShapeError, r"lr: expected a finite float32 number > 0, found nan"),
        ({"lr": -1e-3}, ShapeError, r"lr: expected a finite float32 number > 0, found -0.001"),
        ({"lr": 1e39}, ShapeError, r"lr: expected a finite float32 number > 0, found 1e\+39"),
        ({"lr": "fast"}, DTypeError, r"lr: expected a number, found str"),
        ({"loss": "l1"}, ShapeError, r"loss: expected one of \('mse', 'kl'\), found 'l1'"),
        ({"eval_batches": 1.5}, DTypeError, r"eval_batches: expected an int, found float"),
        ({"eval_batches": 0}, ShapeError, r"eval_batches: expected an int >= 1, found 0"),
        ({"seed": "x"}, DTypeError, r"seed: expected an int, found str"),
    ],
)
def test_bad_arguments_are_refused_before_applying(pair, kw, error, match):
    _refused(pair, error, match, **kw)


def test_token_ids_outside_the_vocabulary(pair):
    calib = _calib()
    calib[3, 5] = VOCAB
    _refused(
        pair, CalibrationError, rf"vocabulary of 61.*found {VOCAB} at row 3, position 5", calib
    )
    calib = _calib()
    calib[1, 2] = -4
    _refused(pair, CalibrationError, r"expected token ids >= 0, found -4", calib)
    _refused(pair, CalibrationError, "integer token ids", _calib() > 30)  # bool
    _refused(pair, CalibrationError, "integer token ids", {"input_ids": [[0.5, 1.5]] * 4})


def test_bad_tokenizers(pair):
    texts = ["some text", "more text", "and more", "the end"]
    _refused(pair, CalibrationError, "expected a callable tokenizer", texts, tokenizer="gpt2")
    _refused(
        pair,
        CalibrationError,
        "expected token ids.*found str",
        texts,
        tokenizer=lambda s: s.upper(),
    )
    _refused(
        pair,
        CalibrationError,
        "expected int token ids.*found float",
        texts,
        tokenizer=lambda s: [1.5] * len(s),
    )
    _refused(
        pair,
        CalibrationError,
        r"expected 'input_ids'.*found \['ids'\]",
        texts,
        tokenizer=lambda s: {"ids": [1, 2]},
    )
    # Token ids past the vocabulary from a tokenizer are caught like any others.
    _refused(
        pair, CalibrationError, "vocabulary of 61", texts, tokenizer=lambda s: [ord(c) for c in s]
    )


def test_prepare_calibration_checks():
    with pytest.raises(CalibrationError, match=r"seq_len: expected an int >= 1, found 2.5"):
        qdelta.prepare_calibration(_calib(), seq_len=2.5)
    with pytest.raises(CalibrationError, match=r"integer token ids.*torch.bool"):
        qdelta.prepare_calibration(_calib() > 3)
    with pytest.raises(CalibrationError, match=r"attention_mask.*shape \[8, 8\].*\[8, 7\]"):
        qdelta.prepare_calibration({"input_ids": _calib(), "attention_mask": torch.ones(8, 7)})
    with pytest.raises(CalibrationError, match="expected a rectangular"):
        qdelta.prepare_calibration({"input_ids": [[1, 2, 3], [4]]})
    # a tokenizer returning one row as a [1, L] tensor or list is fine
    ids, _ = qdelta.prepare_calibration(["ab"], lambda s: torch.tensor([[1, 2]]), seq_len=4)
    assert ids.tolist() == [[1, 2]]


def test_calibration_token_id_lists_ragged_and_checked():
    ids, mask = qdelta.prepare_calibration([[5, 6, 7], (8,), np.array([9, 10])], seq_len=2)
    assert ids.tolist() == [[5, 6], [8, 0], [9, 10]]
    assert mask.tolist() == [[1, 1], [1, 0], [1, 1]]
    with pytest.raises(
        CalibrationError, match=r"id list 1: expected token ids \(ints >= 0\), found -3"
    ):
        qdelta.prepare_calibration([[1, 2], [-3]])
    with pytest.raises(CalibrationError, match=r"id list 0: .* found 1.5 \(float\)"):
        qdelta.prepare_calibration([[1.5]])
    with pytest.raises(CalibrationError, match=r"found a list of int, str"):
        qdelta.prepare_calibration([3, "text"])


@pytest.mark.parametrize(
    "calib, shown",
    [
        ("x" * 5000, r"'x{60}'\.\.\. \(5000 characters\)"),  # longer than any path: was OSError
        ("def f():\n    return 1\n" * 3, r"'def f\(\):\\n.*\(66 characters\)"),  # text
        ("calib\0.txt", "calib"),  # a NUL: was ValueError
        ("no-such-file.txt", "no-such-file.txt"),
    ],
)
def test_text_passed_where_a_path_goes_is_a_clear_error(calib, shown):
    with pytest.raises(CalibrationError, match=f"found no file {shown}.*list of strings"):
        qdelta.prepare_calibration(calib, lambda s: [1, 2])
