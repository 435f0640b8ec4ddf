"""`qdelta generate BASE_DIR STORE_DIR --tenant ... --prompt ...`: one batch, every row
served by its own tenant, checked against greedy decoding of the merged dense models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.tiny_models import fake_finetune, one_thread, tiny_llama

import qdelta
from qdelta.cli import main
from qdelta.tokenizer import ByteTokenizer

NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A base dir with the byte tokenizer and a store of two compressed tenants."""
    root = tmp_path_factory.mktemp("generate")
    base = tiny_llama(vocab_size=ByteTokenizer.vocab_size + 3)
    base.save_pretrained(root / "base")
    ByteTokenizer().save(root / "base")
    store = qdelta.DeltaStore(root / "store")
    for name, seed in (("alice", 1), ("bob", 2)):
        store.add(name, qdelta.compress(base, fake_finetune(base, seed=seed, rel=0.3), bits=2))
    return root, base, store


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding without a cache, every step a full forward; after ``eos`` the
    row keeps emitting it (what generate does)."""
    seq, out, done = list(prompt), [], False
    for _ in range(n):
        token = eos if done else int(model(torch.tensor([seq])).logits[0, -1].argmax())
        done = done or token == eos
        out.append(token)
        seq.append(token)
    return out


def test_each_row_is_its_tenants_merged_model(served, capsys):
    root, base, store = served
    tenants = ["alice", "-", "bob", "alice"]
    prompts = ["hello", "a longer prompt", "x", "def f():"]
    argv = ["generate", str(root / "base"), str(root / "store")]
    argv += [a for t in tenants for a in ("--tenant", t)]
    argv += [a for p in prompts for a in ("--prompt", p)]
    assert main([*argv, "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    tok = ByteTokenizer()
    assert [r["tenant"] for r in rows] == tenants and [r["prompt"] for r in rows] == prompts
    for row, tenant, prompt in zip(rows, tenants, prompts, strict=True):
        model = copy.deepcopy(base).eval()
        if tenant != "-":
            qdelta.merge(model, store.open(tenant).to_delta())
        want = greedy(model, tok(prompt)["input_ids"], NEW_TOKENS, tok.eos_id)
        assert row["tokens"] == want, tenant
        assert row["completion"] == tok.decode(want)
    # Tenants differ from each other and from the base on the same prompt.
    assert main([*argv[:3], "--tenant", "alice", "--tenant", "bob", "--tenant", "-",
                 "--prompt", "same", "--max-new-tokens", "8", "--json"]) == 0  # fmt: skip
    same = [r["tokens"] for r in json.loads(capsys.readouterr().out)]
    assert len({tuple(t) for t in same}) > 1


def test_text_output_names_each_row(served, capsys):
    root, _, _ = served
    argv = ["generate", str(root / "base"), str(root / "store"), "--tenant", "bob"]
    assert main([*argv, "--tenant", "-", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[bob] hi") and any(ln.startswith("[-] hi") for ln in lines)


def _error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("qdelta generate: error: ")]
    assert len(line) == 1, err
    return line[0]


def test_bad_requests_are_one_line_errors(served, tmp_path, capsys):
    root, base, _ = served
    head = ["generate", str(root / "base"), str(root / "store")]
    line = _error([*head, "--tenant", "carol", "--prompt", "x"], capsys)
    assert "carol" in line
    line = _error([*head, "--tenant", "alice", "--tenant", "bob", "--prompt", "a",
                   "--prompt", "b", "--prompt", "c"], capsys)  # fmt: skip
    assert "one per --tenant (2), found 3" in line
    missing = tmp_path / "no-store"
    line = _error(["generate", str(root / "base"), str(missing), "--tenant", "-",
                   "--prompt", "x"], capsys)  # fmt: skip
    assert str(missing) in line and not missing.exists()
    bare = tmp_path / "bare"
    base.save_pretrained(bare)  # no tokenizer file
    line = _error(["generate", str(bare), str(root / "store"), "--tenant", "-",
                   "--prompt", "x"], capsys)  # fmt: skip
    assert "needs a tokenizer" in line and str(bare) in line


def test_decoding_past_a_learned_position_table_is_refused_up_front(tmp_path, capsys):
    """GPT-2's 64 positions: a 63rd new token after a 3-token prompt would be fed at
    position 64 (found mid-decode before, the work lost); up to 62 run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2)
    cfg.n_positions = 64
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    ByteTokenizer().save(tmp_path / "base")
    qdelta.DeltaStore(tmp_path / "store").add(
        "alice", qdelta.compress(base, fake_finetune(base, seed=1, rel=0.3))
    )
    head = ["generate", str(tmp_path / "base"), str(tmp_path / "store"), "--tenant", "alice"]
    line = _error([*head, "--prompt", "ab", "--max-new-tokens", "63"], capsys)
    assert "expected at most 62 after the longest prompt (3 tokens" in line
    assert "64 positions), found 63" in line
    assert main([*head, "--prompt", "ab", "--max-new-tokens", "62", "--json"]) == 0
    assert 1 <= len(json.loads(capsys.readouterr().out)[0]["tokens"]) <= 62  # eos may stop it


def test_a_rotary_model_decodes_past_its_declared_positions(served, capsys):
    root, _, _ = served  # a Llama declaring 128 positions: RoPE has no table to run off
    head = ["generate", str(root / "base"), str(root / "store"), "--tenant", "alice"]
    assert main([*head, "--prompt", "ab", "--max-new-tokens", "140", "--json"]) == 0


@pytest.mark.parametrize(
    "extra",
    [["--temperature", "5"], ["--top-k", "3"], ["--seed", "4"], ["--top-k", "2", "--seed", "1"]],
)
def test_sampling_flags_without_sample_are_a_usage_error(served, capsys, extra):
    root, _, _ = served
    argv = ["generate", str(root / "base"), str(root / "store"), "--tenant", "-", "--prompt", "x"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdelta generate: ") and "expected --sample" in err
    assert all(flag in err for flag in extra if flag.startswith("--"))
