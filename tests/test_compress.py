"""compress() + apply(): the applied model equals the dense merged model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.tiny_models import (
    BUILDERS,
    VOCAB,
    fake_finetune,
    one_thread,
    output,
    tiny_gpt2,
    tiny_llama,
)

import qdelta


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_thread()


def _ids(batch: int = 2, length: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # ragged batch
    return ids, mask


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_applied_equals_merged(arch, scale):
    base = BUILDERS[arch]()
    ft = fake_finetune(base)
    delta = qdelta.compress(base, ft, bits=2, scale=scale)
    assert delta.layers and all(layer.bits == 2 for layer in delta.layers.values())
    assert all(layer.scale_mode == scale for layer in delta.layers.values())
    merged = qdelta.merge(copy.deepcopy(base), delta)
    ids, mask = _ids()
    qdelta.apply(base, delta)
    assert any(isinstance(m, qdelta.BitDeltaLinear) for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(
            output(base, ids, mask), output(merged, ids, mask), atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_sixteen_planes_reconstruct_the_finetune(arch):
    base = BUILDERS[arch]()
    ft = fake_finetune(base)
    ids, mask = _ids()

    def rel_error(bits: int) -> float:
        delta = qdelta.compress(base, ft, bits=bits, scale="row")
        model = qdelta.apply(copy.deepcopy(base), delta)
        with torch.no_grad():
            got, want = output(model, ids, mask), output(ft, ids, mask)
            moved = output(base, ids, mask) - want
        return float((got - want).norm() / moved.norm())

    # Greedy residual planes converge slowly (docs/FORMAT.md): ~7% weight error at 16 planes.
    err1, err16 = rel_error(1), rel_error(16)
    assert err16 < 0.05
    assert err16 < err1 / 5


def test_gpt2_conv1d_is_transposed_and_layer_weights_match():
    base = tiny_gpt2()
    ft = fake_finetune(base)
    delta = qdelta.compress(base, ft, bits=1, scale="row")
    layer = delta.layers["transformer.h.0.attn.c_attn"]
    conv = ft.transformer.h[0].attn.c_attn
    assert layer.transposed and layer.shape == (conv.weight.shape[1], conv.weight.shape[0])
    d = (
        conv.weight.detach().double() - base.transformer.h[0].attn.c_attn.weight.detach().double()
    ).T
    want = torch.where(d < 0, -1.0, 1.0) * d.abs().mean(1, keepdim=True)
    np.testing.assert_allclose(layer.dense().astype(np.float64), want.numpy(), rtol=1e-5, atol=1e-8)


def test_default_targets_keep_embeddings_head_and_norms_whole():
    base = tiny_llama()
    ft = fake_finetune(base)
    delta = qdelta.compress(base, ft)
    assert all(".layers." in name for name in delta.layers)
    assert len(delta.layers) == 2 * 7
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(delta.params[key], ft.state_dict()[key], rtol=0, atol=0)
    # Tensors equal in base and fine-tune are not stored.
    ft2 = copy.deepcopy(base)
    with torch.no_grad():
        ft2.model.layers[1].mlp.up_proj.weight.add_(0.01)
    only = qdelta.compress(base, ft2)
    assert only.params == {}


def test_target_selection_exact_suffix_regex_exclude():
    base = tiny_llama()
    ft = fake_finetune(base)
    exact = qdelta.compress(base, ft, targets="model.layers.0.mlp.down_proj")
    assert list(exact.layers) == ["model.layers.0.mlp.down_proj"]
    suffix = qdelta.compress(base, ft, targets=["q_proj", "v_proj"])
    assert sorted(suffix.layers) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    regex = qdelta.compress(base, ft, targets=r".*\.1\.mlp\..*", exclude="gate_proj")
    assert sorted(regex.layers) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    head = qdelta.compress(base, ft, targets="lm_head")
    assert list(head.layers) == ["lm_head"] and "lm_head.weight" not in head.params
    # What was not compressed travels whole, so the applied model is still the merged one.
    ids, mask = _ids()
    with torch.no_grad():
        want = output(qdelta.merge(copy.deepcopy(base), regex), ids, mask)
        torch.testing.assert_close(output(qdelta.apply(base, regex), ids, mask), want)


def test_compress_embeddings_with_bit_planes():
    base = tiny_llama()
    ft = fake_finetune(base)
    delta = qdelta.compress(base, ft, bits=3, compress_embeddings=True)
    assert {"model.embed_tokens", "lm_head"} <= set(delta.layers)
    assert "model.embed_tokens.weight" not in delta.params
    ids, mask = _ids()
    with torch.no_grad():
        want = output(qdelta.merge(copy.deepcopy(base), delta), ids, mask)
        qdelta.apply(base, delta)
        assert isinstance(base.model.embed_tokens, qdelta.BitDeltaEmbedding)
        torch.testing.assert_close(output(base, ids, mask), want, atol=2e-5, rtol=1e-4)


def test_state_dicts_and_hf_directories(tmp_path):
    base = tiny_llama()
    ft = fake_finetune(base)
    from_modules = qdelta.compress(base, ft, bits=2)
    from_dicts = qdelta.compress(base.state_dict(), ft.state_dict(), bits=2)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    assert (tmp_path / "ft" / "model.safetensors").is_file()
    from_dirs = qdelta.compress(str(tmp_path / "base"), tmp_path / "ft", bits=2)
    for other in (from_dicts, from_dirs):
        assert list(other.layers) == list(from_modules.layers)
        for name, layer in from_modules.layers.items():
            np.testing.assert_array_equal(other.layers[name].planes, layer.planes)
            np.testing.assert_array_equal(other.layers[name].scales, layer.scales)
    assert from_dirs.metadata["architecture"] == "LlamaForCausalLM"


def test_unapply_restores_the_base_exactly():
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    objects = {n: m for n, m in base.named_modules()}
    delta = qdelta.compress(base, fake_finetune(base), bits=2)
    qdelta.apply(base, delta)
    with pytest.raises(qdelta.ModelMismatchError, match="already applied"):
        qdelta.apply(base, delta)
    qdelta.unapply(base)
    after = base.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(objects[n] is m for n, m in base.named_modules())


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_saved_and_loaded_delta_gives_the_same_outputs(arch, tmp_path):
    base = BUILDERS[arch]()
    ft = fake_finetune(base)
    delta = qdelta.compress(base, ft, bits=2, scale="row", tenant="t")
    assert delta.base_fingerprint == qdelta.fingerprint(base)
    # Trained scales must survive the file too: perturb them like distillation would.
    for layer in delta.layers.values():
        layer.scales = (layer.scales * np.float32(1.1)).astype(np.float32)
    delta.save(tmp_path / "t.qdelta")
    loaded = qdelta.load(tmp_path / "t.qdelta")
    assert loaded.base_fingerprint == delta.base_fingerprint
    ids, mask = _ids()
    twin = copy.deepcopy(base)
    qdelta.apply(base, delta)
    qdelta.apply(twin, loaded)
    with torch.no_grad():
        torch.testing.assert_close(output(base, ids, mask), output(twin, ids, mask), rtol=0, atol=0)
