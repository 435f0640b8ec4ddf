"""Every ```python block of the README and docs/ runs, and does what its comments say.

Each block is executed as written, with the names it leaves to the reader
(``base``, ``delta``, ``x``, ...) bound to real objects: the tiny model zoo's
models, tokenizer and text, random tensors of odd shapes, or a real 2-rank gloo
ring. After it runs, its results are checked against an independent reference
(numpy bit unpacking, dense float64 math, SDPA on the full sequence, the dense
merged model). A block added to a doc without a runner here fails the test, so
the docs cannot drift from the code unnoticed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qdelta
from docs_snippets import ROOT, Snippet, all_snippets
from qdelta.ring.launch import spawn_ring
from ring_reference import reference_attention

# ---------------------------------------------------------------- references


def dense_from_planes(planes: np.ndarray, scales: np.ndarray, shape) -> np.ndarray:
    """sum_p scale_p * sign_p in float64, unpacked with numpy alone (docs/FORMAT.md:
    bit j of word w is column 32w + j, set when the weight's sign bit is set)."""
    out, inp = shape
    planes = np.ascontiguousarray(planes, dtype="<u4")
    bits = np.unpackbits(planes.view(np.uint8), axis=-1, bitorder="little")[..., :inp]
    signs = 1.0 - 2.0 * bits.astype(np.float64)  # [P, out, in]
    scales = np.asarray(scales, dtype=np.float64)
    scales = scales[:, None, None] if scales.ndim == 1 else scales[:, :, None]
    return (scales * signs).sum(0).reshape(out, inp)


def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens of a plain forward loop (no cache, no padding): the reference."""
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0, prompt.numel() :]


def _paragraphs(text: str, n: int = 32) -> list[str]:
    """Calibration texts: the first ``n`` blank-line-separated pieces of ``text``."""
    return [p for p in text.split("\n\n") if p.strip()][:n]


def run(snippet: Snippet, namespace: dict) -> dict:
    exec(snippet.compiled(), namespace)
    return namespace


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo


@pytest.fixture(scope="module")
def code_delta(zoo):
    return qdelta.compress(zoo.base_dir, zoo.tenants["code"].path)


# ---------------------------------------------------------------- runners


def readme_bit_planes(snippet, request):
    rng = request.getfixturevalue("rng")
    w_base = rng.standard_normal((37, 70)).astype(np.float32)
    w_finetuned = w_base + 0.01 * rng.standard_normal((37, 70)).astype(np.float32)
    ns = run(snippet, {"w_base": w_base, "w_finetuned": w_finetuned})
    delta = w_finetuned - w_base
    assert ns["packed"].dtype == np.uint32 and ns["packed"].shape == (37, 3)
    expected_signs = np.where(np.signbit(delta), -1, 1)
    np.testing.assert_array_equal(ns["signs"], expected_signs)
    np.testing.assert_allclose(
        ns["dense"].astype(np.float64), ns["alpha"] * expected_signs, rtol=1e-3
    )
    planes, scales = ns["planes"], ns["scales"]
    assert planes.shape == (3, 37, 3) and scales.shape == (3, 37)
    np.testing.assert_allclose(
        ns["approx2"], dense_from_planes(planes[:2], scales[:2], delta.shape), rtol=1e-5, atol=1e-7
    )
    # Residual planes approximate better with each plane.
    errs = [
        np.abs(delta - dense_from_planes(planes[:k], scales[:k], delta.shape)).mean()
        for k in (1, 2, 3)
    ]
    assert errs[0] > errs[1] > errs[2]


def readme_compression(snippet, request):
    zoo = request.getfixturevalue("zoo")
    base, finetuned, model = zoo.load("base"), zoo.load("code"), zoo.load("base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ns = run(
        snippet,
        {
            "base": base,
            "finetuned": finetuned,
            "model": model,
            "texts": _paragraphs(zoo.train_texts["code"]),
            "tok": zoo.tokenizer,
        },
    )
    result, delta = ns["result"], ns["delta"]
    assert result.loss_after < result.loss_before
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # unapply restored the base
    name = "model.layers.0.mlp.up_proj"
    layer = delta.layers[name]
    merged = model.get_submodule(name).weight.detach().double()
    expected = before[name + ".weight"].double() + torch.from_numpy(
        dense_from_planes(layer.planes, layer.scales, layer.shape)
    )
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def readme_store(snippet, request):
    zoo, delta = request.getfixturevalue("zoo"), request.getfixturevalue("code_delta")
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    # It continues the block before it, which imported qdelta.
    ns = run(snippet, {"qdelta": qdelta, "delta": delta, "base_model": zoo.load("base")})
    loaded, f = ns["delta"], ns["f"]
    name = "model.layers.0.mlp.up_proj"
    assert loaded.layers.keys() == delta.layers.keys()
    np.testing.assert_array_equal(f.layers[name].planes, delta.layers[name].planes)
    np.testing.assert_array_equal(loaded.layers[name].scales, delta.layers[name].scales)
    assert not f.layers[name].planes.flags.writeable
    other = zoo.load("code")  # a fine-tune is not the base the delta was made against
    with pytest.raises(qdelta.BaseMismatchError):
        qdelta.check_base(delta, other)


def readme_serving(snippet, request):
    zoo, delta = request.getfixturevalue("zoo"), request.getfixturevalue("code_delta")
    tmp = request.getfixturevalue("tmp_path")
    request.getfixturevalue("monkeypatch").chdir(tmp)
    qdelta.DeltaStore("tenants/").add(
        "legal", qdelta.compress(zoo.base_dir, zoo.tenants["prose"].path)
    )
    tok = zoo.tokenizer
    prompts = [
        torch.tensor(tok.encode(zoo.eval_texts[d][:n]))
        for d, n in (("code", 23), ("prose", 17), ("man", 30))
    ]
    width = max(p.numel() for p in prompts)
    input_ids = torch.full((3, width), tok.pad_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - p.numel() :], mask[i, width - p.numel() :] = p, 1
    ns = run(
        snippet, {"base_dir": zoo.base_dir, "delta": delta, "input_ids": input_ids, "mask": mask}
    )
    out = ns["out"]
    assert out.tokens.shape == (3, 64)
    torch.testing.assert_close(out.sequences[:, width:], out.tokens, rtol=0, atol=0)
    support = zoo.load("base")
    qdelta.merge(support, delta)
    legal = zoo.load("base")
    qdelta.merge(legal, qdelta.load("tenants/legal.qdelta"))
    for row, dense in enumerate((support, legal, zoo.load("base"))):
        torch.testing.assert_close(out.tokens[row], greedy(dense, prompts[row], 64))


def cpu_kernel_multitenant(snippet, request):
    gen = request.getfixturevalue("gen")
    n, k = 45, 83
    base_linear = torch.nn.Linear(k, n)
    deltas = [0.02 * torch.randn(n, k, generator=gen) for _ in range(2)]
    packed = [
        qdelta.PackedLayer(*qdelta.pack_residual(d.numpy(), bits=b), shape=(n, k))
        for d, b in zip(deltas, (1, 2), strict=True)
    ]
    x = torch.randn(3, 5, k, generator=gen)
    ns = run(
        snippet,
        {
            "base_linear": base_linear,
            "packed_layer": packed[0],
            "other_packed_layer": packed[1],
            "x": x,
        },
    )
    with torch.no_grad():
        base_out = base_linear(x).double()
    dense = [torch.from_numpy(dense_from_planes(p.planes, p.scales, p.shape)) for p in packed]
    expected = base_out + torch.stack(
        [x[0].double() @ dense[0].T, torch.zeros(5, n), x[2].double() @ dense[1].T]
    )
    assert ns["a"] == 0
    torch.testing.assert_close(ns["y"].double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(qdelta.UnknownTenantError):
        ns["layer"](x, torch.tensor([0, -1, 7]))  # "tenant-a" was removed


def _ring_shards(rank, world, code, q, k, v):
    snippet = Snippet("docs/RING.md", 0, 0, code)
    ns = run(snippet, {"world": world, "rank": rank, "q": q, "k": k, "v": v, "S": q.shape[2]})
    return ns["out_l"], ns["lse_l"], ns["pos_l"]


def ring_api(snippet, request):
    gen = request.getfixturevalue("gen")
    q = torch.randn(2, 4, 29, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 29, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    shards = spawn_ring(_ring_shards, 2, (snippet.code, q, k, v), timeout=180)
    out_ref, lse_ref = reference_attention(q, k, v, causal=True)
    out = qdelta.ring.unshard([s[0] for s in shards], layout="zigzag")
    lse = qdelta.ring.unshard([s[1] for s in shards], layout="zigzag", dim=-1)
    pos = qdelta.ring.unshard([s[2] for s in shards], layout="zigzag", dim=-1)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(pos, torch.arange(29))


def _ring_hf_logits(rank, world, code, input_ids):
    from qdelta.ring.demo import tiny_llama

    ns = run(Snippet("docs/RING.md", 1, 0, code), {"model": tiny_llama(7), "input_ids": input_ids})
    return ns["logits_l"]


def ring_hf(snippet, request):
    from qdelta.ring.demo import tiny_llama

    gen = request.getfixturevalue("gen")
    input_ids = torch.randint(0, 512, (1, 41), generator=gen)
    shards = spawn_ring(_ring_hf_logits, 2, (snippet.code, input_ids), timeout=180)
    with torch.no_grad():
        expected = tiny_llama(7)(input_ids).logits
    got = qdelta.ring.unshard(list(shards), layout="zigzag")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def ring_torchrun_gpu(snippet, request):
    # NCCL and one GPU per rank: compiled here, run by hand under torchrun on GPUs.
    snippet.compiled()
    from qdelta.ring import ring_attention, shard  # the names it imports exist

    assert callable(ring_attention) and callable(shard)
    pytest.skip("docs/RING.md torchrun example needs NCCL and GPUs (compiled only)")


def zoo_api(snippet, request):
    zoo = request.getfixturevalue("zoo")
    mp = request.getfixturevalue("monkeypatch")
    mp.setenv("QDELTA_CACHE", str(zoo.root.parent.parent))  # the cached tiny zoo
    # The block names the default zoo; CI runs it on the tiny one (same API).
    code = snippet.code.replace("ZooConfig.default()", "ZooConfig.tiny()")
    assert code != snippet.code
    ns = run(Snippet(snippet.doc, snippet.index, snippet.line, code), {})
    assert not ns["zoo"].built  # came from the cache
    assert ns["zoo"].tenants["code"].domain == "code"
    ppl = {m: r["text"]["ppl"] for m, r in ns["res"].items()}
    assert ppl["finetune"] < ppl["base"]  # the code fine-tune is better on code


def cuda_emulator(snippet, request):
    pytest.importorskip("qdelta.kernels.emulator")
    gen = request.getfixturevalue("gen")
    n, k, tenants = 70, 100, 3
    deltas = 0.02 * torch.randn(tenants, n, k, generator=gen)
    packed = [qdelta.pack_residual(d.numpy(), bits=2) for d in deltas]
    planes = torch.from_numpy(np.stack([p for p, _ in packed]).view(np.int32))
    scales = torch.from_numpy(np.stack([s for _, s in packed])).float()
    ids = torch.tensor([2, 0, 2, 1])
    x = torch.randn(4, k, generator=gen).half()
    ns = run(snippet, {"x_cpu": x, "planes_cpu": planes, "scales_cpu": scales, "ids_cpu": ids})
    dense = [torch.from_numpy(dense_from_planes(p, s, (n, k))) for p, s in packed]
    expected = torch.stack([x[r].double() @ dense[t].T for r, t in enumerate(ids.tolist())])
    torch.testing.assert_close(ns["y"].double(), expected, rtol=2e-2, atol=2e-3)


# (doc, text the block contains, runner): each block must match exactly one.
RUNNERS = [
    ("README.md", "qdelta.pack_signs(delta)", readme_bit_planes),
    ("README.md", "qdelta.distill(base, finetuned", readme_compression),
    ("README.md", 'qdelta.DeltaStore("deltas/")', readme_store),
    ("README.md", "qdelta.MultiTenantModel(", readme_serving),
    ("docs/CPU_KERNEL.md", "qdelta.MultiTenantLinear(base_linear)", cpu_kernel_multitenant),
    ("docs/RING.md", "position_ids(S, world, rank", ring_api),
    ("docs/RING.md", "use_ring_attention(model", ring_hf),
    ("docs/RING.md", 'init_process_group("nccl")', ring_torchrun_gpu),
    ("docs/ZOO.md", "build_zoo(ZooConfig.default())", zoo_api),
    ("docs/CUDA.md", "with emulate(", cuda_emulator),
]
if not (ROOT / "README.md").is_file():  # a partial copy of the tree (no docs)
    pytest.skip("README.md and docs/ are not in this tree", allow_module_level=True)
SNIPPETS = all_snippets()


def runner_of(snippet: Snippet):
    found = [r for doc, text, r in RUNNERS if doc == snippet.doc and text in snippet.code]
    assert len(found) == 1, (
        f"{snippet.doc} line {snippet.line}: expected exactly one runner in "
        f"tests/test_docs_snippets.py RUNNERS for this python block, found {len(found)}"
    )
    return found[0]


def test_every_block_has_one_runner_and_every_runner_a_block():
    used = [runner_of(s) for s in SNIPPETS]
    assert sorted(r.__name__ for r in used) == sorted(r.__name__ for _, _, r in RUNNERS)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: f"{s.doc}:{s.line}")
def test_doc_block_runs(snippet: Snippet, request: pytest.FixtureRequest):
    with torch.random.fork_rng():
        runner_of(snippet)(snippet, request)
