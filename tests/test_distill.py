"""Scale distillation on a real (tiny) fine-tune trained inside the test."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from tests.tiny_models import VOCAB, one_thread, output, tiny_llama

import qdelta


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_thread()


def _sequences(rule, n: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n,), generator=gen)
    cols = [x]
    for _ in range(length - 1):
        x = rule(x) % VOCAB
        cols.append(x)
    return torch.stack(cols, 1)


def _count_up(x):
    return x + 1


def _affine(x):
    return 3 * x + 2


def _train(model, rule, steps: int, lr: float, seed: int):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        ids = _sequences(rule, 8, 16, seed * 1000 + step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def finetune():
    """A tiny base trained on one token distribution, then fully fine-tuned on another."""
    base = _train(tiny_llama(0), _count_up, steps=40, lr=3e-3, seed=1)
    ft = _train(copy.deepcopy(base), _affine, steps=40, lr=2e-3, seed=2)
    calib = _sequences(_affine, 32, 16, seed=3)
    held_out = _sequences(_affine, 16, 16, seed=4)
    return base, ft, calib, held_out


def _mse(base, ft, delta, ids) -> float:
    model = qdelta.apply(copy.deepcopy(base), delta)
    with torch.no_grad():
        return float((output(model, ids) - output(ft, ids)).pow(2).mean())


def _distill(base, ft, delta, calib, **kw):
    kw = {"steps": 20, "lr": 2e-3, "progress": False, **kw}
    return qdelta.distill(base, ft, delta, calib, **kw)


def test_distillation_lowers_mse_and_more_planes_lower_it_further(finetune):
    base, ft, calib, held = finetune
    distilled = []
    for bits in (1, 2, 3):
        delta = qdelta.compress(base, ft, bits=bits)
        result = _distill(base, ft, delta, calib)
        initial, trained = _mse(base, ft, delta, held), _mse(base, ft, result.delta, held)
        assert trained < 0.95 * initial, (bits, initial, trained)
        assert result.loss_after < result.loss_before
        assert len(result.losses) == 20 and np.isfinite(result.losses).all()
        distilled.append(trained)
    assert distilled[2] < distilled[1] < distilled[0], distilled


def test_only_scales_train_and_the_base_is_shared(finetune):
    base, ft, calib, _ = finetune
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ft_before = {k: v.clone() for k, v in ft.state_dict().items()}
    original_q = base.model.layers[0].self_attn.q_proj
    weight_ptr = original_q.weight.data_ptr()
    grad_flags = {n: p.requires_grad for n, p in base.named_parameters()}
    seen = {}

    def spy(module, args):
        wrapper = base.model.layers[0].self_attn.q_proj
        seen["wrapped"] = (
            isinstance(wrapper, qdelta.BitDeltaLinear) and wrapper.base_layer is module
        )
        seen["trainable"] = sorted(n for n, p in base.named_parameters() if p.requires_grad)
        seen["ptr"] = module.weight.data_ptr()

    handle = original_q.register_forward_pre_hook(spy)
    delta = qdelta.compress(base, ft)
    initial = {n: layer.scales.copy() for n, layer in delta.layers.items()}
    try:
        result = _distill(base, ft, delta, calib, steps=3)
    finally:
        handle.remove()
    assert seen["wrapped"] and seen["ptr"] == weight_ptr
    assert seen["trainable"] and all(n.endswith(".scales") for n in seen["trainable"])
    assert len(seen["trainable"]) == len(delta.layers)
    # Nothing but the scales changed: base, fine-tune and the input delta are untouched.
    for ref, model in ((before, base), (ft_before, ft)):
        now = model.state_dict()
        assert now.keys() == ref.keys() and all(torch.equal(now[k], v) for k, v in ref.items())
    assert base.model.layers[0].self_attn.q_proj is original_q
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grad_flags
    for name, layer in result.delta.layers.items():
        np.testing.assert_array_equal(delta.layers[name].scales, initial[name])
        assert layer.planes is delta.layers[name].planes  # shared, not copied
        assert not np.array_equal(layer.scales, initial[name])
    assert result.delta.params.keys() == delta.params.keys()


def test_seeded_and_reproducible(finetune):
    base, ft, calib, _ = finetune
    delta = qdelta.compress(base, ft, scale="row")
    a = _distill(base, ft, delta, calib, steps=3, seed=7, eval_batches=1)
    b = _distill(base, ft, delta, calib, steps=3, seed=7, eval_batches=1)
    c = _distill(base, ft, delta, calib, steps=3, seed=8, eval_batches=1)
    assert a.losses == b.losses
    for name in delta.layers:
        np.testing.assert_array_equal(a.delta.layers[name].scales, b.delta.layers[name].scales)
    assert a.losses != c.losses


def test_a_run_that_makes_the_loss_worse_keeps_the_initial_scales(finetune):
    """A far too large lr: by default the initial scales come back (a copy), flagged
    and recorded in the metadata; with keep_best=False the trained ones, with a warning."""
    base, ft, calib, _ = finetune
    delta = qdelta.compress(base, ft)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        kept = _distill(base, ft, delta, calib, lr=5.0)
    assert kept.kept_initial and kept.loss_after > kept.loss_before
    assert kept.delta.metadata["distill"].endswith("lr=5.0,loss=mse,seed=0,kept=initial")
    assert "distill" not in delta.metadata  # the input delta is not changed
    for name, layer in delta.layers.items():
        got = kept.delta.layers[name]
        np.testing.assert_array_equal(got.scales, layer.scales)
        assert got.scales is not layer.scales and got.planes is layer.planes
    # the kept delta scores what the initial one did
    again = _distill(base, ft, kept.delta, calib, steps=0)
    assert again.loss_before == pytest.approx(kept.loss_before, rel=1e-6)

    with pytest.warns(RuntimeWarning, match=r"loss rose from .* over 20 steps \(lr=5.0\)"):
        bad = _distill(base, ft, delta, calib, lr=5.0, keep_best=False)
    assert not bad.kept_initial and bad.loss_after > bad.loss_before
    assert bad.delta.metadata["distill"].endswith("lr=5.0,loss=mse,seed=0")
    assert any(
        not np.array_equal(bad.delta.layers[n].scales, delta.layers[n].scales) for n in delta.layers
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        good = _distill(base, ft, delta, calib)
    assert not good.kept_initial
    assert "lr=0.002" in good.delta.metadata["distill"]
    with pytest.raises(qdelta.ShapeError, match=r"with_scales: expected layers of this delta"):
        delta.with_scales({"no.such.layer": np.ones(1, np.float32)})
    name = next(iter(delta.layers))
    with pytest.raises(qdelta.ShapeError, match=f"layer {name}: scales"):
        delta.with_scales({name: np.ones(7, np.float32)})
    with pytest.raises(qdelta.DTypeError, match="keep_best: expected a bool, found int"):
        _distill(base, ft, delta, calib, keep_best=1)


def test_kl_loss_and_text_inputs(finetune, tmp_path):
    base, ft, _, _ = finetune

    def tokenizer(text: str) -> dict:
        return {"input_ids": [ord(ch) % VOCAB for ch in text]}

    texts = ["the quick brown fox", "jumps over", "the lazy dog", "again and again", "x"]
    delta = qdelta.compress(base, ft)
    kl = _distill(base, ft, delta, texts, tokenizer=tokenizer, steps=6, loss="kl", seq_len=8)
    assert kl.loss_after < kl.loss_before
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(texts) * 3, encoding="utf-8")
    ids, mask = qdelta.prepare_calibration(path, tokenizer, seq_len=16)
    assert ids.shape[1] == 16 and mask[:-1].all()
    assert ids.shape[0] == -(-len(" ".join(texts) * 3) // 16)
    from_file = _distill(base, ft, delta, str(path), tokenizer=tokenizer, steps=2, seq_len=16)
    assert from_file.loss_after <= from_file.loss_before * 1.05


def test_padding_is_masked():
    s = torch.randn(2, 5, 7)
    t = torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    want = ((s - t) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(qdelta.distill_loss(s, t, mask), want)
    noisy = s.clone()
    noisy[0, 3:] += 100.0  # padding positions do not count
    torch.testing.assert_close(qdelta.distill_loss(noisy, t, mask), want)


def test_calibration_too_short_or_malformed(finetune, tmp_path):
    base, ft, _, _ = finetune
    delta = qdelta.compress(base, ft)
    with pytest.raises(qdelta.CalibrationError, match=r"at least 4 non-empty sequences.*found 2"):
        qdelta.distill(base, ft, delta, torch.randint(0, VOCAB, (2, 9)), progress=False)
    with pytest.raises(qdelta.CalibrationError, match="tokenizer"):
        qdelta.distill(base, ft, delta, ["a", "b", "c", "d"], progress=False)
    with pytest.raises(qdelta.CalibrationError, match="no file"):
        qdelta.distill(base, ft, delta, str(tmp_path / "missing.txt"), progress=False)
    with pytest.raises(qdelta.CalibrationError, match="integer token ids"):
        qdelta.distill(base, ft, delta, torch.randn(4, 8), progress=False)
    empty = tmp_path / "short.txt"
    empty.write_text("abc", encoding="utf-8")
    with pytest.raises(qdelta.CalibrationError, match="found 1"):
        qdelta.distill(base, ft, delta, empty, tokenizer=lambda s: [1] * len(s), progress=False)
    # The failed calls left the base model untouched.
    assert not any(isinstance(m, qdelta.BitDeltaLinear) for m in base.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embedding_and_head_train_one_scale_and_merge(arch):
    """compress_embeddings on a tied model: the tied pair gets one delta, and distilling
    keeps it one (one trained scale for the one tensor), so the result merges and the
    merged model is the applied one."""
    from tests.tiny_models import fake_finetune, tiny_gpt2

    base = tiny_gpt2(0) if arch == "gpt2" else tiny_llama(0, tie_word_embeddings=True)
    emb, head = (
        ("transformer.wte", "lm_head") if arch == "gpt2" else ("model.embed_tokens", "lm_head")
    )
    ft = fake_finetune(base, 1, rel=0.2)
    delta = qdelta.compress(base, ft, compress_embeddings=True)
    ids = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))
    result = qdelta.distill(base, ft, delta, ids, steps=20, lr=1e-3, progress=False, eval_batches=2)
    assert not result.kept_initial
    trained = result.delta
    assert not np.array_equal(trained.layers[emb].scales, delta.layers[emb].scales)  # trained
    np.testing.assert_array_equal(trained.layers[emb].scales, trained.layers[head].scales)
    merged = qdelta.merge(copy.deepcopy(base), trained)
    applied = qdelta.apply(copy.deepcopy(base), trained)
    torch.testing.assert_close(output(merged, ids), output(applied, ids), rtol=0, atol=1e-5)
