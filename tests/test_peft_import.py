"""from_peft against PEFT's own merge_and_unload(), offline on tiny Llama and GPT-2 models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.tiny_models import tiny_gpt2, tiny_llama

import qdelta
from qdelta.peft_import import bitdelta_bytes, lora_bytes

peft = pytest.importorskip("peft")


def _adapted(base, *, rank, alpha, targets, dora, seed, **extra):
    cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_dora=dora, **extra
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero and m at ||W||: make both non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    return model


def _merged_delta(base, peft_model):
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    b = base.state_dict()
    return {k: merged[k].double() - b[k].double() for k in b}


CASES = [
    dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], dora=False),
    dict(rank=3, alpha=1, targets=["q_proj", "k_proj", "o_proj", "down_proj"], dora=False),
    dict(rank=4, alpha=16, targets=["q_proj", "v_proj", "gate_proj"], dora=True),
    dict(rank=2, alpha=3, targets=["k_proj", "up_proj", "down_proj"], dora=True),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{'dora' if c['dora'] else 'lora'}-r{c['rank']}"
)
def test_from_peft_equals_merge_and_unload(case, tmp_path):
    base = tiny_llama(seed=int(torch.randint(1000, (1,))))
    model = _adapted(base, seed=int(torch.randint(1000, (1,))), **case)
    want = _merged_delta(base, model)
    for source in (model, tmp_path):
        if source is tmp_path:
            model.save_pretrained(tmp_path)
        dense = qdelta.from_peft(base, source)
        assert dense.metadata["source"] == ("dora" if case["dora"] else "lora")
        assert dense.metadata["lora_rank"] == str(case["rank"])
        assert dense.base_fingerprint == qdelta.fingerprint(base)
        assert all(any(n.endswith(t) for t in case["targets"]) for n in dense.layers)
        assert len(dense.layers) == 2 * len(case["targets"])  # 2 decoder layers
        for key, d in want.items():
            name = key.removesuffix(".weight")
            if name in dense.layers:
                assert float(d.abs().max()) > 0
                torch.testing.assert_close(dense.layers[name].double(), d, atol=2e-6, rtol=1e-5)
            else:
                assert float(d.abs().max()) == 0.0, key
    # The caller's base is untouched and the delta compresses like any fine-tune.
    assert not any("lora" in k for k in base.state_dict())
    _check_merges(base, model, dense)


def _check_merges(base, peft_model, dense):
    """base + the dense delta is PEFT's merged model; base + its 1-bit form moves
    exactly the adapted layers, by the planes' reconstruction."""
    want = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    got = dense.merge_into(copy.deepcopy(base)).state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=2e-6, rtol=1e-5, msg=key)
    packed = dense.compress(bits=1, tenant="adapter")
    assert packed.metadata["source"] == dense.metadata["source"]
    merged = qdelta.merge(copy.deepcopy(base), packed).state_dict()
    for key, b in base.state_dict().items():
        name = key.removesuffix(".weight")
        if name not in packed.layers:
            assert torch.equal(merged[key], b), key
            continue
        layer = packed.layers[name]
        d = torch.from_numpy(layer.dense())
        d = d.T if layer.transposed else d
        assert not torch.equal(merged[key], b), key
        torch.testing.assert_close(merged[key], b + d, atol=1e-6, rtol=0, msg=key)
        # The 1-bit form keeps the adapter's signs.
        ref = dense.weight(name).numpy()
        np.testing.assert_array_equal(np.signbit(d.numpy()), np.signbit(ref))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_from_peft_fan_in_fan_out_on_gpt2_conv1d(dora, tmp_path):
    # GPT-2's Conv1D stores the weight [in, out]: PEFT's LoRA needs fan_in_fan_out=True.
    base = tiny_gpt2(seed=int(torch.randint(1000, (1,))))
    targets = ["c_attn", "c_proj", "c_fc"]
    model = _adapted(base, rank=3, alpha=6, targets=targets, dora=dora, seed=4, fan_in_fan_out=True)
    want = _merged_delta(base, model)
    for source in (model, tmp_path):
        if source is tmp_path:
            model.save_pretrained(tmp_path)
        dense = qdelta.from_peft(base, source)
        assert dense.metadata["source"] == ("dora" if dora else "lora")
        # c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj in each of the 2 blocks, all Conv1D.
        assert len(dense.layers) == 8 and dense.transposed == frozenset(dense.layers)
        for key, d in want.items():
            name = key.removesuffix(".weight")
            if name in dense.layers:
                in_f, out_f = base.get_submodule(name).weight.shape
                assert tuple(dense.layers[name].shape) == (out_f, in_f)  # [out, in] like Linear
                assert float(d.abs().max()) > 0
                torch.testing.assert_close(dense.weight(name).double(), d, atol=2e-6, rtol=1e-5)
            else:
                assert float(d.abs().max()) == 0.0, key
    _check_merges(base, model, dense)


def test_memory_honesty_lora_vs_one_bit():
    # r=16 on 4096x4096: the LoRA (fp16) is 8x smaller than the 1-bit delta.
    assert lora_bytes((4096, 4096), 16) == 16 * 8192 * 2
    assert bitdelta_bytes((4096, 4096), 1) == 4096 * 128 * 4 + 4
    (row,) = qdelta.memory_report({"q": (4096, 4096)}, rank=16)
    assert row["smaller"] == "lora" and row["break_even_rank"] == 128
    (row,) = qdelta.memory_report({"q": (4096, 4096)}, rank=256)
    assert row["smaller"] == "delta"
    (row,) = qdelta.memory_report({"q": (4096, 11008)}, rank=16, dora=True)
    assert row["lora_bytes"] == 2 * (16 * (4096 + 11008) + 4096)


def test_memory_report_refuses_what_is_not_a_shape_table():
    with pytest.raises(
        qdelta.ShapeError, match=r"expected a mapping \{layer name: \(out, in\)\}, found list"
    ):
        qdelta.memory_report([(4096, 4096)], rank=16)
    with pytest.raises(qdelta.ShapeError, match=r"shapes\['q'\]: expected \(out, in\), found 4096"):
        qdelta.memory_report({"q": 4096}, rank=16)
    with pytest.raises(qdelta.ShapeError, match=r"rank: expected an int >= 0, found -1"):
        qdelta.memory_report({"q": (8, 8)}, rank=-1)
    with pytest.raises(qdelta.DTypeError, match=r"bits: expected an int, found float"):
        qdelta.memory_report({"q": (8, 8)}, rank=1, bits=1.5)


def test_inspect_says_which_form(tmp_path, capsys):
    base = tiny_llama(seed=int(torch.randint(1000, (1,))))
    model = _adapted(base, rank=2, alpha=4, targets=["q_proj"], dora=True, seed=7)
    qdelta.from_peft(base, model).compress(bits=1, tenant="ad").save(tmp_path / "ad.qdelta")
    from qdelta.cli import main

    assert main(["inspect", str(tmp_path / "ad.qdelta")]) == 0
    out = capsys.readouterr().out
    assert "stored form  1-bit sign planes + scales per layer, from a DoRA adapter" in out
    # q_proj 32x32, rank 2: A+B = 2*(32+32) fp32 + m 32 fp32 = 640 B per layer, 2 layers = 1280 B;
    # the 1-bit planes take 32*1*4 + 4 = 132 B per layer.
    assert "rank 2 dora adapter: 1.2 KiB; these planes: 264 B (smaller: planes)" in out
