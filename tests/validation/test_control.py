"""Control outcomes (stretch, one-hot, synthetic prediction) against loop computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from synth.data.recordings import Recording
from synth.errors import DataError
from synth.validation.control import closed_loop_metrics
from synth.validation.io import Predictions

from .conftest import make_run


def ref_outcomes(means: dict[str, dict[str, float]], sites: list[str], manifest, natural_ids):
    """Stretch gains and one-hot ratios per target from repeat means, by the definitions, with loops.

    means[stimulus_id][site_id] -> repeat-mean response.
    """
    nat_max = {s: max(means[i][s] for i in natural_ids) for s in sites}
    mu = {s: sum(means[i][s] for i in natural_ids) / len(natural_ids) for s in sites}
    sd = {s: math.sqrt(sum((means[i][s] - mu[s]) ** 2 for i in natural_ids) / len(natural_ids)) for s in sites}

    def score(img: str, t: str) -> float:
        z = {s: (means[img][s] - mu[s]) / sd[s] for s in sites}
        top = max(z.values())
        den = sum(math.exp(v - top) for v in z.values())
        return math.exp(z[t] - top) / den

    stretch, one_hot = {}, {}
    for row in manifest:
        t, sid = row["target_site"], row["stimulus_id"]
        if row["objective"] == "stretch":
            stretch[t] = max(stretch.get(t, -math.inf), means[sid][t])
        else:
            one_hot[t] = max(one_hot.get(t, -math.inf), score(sid, t))
    gains = {t: stretch[t] / nat_max[t] - 1 for t in stretch}
    above = {t: stretch[t] > nat_max[t] for t in stretch}
    ratios = {t: one_hot[t] / max(score(i, t) for i in natural_ids) for t in one_hot}
    return gains, above, ratios


def _means(rec: Recording) -> dict[str, dict[str, float]]:
    m = rec.mean()
    return {sid: {site: float(m[s, i]) for s, site in enumerate(rec.site_id)} for i, sid in enumerate(rec.stimulus_id)}


def test_matches_definitions_recorded_and_predicted(tmp_path):
    d = make_run(tmp_path, n_sites=6, n_natural=40, n_repeats=5, noise=0.3, seed=0)
    pred = Predictions.concat([d["pred_nat"], d["pred_syn"]])
    out = closed_loop_metrics(d["recording"], pred, d["manifest"], d["natural_ids"], n_bootstrap=50, seed=0)
    gains, above, ratios = ref_outcomes(_means(d["recording"]), d["sites"], d["manifest"], d["natural_ids"])
    st = out["stretch"]
    assert st["n_targets"] == 6
    assert st["fraction_above_natural_max"] == pytest.approx(np.mean(list(above.values())))
    assert st["median_gain"] == pytest.approx(float(np.median(list(gains.values()))), abs=1e-12)
    for row in st["per_target"]:
        assert row["gain"] == pytest.approx(gains[row["target_site"]], abs=1e-12)
        assert row["above_natural_max"] == above[row["target_site"]]
    oh = out["one_hot"]
    assert oh["median_score_ratio"] == pytest.approx(float(np.median(list(ratios.values()))), abs=1e-12)
    assert oh["fraction_beating_best_natural"] == pytest.approx(np.mean([r > 1 for r in ratios.values()]))
    for row in oh["per_target"]:
        assert row["ratio"] == pytest.approx(ratios[row["target_site"]], abs=1e-12)
    # the design: odd sites' stretch images go 1.6x above their natural max, even ones stay below
    assert {t: a for t, a in above.items()} == {s: bool(i % 2) for i, s in enumerate(d["sites"])}
    # predicted figures from the model's predictions (a rescaled, slightly noisy copy)
    pm = {}
    for p in (d["pred_nat"], d["pred_syn"]):
        for i, sid in enumerate(p.stimulus_id):
            pm[sid] = {site: float(p.predicted[i, s]) for s, site in enumerate(p.site_id)}
    pg, pa, pr = ref_outcomes(pm, d["sites"], d["manifest"], d["natural_ids"])
    assert st["predicted"]["median_gain"] == pytest.approx(float(np.median(list(pg.values()))), abs=1e-12)
    assert st["predicted"]["fraction_above_natural_max"] == pytest.approx(np.mean(list(pa.values())))
    assert oh["predicted"]["median_score_ratio"] == pytest.approx(float(np.median(list(pr.values()))), abs=1e-12)
    # synthetic prediction: per-site r across the synthesized images
    sp = out["synthetic_prediction"]
    m = _means(d["recording"])
    rs = []
    for s in d["sites"]:
        x = [pm[i][s] for i in d["syn_ids"]]
        y = [m[i][s] for i in d["syn_ids"]]
        rs.append(np.corrcoef(x, y)[0, 1])
    assert sp["median_site_r"] == pytest.approx(float(np.median(rs)), abs=1e-12)
    assert sp["n_images"] == len(d["syn_ids"]) and len(sp["per_site"]) == 6


def test_bootstrap_cis_bracket_estimates_and_are_seeded(tmp_path):
    d = make_run(tmp_path, n_sites=8, n_natural=50, n_repeats=6, noise=1.0, seed=1)
    args = (d["recording"], None, d["manifest"], d["natural_ids"])
    a = closed_loop_metrics(*args, n_bootstrap=200, seed=3)
    b = closed_loop_metrics(*args, n_bootstrap=200, seed=3)
    c = closed_loop_metrics(*args, n_bootstrap=200, seed=4)
    assert a == b
    assert a["stretch"]["ci95"] != c["stretch"]["ci95"]
    for blk, keys in (("stretch", ("fraction_above_natural_max", "median_gain")),
                      ("one_hot", ("median_score_ratio", "fraction_beating_best_natural"))):
        for k in keys:
            lo, hi = a[blk]["ci95"][k]
            assert lo <= hi
            assert lo - 1e-9 <= a[blk][k] <= hi + 1e-9, (blk, k, lo, a[blk][k], hi)
    lo, hi = a["stretch"]["ci95"]["median_gain"]
    assert hi - lo > 0  # noise and target resampling make the interval non-degenerate
    assert a["stretch"]["predicted"] is None and a["synthetic_prediction"]["median_site_r"] is None
    none = closed_loop_metrics(*args, n_bootstrap=0, seed=3)
    assert none["stretch"]["ci95"] == {"fraction_above_natural_max": None, "median_gain": None}


def test_bootstrap_width_shrinks_with_more_repeats(tmp_path):
    few = make_run(tmp_path / "a", n_sites=6, n_natural=40, n_repeats=3, noise=2.0, seed=2)
    many = make_run(tmp_path / "b", n_sites=6, n_natural=40, n_repeats=40, noise=2.0, seed=2)

    def width(d):
        out = closed_loop_metrics(d["recording"], None, d["manifest"], d["natural_ids"], n_bootstrap=150, seed=0)
        lo, hi = out["one_hot"]["ci95"]["median_score_ratio"]
        return hi - lo

    assert width(many) < width(few)


def test_dict_predictions_and_site_order_give_the_same_answer(tmp_path):
    d = make_run(tmp_path, n_sites=5, seed=5)
    rec = d["recording"]
    pred = Predictions.concat([d["pred_nat"], d["pred_syn"]])
    a = closed_loop_metrics(rec, pred, d["manifest"], d["natural_ids"], n_bootstrap=30, seed=0)
    as_dict = {sid: pred.predicted[i] for i, sid in enumerate(pred.stimulus_id)}  # same site order as rec
    b = closed_loop_metrics(rec, as_dict, d["manifest"], d["natural_ids"], n_bootstrap=30, seed=0)
    assert a == b
    rng = np.random.default_rng(0)
    ps, pt = rng.permutation(rec.n_stimuli), rng.permutation(rec.n_sites)
    shuffled = Recording(stimulus_id=rec.stimulus_id[ps], site_id=rec.site_id[pt], responses=rec.responses[pt][:, ps])
    c = closed_loop_metrics(shuffled, pred, list(reversed(d["manifest"])), list(reversed(d["natural_ids"])), n_bootstrap=30, seed=0)
    assert a == c
    with pytest.raises(DataError, match="recording.site_id order"):
        closed_loop_metrics(rec, {k: v[:3] for k, v in as_dict.items()}, d["manifest"], d["natural_ids"], n_bootstrap=0)


def test_several_seeds_per_target_take_the_best_image(tmp_path):
    d = make_run(tmp_path, n_sites=3, seed=6)
    rec, man = d["recording"], list(d["manifest"])
    # add a second, weaker stretch image for site00 (below natural max): the best one counts
    extra = "stretch_site00_s1"
    resp = np.concatenate([rec.responses, np.full((3, 1, rec.responses.shape[2]), 0.5)], axis=1)
    rec2 = Recording(stimulus_id=np.r_[rec.stimulus_id, [extra]], site_id=rec.site_id, responses=resp)
    man.append({"stimulus_id": extra, "objective": "stretch", "target_site": "site00", "file": ""})
    a = closed_loop_metrics(rec, None, d["manifest"], d["natural_ids"], n_bootstrap=0)
    b = closed_loop_metrics(rec2, None, man, d["natural_ids"], n_bootstrap=0)
    ra = {r["target_site"]: r for r in a["stretch"]["per_target"]}
    rb = {r["target_site"]: r for r in b["stretch"]["per_target"]}
    assert rb["site00"]["stimulus_ids"] == ["stretch_site00_s0", extra]
    assert rb["site00"]["gain"] == ra["site00"]["gain"] and rb["site00"]["stimulus_id"] == "stretch_site00_s0"


def test_errors_and_partial_inputs(tmp_path, caplog):
    d = make_run(tmp_path, n_sites=3, seed=7)
    rec = d["recording"]
    syn_only = rec.select(stimuli=d["syn_ids"])
    with pytest.raises(DataError, match="need the natural set: record it in the follow-up"):
        closed_loop_metrics(syn_only, None, d["manifest"], d["natural_ids"], n_bootstrap=0)
    nat_only = rec.select(stimuli=d["natural_ids"])
    with pytest.raises(DataError, match="none of the 6 synthesized stimuli"):
        closed_loop_metrics(nat_only, None, d["manifest"], d["natural_ids"], n_bootstrap=0)
    man = list(d["manifest"]) + [{"stimulus_id": "x1", "objective": "stretch", "target_site": "ghost"},
                                 {"stimulus_id": "x2", "objective": "texture", "target_site": "site00"}]
    with caplog.at_level("WARNING"):
        out = closed_loop_metrics(rec, None, man, d["natural_ids"] + ["natXXX"], n_bootstrap=0)
    assert out["stretch"]["n_targets"] == 3
    assert out["natural"] == {"n_images": len(d["natural_ids"]), "n_missing_from_recording": 1}
    text = caplog.text
    assert "ghost" in text and "texture" in text and "1 of 41 natural images" in text


def test_bootstrap_resamples_natural_images(tmp_path):
    """Noise-free repeats and a single target: only the resampling of natural images can
    move the natural maximum, so the interval is wide exactly because of it."""
    d = make_run(tmp_path, n_sites=3, n_natural=30, n_repeats=3, noise=0.0, seed=11)
    rec = d["recording"]
    manifest = [r for r in d["manifest"] if r["target_site"] == "site01"]
    out = closed_loop_metrics(rec, None, manifest, d["natural_ids"], n_bootstrap=200, seed=0)
    lo, hi = out["stretch"]["ci95"]["median_gain"]
    assert out["stretch"]["n_targets"] == 1
    assert lo <= out["stretch"]["median_gain"] <= hi and hi - lo > 0.02
    # dropping the natural images' extremes only raises the gain: the interval reaches above the estimate
    assert hi > out["stretch"]["median_gain"] + 0.01
    lo, hi = out["one_hot"]["ci95"]["median_score_ratio"]
    assert hi - lo > 0.0


def _equal_rates_recording(n_targets: int, n_natural: int, n_syn: int, n_repeats: int, seed: int):
    """Every natural and synthesized image drives every site at the same rate (no control at
    all), with Gaussian trial noise: only selection on noise can make an image "win"."""
    rng = np.random.default_rng(seed)
    sites = [f"site{i:03d}" for i in range(n_targets)]
    nat_ids = [f"nat{i:03d}" for i in range(n_natural)]
    man, syn_ids = [], []
    for s in sites:
        for kind in ("stretch", "one_hot"):
            for k in range(n_syn):
                sid = f"{kind}_{s}_s{k}"
                syn_ids.append(sid)
                man.append({"stimulus_id": sid, "objective": kind, "target_site": s})
    ids = nat_ids + syn_ids
    resp = 10.0 + rng.normal(0.0, 1.0, size=(n_targets, len(ids), n_repeats))
    return Recording(stimulus_id=np.array(ids), site_id=np.array(sites), responses=resp), man, nat_ids


def test_held_out_repeats_remove_the_gain_of_picking_on_trial_noise():
    # 12 synthesized images per target against 2 natural images, all with the same true
    # rate: picking the best noisy means makes most targets "beat" their natural maximum;
    # picking on half the trials and scoring on the other half puts it near a coin toss
    rec, man, nat = _equal_rates_recording(n_targets=300, n_natural=2, n_syn=12, n_repeats=8, seed=1)
    out = closed_loop_metrics(rec, None, man, nat, n_bootstrap=0)
    assert out["stretch"]["fraction_above_natural_max"] > 0.8
    held = out["stretch"]["held_out_repeats"]
    assert 0.4 < held["fraction_above_natural_max"] < 0.6
    assert abs(held["median_gain"]) < 0.02 < out["stretch"]["median_gain"]
    # one-hot scores need z-scores from more than two natural images
    rec, man, nat = _equal_rates_recording(n_targets=80, n_natural=10, n_syn=40, n_repeats=8, seed=2)
    out = closed_loop_metrics(rec, None, man, nat, n_bootstrap=0)
    held = out["one_hot"]["held_out_repeats"]["fraction_beating_best_natural"]
    assert held < 0.55 and out["one_hot"]["fraction_beating_best_natural"] > held + 0.15


def test_held_out_repeats_equal_the_headline_without_trial_noise(tmp_path):
    d = make_run(tmp_path, n_sites=6, n_natural=40, n_repeats=4, noise=0.0, seed=3)
    out = closed_loop_metrics(d["recording"], None, d["manifest"], d["natural_ids"], n_bootstrap=0)
    for blk, keys in (("stretch", ("fraction_above_natural_max", "median_gain")),
                      ("one_hot", ("median_score_ratio", "fraction_beating_best_natural"))):
        for k in keys:
            assert out[blk]["held_out_repeats"][k] == pytest.approx(out[blk][k], abs=1e-12)


def test_held_out_repeats_ci_covers_the_coin_toss_and_excludes_the_recorded_figure():
    # all images share one true rate, so a fresh-trial pick beats the natural maximum about
    # half the time: the held-out interval holds 0.5, the recorded figure lies above it
    rec, man, nat = _equal_rates_recording(n_targets=80, n_natural=2, n_syn=12, n_repeats=8, seed=1)
    out = closed_loop_metrics(rec, None, man, nat, n_bootstrap=60, seed=4)
    held = out["stretch"]["held_out_repeats"]
    lo, hi = held["ci95"]["fraction_above_natural_max"]
    assert lo <= held["fraction_above_natural_max"] <= hi
    assert lo < 0.5 < hi < out["stretch"]["fraction_above_natural_max"]
    glo, ghi = held["ci95"]["median_gain"]
    assert glo < 0.0 < ghi
    assert out["one_hot"]["held_out_repeats"]["ci95"]["median_score_ratio"] is not None
    assert closed_loop_metrics(rec, None, man, nat, n_bootstrap=0)["stretch"]["held_out_repeats"]["ci95"] == {
        "fraction_above_natural_max": None, "median_gain": None}


def test_held_out_repeats_ci_holds_its_point_estimate(tmp_path):
    # a bootstrap that spoils the natural set's pick (resampled natural images or trials)
    # pushes the whole interval above the held-out figure; re-split trials must not
    d = make_run(tmp_path, n_sites=40, n_natural=300, n_repeats=10, noise=2.0, seed=5)
    out = closed_loop_metrics(d["recording"], None, d["manifest"], d["natural_ids"], n_bootstrap=100, seed=2)
    for blk, k in (("stretch", "median_gain"), ("one_hot", "median_score_ratio")):
        held = out[blk]["held_out_repeats"]
        lo, hi = held["ci95"][k]
        assert lo < held[k] < hi, (blk, k, lo, held[k], hi)


def test_held_out_repeats_need_two_repeats(tmp_path):
    d = make_run(tmp_path, n_sites=4, n_natural=20, n_repeats=1, noise=0.3, seed=0)
    out = closed_loop_metrics(d["recording"], None, d["manifest"], d["natural_ids"], n_bootstrap=0)
    assert out["stretch"]["held_out_repeats"] is None and out["one_hot"]["held_out_repeats"] is None
    assert out["stretch"]["fraction_above_natural_max"] is not None
