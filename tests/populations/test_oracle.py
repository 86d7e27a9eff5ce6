"""Synthesis against the twins themselves: the recipe's ceiling and teacher stimuli."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _shared import closest_natural, cowley_root, random_twin_state, requires_cowley
from synth.configtools import from_dict
from synth.data.recordings import Recording
from synth.populations import oracle, twins
from synth.synthesis.config import SynthesisConfig

CFG = {"param": {"name": "fourier", "decay_power": 2.0}, "priors": [{"name": "tv", "weight": 0.5}],
       "constraints": {"luminance": "natural", "contrast": None}, "steps": 24, "batch_size": 4}


def _recorder() -> tuple[twins.TwinRecorder, torch.Tensor]:
    ens = twins.TwinEnsemble([random_twin_state([4, 6, 3, 5, 3], 0), random_twin_state([5, 3, 4, 3, 2], 1)], ["s0", "s1"])
    g = torch.Generator().manual_seed(2)
    x = F.interpolate(torch.rand(40, 3, 14, 14, generator=g), size=(112, 112), mode="bilinear", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        raw = ens(x).double().numpy()
    y = raw * np.array([2.0, 3.0])
    y = y - y.min(axis=0) + 1.0  # positive natural responses (natural max > 0)
    rec = Recording(stimulus_id=[f"n{i}" for i in range(40)], site_id=["s0", "s1"], responses=y.T)
    return twins.TwinRecorder.calibrate(ens, x, rec, noise="none", cache=False), x


def test_stretch_on_twin_drives_its_twin_and_is_seeded():
    rec, x = _recorder()
    cfg = from_dict(SynthesisConfig, CFG)
    y = rec.expected(x)
    a = oracle.stretch_on_twin(rec, 1, [3, 4, 5], cfg, natural=x, natural_y=y)
    assert a.shape == (3, 3, 112, 112) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, oracle.stretch_on_twin(rec, 1, [3, 4, 5], cfg, natural=x, natural_y=y))
    # an image depends on its own seed, not on the others in its batch (up to float rounding
    # of another batch size), and different seeds give different images
    alone = oracle.stretch_on_twin(rec, 1, [4], cfg, natural=x, natural_y=y)
    assert float((a[1:2] - alone).abs().mean()) < 0.002 and float((a[0] - a[1]).abs().mean()) > 0.02
    # the twin's response rises far above its natural mean (in natural standard deviations)
    z = (rec.expected(a)[:, 1] - y[:, 1].mean()) / y[:, 1].std()
    assert float(z.min()) > 2.0
    assert abs(float(a.mean()) - float(x.mean())) < 0.02  # luminance constraint of the recipe
    assert oracle.stretch_on_twin(rec, 0, [], cfg, natural=x, natural_y=y).shape == (0, 3, 112, 112)
    with pytest.raises(ValueError, match="natural_y must have shape"):
        oracle.stretch_on_twin(rec, 0, [1], cfg, natural=x, natural_y=y[:5])


def test_twin_ceiling_counts_sites_above_their_natural_max():
    rec, x = _recorder()
    lines: list[str] = []
    out = oracle.twin_ceiling(rec, x, from_dict(SynthesisConfig, CFG), seeds_per_target=2, seed=1, write=lines.append)
    nat_max = rec.expected(x).max(dim=0).values.numpy()
    assert out["n_sites"] == 2 and out["site_id"] == ["s0", "s1"]
    np.testing.assert_allclose(out["natural_max"], nat_max, rtol=1e-6)
    best, nm = np.array(out["best"]), np.array(out["natural_max"])
    assert out["fraction_above_natural_max"] == float(np.mean(best > nm))
    assert out["median_gain"] == pytest.approx(float(np.median(best / nm - 1)))
    assert out["fraction_above_natural_max"] == 1.0  # 24 steps on the true model beat 40 random images
    assert len(lines) == 1 and "2 of 2 sites above their natural max" in lines[0]
    # fewer steps, lower best responses: the figure measures the recipe
    weak = oracle.twin_ceiling(rec, x, from_dict(SynthesisConfig, {**CFG, "steps": 2}), seeds_per_target=2, seed=1, write=lines.append)
    assert np.all(np.array(weak["best"]) < best)
    only = oracle.twin_ceiling(rec, x, from_dict(SynthesisConfig, CFG), seeds_per_target=2, seed=1, sites=[1], write=lines.append)
    assert only["site_id"] == ["s1"] and only["best"] == [out["best"][1]]
    with pytest.raises(ValueError, match="seeds_per_target"):
        oracle.twin_ceiling(rec, x, from_dict(SynthesisConfig, CFG), seeds_per_target=0)


def test_one_hot_on_twins_raises_the_targets_score_and_is_seeded():
    from synth.validation.control import one_hot_scores

    rec, x = _recorder()
    cfg = from_dict(SynthesisConfig, CFG)
    y = rec.expected(x)
    a = oracle.one_hot_on_twins(rec, [0, 1, 1], [3, 4, 5], cfg, natural=x, natural_y=y)
    assert a.shape == (3, 3, 112, 112)
    assert torch.equal(a, oracle.one_hot_on_twins(rec, [0, 1, 1], [3, 4, 5], cfg, natural=x, natural_y=y))
    soft_nat, soft_syn = one_hot_scores(y.double().numpy().T, rec.expected(a).double().numpy().T)
    # each image's one-hot score for its target beats the natural images' median score
    for i, t in enumerate([0, 1, 1]):
        assert soft_syn[t, i] > np.median(soft_nat[t])
    assert oracle.one_hot_on_twins(rec, [], [], cfg, natural=x, natural_y=y).shape == (0, 3, 112, 112)
    with pytest.raises(ValueError, match="2 sites but 1 seeds"):
        oracle.one_hot_on_twins(rec, [0, 1], [1], cfg, natural=x, natural_y=y)
    with pytest.raises(ValueError, match="natural_y must have shape"):
        oracle.one_hot_on_twins(rec, [0], [1], cfg, natural=x, natural_y=y[:, :1])


def test_twin_ceiling_one_hot_scores_as_validate_does():
    from synth.validation.control import one_hot_scores

    rec, x = _recorder()
    lines: list[str] = []
    out = oracle.twin_ceiling(rec, x, from_dict(SynthesisConfig, CFG), objective="one_hot", seeds_per_target=2, seed=1, write=lines.append)
    assert out["objective"] == "one_hot" and out["n_sites"] == 2 and out["site_id"] == ["s0", "s1"]
    soft_nat, _ = one_hot_scores(rec.expected(x).double().numpy().T, np.zeros((2, 0)))
    np.testing.assert_allclose(out["natural_best_score"], soft_nat.max(axis=1), rtol=1e-6)
    ratio = np.array(out["score"]) / np.array(out["natural_best_score"])
    np.testing.assert_allclose(out["ratio"], ratio)
    assert out["median_score_ratio"] == pytest.approx(float(np.median(ratio)))
    assert out["fraction_beating_best_natural"] == float(np.mean(ratio > 1))
    assert len(lines) == 1 and "median score ratio" in lines[0] and "of 2 sites beat their best natural image" in lines[0]
    # the images are the one-hot images of those seeds (sites chunked by batch_size)
    seeds = [oracle.derive_seed(1, "ceiling-one-hot", 1, j) for j in range(2)]
    imgs = oracle.one_hot_on_twins(rec, [1, 1], seeds, from_dict(SynthesisConfig, CFG), natural=x, natural_y=rec.expected(x))
    _, soft = one_hot_scores(rec.expected(x).double().numpy().T, rec.expected(imgs).double().numpy().T)
    assert out["score"][1] == pytest.approx(float(soft[1].max()), rel=1e-3)
    weak = oracle.twin_ceiling(rec, x, from_dict(SynthesisConfig, {**CFG, "steps": 2}), objective="one_hot", seeds_per_target=2, seed=1)
    assert np.all(np.array(weak["score"]) < np.array(out["score"]))  # fewer steps, lower scores
    with pytest.raises(ValueError, match="objective must be one of stretch, one_hot"):
        oracle.twin_ceiling(rec, x, from_dict(SynthesisConfig, CFG), objective="suppress")


def test_natural_starts_on_the_twins_begin_at_the_twins_best_natural_images():
    from synth.validation.control import one_hot_scores

    rec, x = _recorder()
    cfg = from_dict(SynthesisConfig, CFG)
    y = rec.expected(x)
    # stretch: the k-th image of a twin starts from the natural image it responds to k-th most
    a = oracle.stretch_on_twin(rec, 1, [3, 4, 5], cfg, natural=x, natural_y=y, start="natural")
    order = np.argsort(-y[:, 1].numpy(), kind="stable")
    np.testing.assert_array_equal(closest_natural(a, x), order[:3])
    noise = oracle.stretch_on_twin(rec, 1, [3, 4, 5], cfg, natural=x, natural_y=y)
    assert float((a - noise).abs().mean()) > 0.02
    z = (rec.expected(a)[:, 1] - y[:, 1].mean()) / y[:, 1].std()
    assert float(z.min()) > 2.0  # still driven far above the natural mean
    # one-hot: a target's k-th image starts from its k-th best natural image by one-hot score
    b = oracle.one_hot_on_twins(rec, [0, 0, 1], [3, 4, 5], cfg, natural=x, natural_y=y, start="natural")
    soft_nat, _ = one_hot_scores(y.double().numpy().T, np.zeros((2, 0)))
    o0, o1 = np.argsort(-soft_nat[0], kind="stable"), np.argsort(-soft_nat[1], kind="stable")
    np.testing.assert_array_equal(closest_natural(b, x), [o0[0], o0[1], o1[0]])
    with pytest.raises(ValueError, match="start must be one of noise, natural"):
        oracle.stretch_on_twin(rec, 1, [3], cfg, natural=x, natural_y=y, start="best")


def test_twin_ceiling_with_natural_starts():
    rec, x = _recorder()
    lines: list[str] = []
    cfg = from_dict(SynthesisConfig, CFG)
    out = oracle.twin_ceiling(rec, x, cfg, seeds_per_target=2, seed=1, write=lines.append, start="natural")
    assert out["start"] == "natural" and "natural starts" in lines[0]
    # the same images as stretch_on_twin's with natural starts, scored by the twin
    seeds = [oracle.derive_seed(1, "ceiling", 0, j) for j in range(2)]
    imgs = oracle.stretch_on_twin(rec, 0, seeds, cfg, natural=x, natural_y=rec.expected(x), start="natural")
    assert out["best"][0] == pytest.approx(float(rec.expected(imgs)[:, 0].max()), rel=1e-5)
    assert oracle.twin_ceiling(rec, x, cfg, seeds_per_target=2, seed=1)["start"] == "noise"
    with pytest.raises(ValueError, match="start must be one of noise, natural"):
        oracle.twin_ceiling(rec, x, cfg, start="top")


def test_view_search_on_the_twins_starts_from_the_views_the_twin_rates_best():
    from synth.synthesis.starts import apply_views, start_views

    rec, x = _recorder()
    cfg = from_dict(SynthesisConfig, CFG)
    y = rec.expected(x)
    views = start_views([1, 1.25, 1.5, 2], True)  # the shipped views
    a = oracle.stretch_on_twin(rec, 1, [3, 4, 5], cfg, natural=x, natural_y=y, start="natural", views=views, candidates=4)
    # by hand: the twin rates every view of its 4 best natural images; the k-th image starts
    # from the best view of the image whose best view is k-th best
    top = np.argsort(-y[:, 1].numpy(), kind="stable")[:4]
    seen = apply_views(x[torch.as_tensor(top)], views)
    with torch.no_grad():
        r = rec.site_model(1)(seen)[:, 0].clamp_min(0).double().numpy().reshape(4, len(views))
    order = np.argsort(-r.max(1), kind="stable")[:3]
    expect = [int(i) * len(views) + int(r[i].argmax()) for i in order]
    assert any(e % len(views) != 0 for e in expect)  # not only whole images: the search matters here
    np.testing.assert_array_equal(closest_natural(a, seen), expect)
    # the ceiling passes the views on and says so
    lines: list[str] = []
    out = oracle.twin_ceiling(rec, x, cfg, seeds_per_target=1, seed=1, sites=[1], write=lines.append, start="natural", views=views, candidates=4)
    assert out["n_views"] == len(views) and f"best of {len(views)} views" in lines[-1]
    with pytest.raises(ValueError, match="view search needs natural starts"):
        oracle.twin_ceiling(rec, x, cfg, views=views)


@requires_cowley
def test_bench_ceiling_on_real_twins(capsys):
    from synth.cli import main

    cfg = Path(__file__).resolve().parents[2] / "configs" / "cowley2023_closed_loop.yaml"
    code = main(["bench", "ceiling", str(cfg), "--set", f"target.root={cowley_root()}", "--set", "target.session=190923",
                 "--set", "synthesis.steps=16", "--set", "stimuli.seeds_per_target=1", "--set", "stimuli.start_candidates=2", "--sites", "2", "-q"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0].startswith("cowley2023") and "33 twins" in out[0] and "16 steps" in out[0]
    assert "natural starts" in out[0] and "natural starts" in out[1]  # the shipped config's stimuli.start
    assert "best of 56 views of 2 images" in out[0] and "best of 56 views" in out[1]  # and its view search
    assert "of 2 sites above their natural max" in out[1]
    frac = float(out[-1].split("ceiling_stretch_fraction:")[1])
    assert frac in (0.0, 0.5, 1.0)  # two sites
    code = main(["bench", "ceiling", str(cfg), "--set", f"target.root={cowley_root()}", "--set", "target.session=190923",
                 "--set", "synthesis.steps=4", "--set", "synthesis.batch_size=1", "--set", "stimuli.seeds_per_target=1",
                 "--set", "stimuli.start_candidates=2", "--sites", "1", "--objective", "one_hot", "-q"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and "one-hot synthesized on all 33 twins" in out[1]
    assert float(out[-1].split("ceiling_one_hot_ratio:")[1]) > 0
