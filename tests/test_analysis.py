"""Per-layer analysis against a hand computation (numpy float64), and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tests.tiny_models import fake_finetune, tiny_llama

import qdelta
from qdelta import analysis
from qdelta.analysis import layer_stats
from qdelta.cli import main


def _hand(w0: np.ndarray, d: np.ndarray, ref: np.ndarray) -> dict:
    w1 = w0 + d
    # Greedy residual binarisation by hand: alpha_k = mean |r|, r -= alpha_k * sign(r).
    r, rec, errs = d.copy(), np.zeros_like(d), []
    for _ in range(3):
        s = np.where(np.signbit(r), -1.0, 1.0)
        alpha = np.abs(r).mean()
        rec = rec + alpha * s
        r = d - rec
        errs.append(np.linalg.norm(d - rec) / np.linalg.norm(d))
    m0, m1 = np.linalg.norm(w0, axis=1), np.linalg.norm(w1, axis=1)
    cos = (w0 * w1).sum(1) / (m0 * m1)
    return {
        "rel_norm": np.linalg.norm(d) / np.linalg.norm(w0),
        "recon_err": errs,
        "delta_m": np.abs(m1 - m0).mean(),
        "delta_d": (1 - cos).mean(),
        "sign_agreement": (np.sign(d) == np.sign(ref)).mean(),
        "base_sign_agreement": (np.sign(d) == np.sign(w0)).mean(),
    }


@pytest.mark.parametrize("shape", [(5, 7), (3, 33)])
def test_layer_stats_match_hand_computation(rng, shape):
    w0 = rng.standard_normal(shape).astype(np.float32)
    d = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    ref = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    got = layer_stats(torch.from_numpy(w0), torch.from_numpy(d), 3, torch.from_numpy(ref))
    want = _hand(w0.astype(np.float64), d.astype(np.float64), ref.astype(np.float64))
    assert got["shape"] == list(shape)
    for key in ("rel_norm", "delta_m", "delta_d", "sign_agreement", "base_sign_agreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
    np.testing.assert_allclose(got["recon_err"], want["recon_err"], rtol=1e-4)
    assert got["recon_err"][0] > got["recon_err"][1] > got["recon_err"][2]
    assert "recon_sign_agreement" not in got  # 1 by construction: not reported


def test_bad_plane_count_is_refused():
    with pytest.raises(qdelta.ShapeError, match="max_planes"):
        layer_stats(torch.randn(3, 4), torch.randn(3, 4), 0)


def test_a_zero_base_layer_has_no_relative_norm(tmp_path, capsys):
    """A zero-initialised projection: rel_norm is None ("n/a" in the table), not a
    ZeroDivisionError; an empty list of fine-tunes is an AlgebraError."""
    stats = layer_stats(torch.zeros(3, 4), torch.randn(3, 4), 2)
    assert stats["rel_norm"] is None and stats["recon_err"][0] > 0
    base = tiny_llama(0)
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj.weight.zero_()
    base.save_pretrained(tmp_path / "base")
    fake_finetune(base, seed=1).save_pretrained(tmp_path / "ft")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "ft")]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if "layers.0.mlp.down_proj" in ln)
    assert row.split()[1] == "n/a"
    with pytest.raises(qdelta.AlgebraError, match="at least one fine-tune, found none"):
        analysis.analyze(base, [])


def test_pure_rescaling_is_magnitude_only():
    # W1 = diag(1 + s) W0 changes each row's length but not its direction.
    w0 = torch.randn(6, 9, dtype=torch.float64)
    s = torch.rand(6, 1, dtype=torch.float64) * 0.5 + 0.1
    stats = layer_stats(w0.float(), (s * w0).float())
    assert stats["delta_d"] == pytest.approx(0.0, abs=1e-6)
    want = float((s[:, 0] * torch.linalg.norm(w0, dim=1)).mean())
    assert stats["delta_m"] == pytest.approx(want, rel=1e-5)
    # Growing every weight: the delta has the base's sign everywhere; shrinking: nowhere.
    assert stats["base_sign_agreement"] == 1.0
    assert layer_stats(w0.float(), (-0.5 * s * w0).float())["base_sign_agreement"] == 0.0


def test_analyze_cli_table_json_plot(tmp_path, capsys):
    base = tiny_llama(seed=int(torch.randint(1000, (1,))))
    base.save_pretrained(tmp_path / "base")
    for i, rel in enumerate((0.02, 0.08)):
        fake_finetune(base, seed=i + 1, rel=rel).save_pretrained(tmp_path / f"ft{i}")
    packed = qdelta.compress(base, fake_finetune(base, seed=1, rel=0.02), bits=2)
    packed.save(tmp_path / "ft0.qdelta")
    out_json, out_png = tmp_path / "a.json", tmp_path / "a.png"
    args = ["analyze", str(tmp_path / "base"), str(tmp_path / "ft0"), str(tmp_path / "ft1")]
    assert (
        main([*args, str(tmp_path / "ft0.qdelta"), "--json", str(out_json), "--plot", str(out_png)])
        == 0
    )
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "dD" in table
    result = json.loads(out_json.read_text())
    rows = result["layers"]
    assert len(result["finetuned"]) == 3 and len(rows) == 3 * 14
    by = {(r["finetuned"].split("/")[-1], r["layer"]): r for r in rows}
    name = "model.layers.0.self_attn.q_proj"
    # The larger fine-tune moves further, in norm and in the DoRA view.
    assert by[("ft1", name)]["rel_norm"] > 2 * by[("ft0", name)]["rel_norm"]
    assert by[("ft1", name)]["delta_d"] > by[("ft0", name)]["delta_d"]
    # The .qdelta reconstruction of ft0 (2 planes) agrees in sign with ft0 mostly.
    assert by[("ft0.qdelta", name)]["sign_agreement"] > 0.6
    assert by[("ft1", name)]["sign_agreement"] == pytest.approx(0.5, abs=0.15)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tiny_llama(seed=5000)
    other.save_pretrained(tmp_path / "other")
    assert main(["analyze", str(tmp_path / "other"), str(tmp_path / "ft0.qdelta")]) == 1
    err = capsys.readouterr().err
    assert "qdelta analyze: error: " in err and "but the given base has fingerprint" in err


def _checkpoints(base, steps_at=(2, 5, 10), seed=0):
    """A real fine-tune: AdamW on a narrow band of tokens, a copy at each of ``steps_at``."""
    model = copy.deepcopy(base).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for step in range(1, max(steps_at) + 1):
        ids = torch.randint(10, 25, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in steps_at:
            out.append(copy.deepcopy(model).eval())
    return out


def test_analyze_steps_trajectories_over_checkpoints(tmp_path, capsys):
    base = tiny_llama(seed=int(torch.randint(1000, (1,))))
    base.save_pretrained(tmp_path / "base")
    names = []
    for i, ckpt in enumerate(_checkpoints(base), start=1):
        ckpt.save_pretrained(tmp_path / f"ckpt{i}")
        names.append(str(tmp_path / f"ckpt{i}"))
    order = names  # the order of the arguments is the step order
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["--json", str(out_json), "--plot", str(out_png), "--steps"]
    assert main(["analyze", str(tmp_path / "base"), *order, *argv]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("step ") and "sign vs W0" in table
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out_json.read_text())
    assert result["steps"] is True and result["finetuned"] == order
    assert [r["step"] for r in result["layers"]] == [s for s in (1, 2, 3) for _ in range(14)]
    traj = result["trajectories"]
    assert len(traj) == 14
    grew = 0
    for name, points in traj.items():
        assert [p["step"] for p in points] == [1, 2, 3]
        assert [p["finetuned"] for p in points] == order
        row = next(r for r in result["layers"] if r["layer"] == name and r["step"] == 3)
        assert points[2]["rel_norm"] == row["rel_norm"] and points[2]["delta_d"] == row["delta_d"]
        grew += points[0]["rel_norm"] < points[1]["rel_norm"] < points[2]["rel_norm"]
    # Training moves the weights further with every step, for (nearly) every layer.
    assert grew >= 12, grew
    # The plot: a panel per layer type, a line per layer through the 3 checkpoints.
    import matplotlib.pyplot as plt

    fig = analysis._plot_trajectories(plt, result)
    panels = [ax for ax in fig.axes if ax.lines]
    assert sorted(ax.get_title() for ax in panels) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    for ax in panels:
        assert len(ax.lines) == 2  # 2 decoder layers
        assert all(len(line.get_xdata()) == 3 for line in ax.lines)
        assert sorted(t.get_text() for t in ax.texts) == ["1", "1", "2", "2", "3", "3"]
    plt.close(fig)
    # Without --steps the same inputs are independent tenants (no trajectories).
    assert analysis.main([str(tmp_path / "base"), *order, "--json", str(out_json)]) == 0
    assert "trajectories" not in json.loads(out_json.read_text())
    capsys.readouterr()
    assert analysis.main([str(tmp_path / "base"), names[0], "--steps"]) == 1
    assert "expected at least 2 checkpoints" in capsys.readouterr().err


def test_analyze_refuses_labels_and_plane_counts_it_cannot_use():
    base = tiny_llama(0)
    fts = [fake_finetune(base, seed=1), fake_finetune(base, seed=2)]
    with pytest.raises(
        qdelta.AlgebraError, match=r"labels: expected one per fine-tune \(2\), found 1"
    ):
        analysis.analyze(base, fts, labels=["only"])
    with pytest.raises(qdelta.ShapeError, match="max_planes: expected an int, found str"):
        analysis.analyze(base, fts, max_planes="2")
