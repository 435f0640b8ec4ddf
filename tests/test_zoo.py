"""The tiny zoo, built end to end once per test session into a temporary cache (conftest)."""

import dataclasses
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from qdelta.corpus import is_eval_key
from qdelta.errors import ZooError
from qdelta.zoo import LINEAR_NAMES, ZooConfig, build_zoo, soup_state_dict, train_lm, zoo_report


@pytest.fixture(scope="module")
def zoo_and_cache(tiny_zoo):
    return tiny_zoo, tiny_zoo.root.parent


@pytest.fixture(scope="module")
def zoo(zoo_and_cache):
    return zoo_and_cache[0]


def weights(path):
    return load_file(path / "model.safetensors")


def test_tiny_zoo_layout(zoo):
    assert zoo.built
    assert set(zoo.tenants) == {"code", "prose", "man-lora", "code-soup"}
    assert {t.kind for t in zoo.tenants.values()} == {"full", "lora", "soup"}
    assert {zoo.tenants["code"].domain, zoo.tenants["prose"].domain} == {"code", "prose"}
    assert set(zoo.ingredients) == {"code-b"}
    for d in [zoo.base_dir, *(t.path for t in zoo.tenants.values())]:
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        assert (d / "qdelta_tokenizer.json").is_file()
    model = zoo.load("code")
    assert model.config.vocab_size == zoo.tokenizer.vocab_size == 259
    ids = torch.tensor([zoo.tokenizer.encode("import os\n", bos=True)])
    assert model(ids).logits.shape == (1, ids.shape[1], 259)
    report = zoo_report(zoo)
    assert all(name in report for name in zoo.tenants)


def test_second_call_comes_from_cache(zoo_and_cache):
    zoo, cache = zoo_and_cache
    stamp = (zoo.root / "zoo.json").stat().st_mtime_ns
    again = build_zoo(ZooConfig.tiny(), cache, progress=False)
    assert not again.built and again.root == zoo.root
    assert (zoo.root / "zoo.json").stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [zoo.root.name]  # no temp dirs left behind


def test_tenants_differ_from_base_and_each_other(zoo):
    base = weights(zoo.base_dir)
    tenants = {n: weights(t.path) for n, t in zoo.tenants.items()}
    key = "model.layers.0.mlp.down_proj.weight"
    for name, sd in tenants.items():
        assert (sd[key] - base[key]).abs().max() > 1e-4, name
    for (a, sa), (b, sb) in itertools.combinations(tenants.items(), 2):
        assert (sa[key] - sb[key]).abs().max() > 1e-5, (a, b)


def test_soup_is_the_exact_average_of_its_ingredients(zoo):
    soup = weights(zoo.tenants["code-soup"].path)
    a = weights(zoo.tenants["code"].path)
    b = weights(zoo.ingredients["code-b"])
    assert set(soup) == set(a) == set(b)
    for k in soup:
        assert torch.equal(soup[k], (a[k] + b[k]) / 2), k
    assert not torch.equal(a["model.norm.weight"], b["model.norm.weight"])


def test_soup_state_dict_rejects_mismatched_ingredients(rng):
    a = {"w": torch.tensor(rng.normal(size=(3, 5)), dtype=torch.float32)}
    with pytest.raises(ZooError, match="differ"):
        soup_state_dict([a, {"v": a["w"]}])
    with pytest.raises(ZooError, match="expected"):
        soup_state_dict([a, {"w": a["w"][:2]}])


def test_lora_tenant_delta_has_the_lora_rank(zoo):
    rank = next(t.rank for t in zoo.config.tenants if t.kind == "lora")
    base = weights(zoo.base_dir)
    lora = weights(zoo.tenants["man-lora"].path)
    checked = 0
    for k in base:
        delta = lora[k].double() - base[k].double()
        if any(f".{n}." in k for n in LINEAR_NAMES):
            s = torch.linalg.svdvals(delta)
            assert s[rank - 1] > 1e-3 * s[0], (k, s[: rank + 1])
            assert s[rank] < 1e-4 * s[0], (k, s[: rank + 1])  # fp32 rounding only
            checked += 1
        else:  # embeddings, norms, head: untouched by LoRA
            assert torch.equal(lora[k], base[k]), k
    assert checked == len(LINEAR_NAMES) * zoo.config.num_layers


def test_held_out_text_is_disjoint_from_training(zoo):
    corpora = zoo.manifest["corpora"]
    assert {"code", "prose"} <= set(corpora)
    keys = {"train": set(), "eval": set()}
    for domain, c in corpora.items():
        assert not set(c["train_docs_list"]) & set(c["eval_docs_list"])
        assert c["eval_bytes"] > 0 and c["train_bytes"] > c["eval_bytes"]
        for side in keys:
            # A stdlib file's code and docstrings share one key: it sits on one side only.
            keys[side] |= {d.replace("docstrings:", "stdlib:") for d in c[f"{side}_docs_list"]}
        assert zoo.eval_texts[domain][:200] not in zoo.train_texts[domain]
    assert not keys["train"] & keys["eval"]
    assert all(is_eval_key(k, 0.1) for k in keys["eval"])


def test_full_fine_tunes_improve_on_their_own_domain(zoo):
    q = zoo.manifest["quality"]
    for name, t in zoo.tenants.items():
        if t.kind == "full":
            assert q[name][t.domain]["ppl"] < q["base"][t.domain]["ppl"], name


def test_cache_key_tracks_config_and_roundtrips(zoo):
    tiny = ZooConfig.tiny()
    assert tiny.cache_key() == ZooConfig.tiny().cache_key()
    assert tiny.cache_key() != ZooConfig.tiny(seed=1).cache_key()
    assert tiny.cache_key() != dataclasses.replace(tiny, pretrain_steps=31).cache_key()
    assert ZooConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny
    assert zoo.config == tiny


def test_training_is_reproducible_from_a_seed(zoo):
    def run():
        model = zoo.load("base")
        stream = torch.tensor(zoo.tokenizer.encode(zoo.train_texts["code"][:4000], bos=True))
        train_lm(
            model, [stream], steps=2, lr=1e-3, batch_size=2, seq_len=16, seed=7, progress=False
        )
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_incomplete_cache_entry_is_an_error_not_a_rebuild(tmp_path):
    broken = tmp_path / f"zoo-{ZooConfig.tiny().cache_key()}"
    (broken / "base").mkdir(parents=True)
    with pytest.raises(ZooError, match=r"zoo\.json"):
        build_zoo(ZooConfig.tiny(), tmp_path, progress=False)
    assert (broken / "base").is_dir()


def test_eval_window_beyond_training_context_is_refused(tmp_path):
    config = dataclasses.replace(ZooConfig.tiny(), eval_window=ZooConfig.tiny().seq_len + 1)
    with pytest.raises(ZooError, match="training context"):
        build_zoo(config, tmp_path, progress=False)
