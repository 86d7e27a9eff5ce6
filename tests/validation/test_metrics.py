"""Per-site metrics: known answers, NaN handling, and an independent loop implementation
checked on real V4 recordings (Cowley et al. 2023, session 210325)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from synth.data.recordings import Recording
from synth.validation.io import Predictions
from synth.validation.metrics import (
    compact_repeats,
    join,
    pearson_per_site,
    site_metrics,
    spearman_brown,
    split_half_reliability,
)
from synth.validation.validate import site_report

from .conftest import simulate

# ---------------------------------------------------------------- independent reference (plain loops)


def ref_trials(resp_row_image) -> list[float]:
    return [float(v) for v in resp_row_image if not math.isnan(v)]


def ref_mean(v: list[float]) -> float:
    return sum(v) / len(v)


def ref_pearson(x: list[float], y: list[float]) -> float:
    mx, my = ref_mean(x), ref_mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def ref_site(pred_row, resp_site) -> tuple[float, float]:
    """(pearson r, r2_er) for one site by the formulas, with loops."""
    xs, trials = [], []
    for i in range(len(pred_row)):
        t = ref_trials(resp_site[i])
        if t and not math.isnan(pred_row[i]):
            xs.append(float(pred_row[i]))
            trials.append(t)
    ys = [ref_mean(t) for t in trials]
    r = ref_pearson(xs, ys)
    m = len(xs)
    variances = []
    for t in trials:
        if len(t) >= 2:
            mt = ref_mean(t)
            variances.append(sum((v - mt) ** 2 for v in t) / (len(t) - 1))
    sig2 = ref_mean(variances)
    n = float(np.median([len(t) for t in trials]))
    mx, my = ref_mean(xs), ref_mean(ys)
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    sxx = sum((a - mx) ** 2 for a in xs)
    syy = sum((b - my) ** 2 for b in ys)
    r2er = (sxy**2 - sig2 / n * sxx) / (sxx * syy - (m - 1) * sig2 / n * sxx)
    return r, r2er


def ref_split_half_values(resp_site, n_splits: int, seed: int) -> list[float]:
    """Spearman-Brown corrected split-half r of each split, with Python's own random module."""
    rnd = random.Random(seed)
    vals = []
    for _ in range(n_splits):
        a, b = [], []
        for i in range(len(resp_site)):
            t = ref_trials(resp_site[i])
            if len(t) < 2:
                continue
            rnd.shuffle(t)
            h = len(t) // 2
            a.append(ref_mean(t[:h]))
            b.append(ref_mean(t[h:]))
        r = ref_pearson(a, b)
        vals.append(2 * r / (1 + r))
    return vals


def ref_split_half(resp_site, n_splits: int, seed: int) -> float:
    vals = ref_split_half_values(resp_site, n_splits, seed)
    return sum(vals) / len(vals)


def pb_r2er_equal_repeats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """r2_ER as printed by Pospisil & Bair (2021, eq. for hat r^2_ER; their ``r2er_n2m``), for
    equal repeat counts: ``x`` (m,) model, ``y`` (sites, n repeats, m images) data."""
    n, m = y.shape[-2:]
    sig2 = np.var(y, axis=-2, ddof=1).mean(axis=-1)  # (sites,)
    xc = x - x.mean()
    ybar = y.mean(axis=-2)
    yc = ybar - ybar.mean(axis=-1, keepdims=True)
    xy2 = (yc @ xc) ** 2
    x2 = xc @ xc
    y2 = (yc**2).sum(axis=-1)
    return (xy2 - sig2 / n * x2) / (x2 * y2 - (m - 1) * sig2 / n * x2)


# ---------------------------------------------------------------- real data


def test_real_data_medians_match_independent_computation(raw_210325):
    """Predict each image's second-half repeats from the mean of its first-half repeats."""
    a = raw_210325  # (50 sites, 640 images, 10 slots), trailing NaNs, 6..10 repeats
    S, N, R = a.shape
    k = np.sum(~np.isnan(a[0]), axis=1)
    h = k // 2
    pred = np.full((S, N), np.nan)
    test = np.full((S, N, R), np.nan)
    for i in range(N):
        pred[:, i] = a[:, i, : h[i]].mean(axis=1)
        test[:, i, : k[i] - h[i]] = a[:, i, h[i] : k[i]]
    stim = np.array([f"img{i:04d}" for i in range(N)])
    sites = np.array([f"n{s:02d}" for s in range(S)])
    rep, _ = site_report(
        Predictions(stimulus_id=stim, site_id=sites, predicted=pred.T),
        Recording(stimulus_id=stim, site_id=sites, responses=test),
        n_splits=20, seed=0,
    )
    refs = [ref_site(pred[s], test[s]) for s in range(S)]
    ref_r = np.array([x[0] for x in refs])
    ref_r2 = np.array([x[1] for x in refs])
    got_r = np.array([p["pearson_r"] for p in rep["per_site"]])
    got_r2 = np.array([p["r2_er"] for p in rep["per_site"]])
    np.testing.assert_allclose(got_r, ref_r, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got_r2, ref_r2, rtol=0, atol=1e-9)
    assert rep["median_pearson_r"] == pytest.approx(float(np.median(ref_r)), abs=1e-12)
    assert rep["median_r2_er"] == pytest.approx(float(np.median(ref_r2)), abs=1e-10)
    # split-half: a different random generator, so agreement within sampling error: each
    # site's difference of two 20-split means is within 4.5 standard errors
    ref_vals = np.array([ref_split_half_values(test[s], 20, seed=1234) for s in range(S)])
    ref_rel = ref_vals.mean(axis=1)
    se = ref_vals.std(axis=1, ddof=1) / np.sqrt(20)
    got_rel = np.array([p["split_half_reliability"] for p in rep["per_site"]])
    assert np.all(np.abs(got_rel - ref_rel) <= 4.5 * np.sqrt(2) * se + 1e-12)
    assert rep["median_split_half_reliability"] == pytest.approx(float(np.median(ref_rel)), abs=0.01)
    # the noise correction matters on these data: r2_er exceeds raw r^2 for most sites
    assert np.mean(got_r2 > got_r**2) > 0.8


def test_real_data_r2_er_matches_pospisil_bair_formula(raw_210325):
    """Equal repeat counts (every image has >= 6): model = mean of repeats 0-2, data =
    repeats 3-5; r2_ER against a direct transcription of the published estimator, r
    against numpy's corrcoef."""
    a = raw_210325
    S, N, _ = a.shape
    stim = np.array([f"img{i:04d}" for i in range(N)])
    sites = np.array([f"n{s:02d}" for s in range(S)])
    data = a[:, :, 3:6]  # (S, N, 3), no NaN
    assert not np.isnan(data).any()
    model = a[:, :, :3].mean(axis=2)  # (S, N)
    rep, _ = site_report(Predictions(stimulus_id=stim, site_id=sites, predicted=model.T),
                         Recording(stimulus_id=stim, site_id=sites, responses=data), n_splits=10, seed=0)
    want_r2 = np.array([pb_r2er_equal_repeats(model[s], data[s : s + 1].transpose(0, 2, 1))[0] for s in range(S)])
    want_r = np.array([np.corrcoef(model[s], data[s].mean(axis=1))[0, 1] for s in range(S)])
    got_r2 = np.array([p["r2_er"] for p in rep["per_site"]])
    got_r = np.array([p["pearson_r"] for p in rep["per_site"]])
    np.testing.assert_allclose(got_r2, want_r2, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got_r, want_r, rtol=0, atol=1e-12)
    assert rep["median_r2_er"] == pytest.approx(float(np.median(want_r2)), abs=1e-10)
    assert rep["median_pearson_r"] == pytest.approx(float(np.median(want_r)), abs=1e-12)
    assert all(p["median_repeats"] == 3 for p in rep["per_site"])


# ---------------------------------------------------------------- known answers


def test_perfect_prediction_gives_r_one():
    signal, resp = simulate(n_sites=4, n_images=50, n_repeats=5, noise=1.0, seed=1)
    means = resp.mean(axis=2)
    m = site_metrics(means, resp)
    np.testing.assert_allclose(m["pearson_r"], 1.0, atol=1e-12)
    # predicting the repeat means themselves: r2_er corrects for noise that the prediction shares
    assert np.all(m["r2_er"] > 1.0)


def test_r2_er_is_unbiased_where_raw_r2_is_not():
    """Pospisil & Bair's point: with a noise-free true model (r2_ER = 1) or a model sharing
    half the explainable variance, the estimator averages to the truth; raw r^2 does not."""
    rng = np.random.default_rng(5)
    S, N, R, noise = 400, 60, 4, 1.0  # moderate SNR, where the ratio estimator is ~unbiased
    signal = rng.normal(0, 1.0, size=(S, N))
    resp = signal[:, :, None] + rng.normal(0, noise, size=(S, N, R))
    m = site_metrics(signal, resp, n_splits=2)
    assert np.mean(m["r2_er"]) == pytest.approx(1.0, abs=0.05)
    assert np.mean(m["pearson_r"] ** 2) < 0.85
    # a model with r^2 = 0.5 to the expected response
    other = rng.normal(0, 1.0, size=(S, N))
    other -= (np.sum(other * signal, 1, keepdims=True) / np.sum(signal * signal, 1, keepdims=True)) * signal
    other *= np.linalg.norm(signal - signal.mean(1, keepdims=True), axis=1, keepdims=True) / np.linalg.norm(other, axis=1, keepdims=True)
    half = signal + other  # cos^2 angle = 0.5 (centred)
    m2 = site_metrics(half, resp, n_splits=2)
    assert np.mean(m2["r2_er"]) == pytest.approx(0.5, abs=0.05)


def test_pure_noise_prediction_gives_r_near_zero():
    _, resp = simulate(n_sites=40, n_images=200, n_repeats=4, noise=0.5, seed=2)
    pred = np.random.default_rng(99).normal(size=resp.shape[:2])
    m = site_metrics(pred, resp, n_splits=5)
    assert abs(np.median(m["pearson_r"])) < 0.05
    assert np.all(np.abs(m["pearson_r"]) < 0.3)
    assert abs(np.mean(m["r2_er"])) < 0.03
    # the responses are reliable even though the prediction is useless
    assert np.median(m["split_half_reliability"]) > 0.8


def test_constant_sites_are_nan_and_excluded_from_medians():
    signal, resp = simulate(n_sites=4, n_images=30, n_repeats=4, seed=3)
    pred = signal.copy()
    pred[1] = 2.5  # constant prediction
    resp[2] = 7.0  # constant responses (no noise either)
    stim = np.array([f"s{i}" for i in range(30)])
    sites = np.array(["a", "b", "c", "d"])
    rep, _ = site_report(Predictions(stimulus_id=stim, site_id=sites, predicted=pred.T),
                         Recording(stimulus_id=stim, site_id=sites, responses=resp))
    by = {p["site_id"]: p for p in rep["per_site"]}
    assert by["b"]["pearson_r"] is None and by["b"]["r2_er"] is None and not by["b"]["included"]
    assert by["c"]["pearson_r"] is None and by["c"]["r2_er"] is None and not by["c"]["included"]
    assert by["c"]["split_half_reliability"] is None
    assert by["a"]["included"] and by["d"]["included"]
    assert rep["n_sites_included"] == 2 and rep["n_sites_excluded"] == 2
    assert {e["site_id"] for e in rep["excluded_sites"]} == {"b", "c"}
    assert rep["median_pearson_r"] == pytest.approx(np.median([by["a"]["pearson_r"], by["d"]["pearson_r"]]))


def test_nan_repeats_match_loops_and_holes_do_not_matter():
    rng = np.random.default_rng(4)
    signal, resp = simulate(n_sites=5, n_images=60, n_repeats=8, seed=4)
    resp[rng.random(resp.shape) < 0.3] = np.nan  # ragged, holes anywhere, per site
    resp[:, 0, :] = np.nan  # one image without any repeat
    resp[:, 1, 1:] = np.nan  # one image with a single repeat
    pred = signal + rng.normal(0, 0.5, signal.shape)
    pred[0, 5] = np.nan  # a missing prediction
    m = site_metrics(pred, resp, n_splits=10, seed=0)
    for s in range(5):
        r, r2 = ref_site(pred[s], resp[s])
        assert m["pearson_r"][s] == pytest.approx(r, abs=1e-12)
        assert m["r2_er"][s] == pytest.approx(r2, abs=1e-10)
        expected_n = sum(1 for i in range(60) if ref_trials(resp[s, i]) and not math.isnan(pred[s, i]))
        assert m["n_images"][s] == expected_n
    # moving the present repeats around (same order) changes nothing, split halves included
    compact = compact_repeats(resp)
    shifted = np.concatenate([np.full(resp.shape[:2] + (3,), np.nan), compact], axis=2)
    m2 = site_metrics(pred, shifted, n_splits=10, seed=0)
    for key in ("pearson_r", "r2_er", "split_half_reliability"):
        np.testing.assert_array_equal(m[key], m2[key])


def test_split_half_matches_reference_on_average_and_is_seeded():
    _, resp = simulate(n_sites=8, n_images=120, n_repeats=6, noise=2.0, seed=6)
    a = split_half_reliability(resp, n_splits=40, seed=0)
    b = split_half_reliability(resp, n_splits=40, seed=0)
    c = split_half_reliability(resp, n_splits=40, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ref = np.array([ref_split_half(resp[s], 40, seed=7) for s in range(8)])
    np.testing.assert_allclose(a, ref, atol=0.03)
    # reliability of the full-length mean: var(signal) / (var(signal) + noise^2 / R)
    sig_var = 2.0 * 1.5**2
    truth = sig_var / (sig_var + 4.0 / 6)
    assert np.mean(a) == pytest.approx(truth, abs=0.06)


def test_spearman_brown():
    np.testing.assert_allclose(spearman_brown(np.array([0.0, 0.5, 1.0])), [0.0, 2 / 3, 1.0])
    assert np.isnan(spearman_brown(-1.0))


def test_pearson_per_site_against_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 25)), rng.normal(size=(3, 25))
    want = [np.corrcoef(x[i], y[i])[0, 1] for i in range(3)]
    np.testing.assert_allclose(pearson_per_site(x, y), want, atol=1e-12)
    assert np.isnan(pearson_per_site(np.ones((1, 5)) * 0.1, y[:1, :5])[0])
    assert np.isnan(pearson_per_site(x[:1, :1], y[:1, :1])[0])


def test_join_is_by_id_and_order_free():
    signal, resp = simulate(n_sites=6, n_images=40, n_repeats=5, seed=8)
    stim = np.array([f"img{i:02d}" for i in range(40)])
    sites = np.array([f"site{i}" for i in range(6)])
    pred = signal + np.random.default_rng(1).normal(0, 0.7, signal.shape)
    P = Predictions(stimulus_id=stim, site_id=sites, predicted=pred.T)
    rec = Recording(stimulus_id=stim, site_id=sites, responses=resp)
    rng = np.random.default_rng(2)
    ps, pt = rng.permutation(40), rng.permutation(6)
    rec_shuffled = Recording(stimulus_id=stim[ps], site_id=sites[pt], responses=resp[pt][:, ps])
    a, _ = site_report(P, rec, n_splits=10, seed=3)
    b, _ = site_report(P, rec_shuffled, n_splits=10, seed=3)
    assert a == b
    # positions alone would pair the wrong images: the shuffled recording read by position differs
    by_pos = Recording(stimulus_id=stim, site_id=sites, responses=resp[pt][:, ps])
    c, _ = site_report(P, by_pos, n_splits=10, seed=3)
    assert c["median_pearson_r"] < a["median_pearson_r"] - 0.3


def test_join_partial_warns_and_none_raises(caplog):
    from synth.errors import DataError

    signal, resp = simulate(n_sites=3, n_images=20, n_repeats=3, seed=9)
    stim = np.array([f"i{i}" for i in range(20)])
    sites = np.array(["x", "y", "z"])
    P = Predictions(stimulus_id=stim[:15], site_id=sites[:2], predicted=signal[:2, :15].T)
    rec = Recording(stimulus_id=stim[5:], site_id=sites, responses=resp[:, 5:])
    with caplog.at_level("WARNING"):
        j = join(P, rec)
    assert j.counts == {"stimuli_matched": 10, "stimuli_predicted": 15, "stimuli_recorded": 15,
                        "stimuli_recorded_not_predicted": 5, "stimuli_predicted_not_recorded": 5,
                        "sites_matched": 2, "sites_predicted": 2, "sites_recorded": 3}
    assert "partial match" in caplog.text and "10 stimuli in common" in caplog.text
    assert "5 recorded without a prediction (e.g. 'i15')" in caplog.text
    assert "5 predicted but not recorded (e.g. 'i0')" in caplog.text
    assert "2 sites in common (2 predicted, 3 recorded) (e.g. 'z')" in caplog.text
    # recorded stimuli that are expected to lack a prediction (a follow-up's natural set) stay quiet
    caplog.clear()
    full_sites = Predictions(stimulus_id=stim[:15], site_id=sites, predicted=signal[:, :15].T)
    with caplog.at_level("INFO"):
        j2 = join(full_sites, Recording(stimulus_id=stim, site_id=sites, responses=resp), unpredicted_ok=stim[15:])
    assert j2.counts["stimuli_recorded_not_predicted"] == 5 and j2.counts["stimuli_matched"] == 15
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "5 recorded stimuli without a prediction" in caplog.text
    # ... but not when something else is missing too
    caplog.clear()
    with caplog.at_level("WARNING"):
        join(full_sites, Recording(stimulus_id=stim, site_id=sites, responses=resp), unpredicted_ok=stim[16:])
    assert "partial match" in caplog.text and "5 recorded without a prediction (e.g. 'i15')" in caplog.text
    cols = [int(s[1:]) for s in j.stimulus_id]
    assert sorted(cols) == list(range(5, 15))
    np.testing.assert_array_equal(j.predicted, signal[:2, cols])
    np.testing.assert_array_equal(j.responses, resp[:2, cols])
    other = Recording(stimulus_id=np.array(["q1", "q2"]), site_id=sites, responses=resp[:, :2])
    with pytest.raises(DataError, match="share no stimulus_id"):
        join(P, other, pred_name="p.npz", rec_name="r.npz")
    nosite = Recording(stimulus_id=stim, site_id=np.array(["u", "v", "w"]), responses=resp)
    with pytest.raises(DataError, match="share no site_id"):
        join(P, nosite)


def test_min_reliability_excludes_noisy_sites():
    rng = np.random.default_rng(10)
    S, N, R = 6, 80, 4
    signal = rng.normal(0, 1, (S, N))
    noise = np.array([0.2, 0.2, 0.2, 5.0, 5.0, 0.2])[:, None, None]
    resp = signal[:, :, None] + rng.normal(0, 1, (S, N, R)) * noise
    stim = np.array([f"i{i}" for i in range(N)])
    sites = np.array([f"s{i}" for i in range(S)])
    P = Predictions(stimulus_id=stim, site_id=sites, predicted=signal.T)
    rec = Recording(stimulus_id=stim, site_id=sites, responses=resp)
    all_, _ = site_report(P, rec)
    rel, _ = site_report(P, rec, min_reliability=0.5)
    assert all_["n_sites_included"] == 6
    assert rel["n_sites_included"] == 4
    assert sorted(e["site_id"] for e in rel["excluded_sites"]) == ["s3", "s4"]
    assert all("min_reliability 0.5" in e["reason"] for e in rel["excluded_sites"])
    kept = [p["pearson_r"] for p in rel["per_site"] if p["included"]]
    assert rel["median_pearson_r"] == pytest.approx(float(np.median(kept)))
    assert rel["median_pearson_r"] > all_["median_pearson_r"]
