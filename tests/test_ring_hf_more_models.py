"""Ring attention on Hugging Face models beyond the Llama family: GPT-2 (learned
absolute positions, Conv1D), GPT-NeoX (partial rotary) and OPT (learned positions
with an offset) over 3 gloo ranks equal their own eager forward, in both layouts,
and packed sequences equal each sequence alone. A model whose attention does not
go through transformers' attention interface is refused, since it would
attend within each rank's shard only.
"""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qdelta.ring import RingError  # noqa: E402
from qdelta.ring.launch import spawn_ring  # noqa: E402
from test_ring_hf_windows import _load, assert_ring_equals_own_forward, rank_logits  # noqa: E402

VOCAB, SEQ = 89, 31
LENGTHS = ((11, 14, 6), (6, 14, 11))  # packed rows (see test_ring_hf_windows)


def _configs() -> dict:
    return {
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64
        ),
        "neox": transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            max_position_embeddings=64,
        ),
        "opt": transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            pad_token_id=1,
        ),
    }


def _save_models(root, seed: int) -> dict[str, str]:
    dirs = {}
    for i, (name, cfg) in enumerate(_configs().items()):
        torch.manual_seed(seed + i)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape))  # away from the init: positions matter
        model.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.mark.timeout(400)
def test_gpt2_neox_opt_over_a_ring_equal_their_own_forward(tmp_path, rng):
    dirs = _save_models(tmp_path, int(rng.integers(2**31)))
    if int(transformers.__version__.split(".")[0]) < 5:
        # 4.x's GPT2LMHeadModel drops its **kwargs before the transformer: the
        # packed call's segment ids never reach attention, which ring_forward refuses.
        del dirs["gpt2"]
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    per_rank = spawn_ring(
        rank_logits, 3, (dirs, ids, LENGTHS), timeout=360, pg_timeout=60, threads=1
    )
    for name, path in dirs.items():
        want = assert_ring_equals_own_forward(_load(path, "eager"), name, per_rank, ids, LENGTHS)
        assert want.abs().max() > 0.1, name


def _own_way_attention() -> type:
    """An attention class whose forward computes attention itself, as Falcon's did
    up to transformers 5.24 (5.25 moved it onto the interface): the refusal is
    tested on a class that stays outside the interface on every version."""
    from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

    class OwnWayAttention(LlamaAttention):
        def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
            b, s, _ = hidden_states.shape
            shape = (b, s, -1, self.head_dim)
            q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None

    return OwnWayAttention


def test_attention_outside_the_interface_is_refused():
    from qdelta.ring.hf import use_ring_attention

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for layer in model.model.layers:
            layer.self_attn.__class__ = _own_way_attention()
        # The same model still: its own attention, not a broken module.
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(RingError, match=r"\['OwnWayAttention'\] compute attention their own way"):
        use_ring_attention(model)
    assert model.config._attn_implementation != "qdelta_ring"  # refused before any change


def test_a_module_that_skips_the_ring_at_run_time_is_refused(one_rank, monkeypatch):
    """The static check reads source; the run-time one counts the ring's calls."""
    from qdelta.ring import hf

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    model = hf.use_ring_attention(transformers.GPT2LMHeadModel(cfg).eval())
    block = model.transformer.h[1].attn
    plain = block.forward

    def shard_local(*args, **kwargs):  # as a class with its own attention code would
        token = hf._CALLED.set(None)
        try:
            return plain(*args, **kwargs)
        finally:
            hf._CALLED.reset(token)

    monkeypatch.setattr(block, "forward", shard_local)
    with pytest.raises(RingError, match=r"\['GPT2Attention'\] computed attention without"):
        with torch.no_grad():
            hf.ring_forward(model, torch.randint(0, VOCAB, (1, 12)))


def _tiny_falcon(alibi: bool):
    from test_hf_architectures import build

    return build("falcon", alibi=alibi)


def test_alibi_is_refused_before_any_change():
    """Falcon adds ALiBi to the causal mask, which the ring does not build: it crashed
    inside transformers on every rank; now use_ring_attention refuses it up front."""
    from qdelta.ring import hf

    model = _tiny_falcon(alibi=True)
    if not all(hf._calls_the_interface(type(m)) for m in hf._attention_modules(model)):
        pytest.skip("this transformers' Falcon computes attention its own way (refused as such)")
    before = model.config._attn_implementation
    with pytest.raises(RingError, match=r"FalconForCausalLM: ALiBi .* attention mask"):
        hf.use_ring_attention(model)
    assert model.config._attn_implementation == before != "qdelta_ring"
    assert not any(hasattr(m, "_qdelta_ring") for m in model.modules())
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 7)))  # still runs
    # Falcon without ALiBi (rotary) is accepted, as are other configs naming ALiBi.
    rotary = hf.use_ring_attention(_tiny_falcon(alibi=False))
    assert rotary.config._attn_implementation == "qdelta_ring"
    other = types.SimpleNamespace(position_embedding_type="alibi")
    assert "ALiBi" in hf._unsupported_attention(other)
