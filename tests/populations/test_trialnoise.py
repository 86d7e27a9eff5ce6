"""Trial-noise models of simulated recordings: measured Fano factors and count draws."""

from __future__ import annotations

import numpy as np
import pytest

from _shared import cowley_root, requires_cowley
from synth.populations.trialnoise import FanoTable, draw_counts, measure_fano


def _binomial_trials(means: np.ndarray, fano: float, n_rep: int, seed: int) -> np.ndarray:
    """(S, N, R) counts with the given means and Fano factor < 1 (binomial)."""
    rng = np.random.default_rng(seed)
    trials = np.round(means / (1 - fano)).astype(np.int64)
    return rng.binomial(trials[..., None], (means / trials)[..., None], size=means.shape + (n_rep,)).astype(float)


def test_measure_fano_recovers_poisson_and_binomial_spread():
    means = np.random.default_rng(0).uniform(0.3, 10.0, size=(40, 300))
    poisson = np.random.default_rng(1).poisson(means[..., None], size=means.shape + (10,)).astype(float)
    t = measure_fano(poisson, source="toy")
    positive = int((poisson.mean(axis=2) > 0).sum())  # pairs with no spike at all carry no spread
    assert t.source == "toy" and len(t.mean) >= 5 and sum(t.n) <= positive < means.size
    assert sum(measure_fano(poisson, min_pairs=1).n) == positive  # sparse top bins dropped above
    np.testing.assert_allclose(t.fano, 1.0, atol=0.08)
    b = measure_fano(_binomial_trials(means + 2.0, 0.6, 10, 2))  # >= 5 Bernoulli trials: little rounding
    np.testing.assert_allclose(b.fano, 0.6, atol=0.06)
    # two recordings pool into one table; NaN-padded trials are ignored
    padded = poisson.copy()
    padded[:, ::2, 7:] = np.nan
    both = measure_fano([padded, poisson[:5]])
    assert sum(measure_fano([padded, poisson[:5]], min_pairs=1).n) == int((np.nanmean(padded, axis=2) > 0).sum() + (poisson[:5].mean(axis=2) > 0).sum())
    np.testing.assert_allclose(both.fano, 1.0, atol=0.08)


def test_measure_fano_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(sites, images, repeats\)"):
        measure_fano(np.ones((3, 4)))
    with pytest.raises(ValueError, match="no mean-count bin"):
        measure_fano(np.ones((2, 3, 4)))  # 6 pairs: fewer than min_pairs
    one_trial = np.full((10, 10, 3), np.nan)
    one_trial[..., 0] = 2.0
    with pytest.raises(ValueError, match="no mean-count bin"):
        measure_fano(one_trial)


def test_fano_table_checks_and_interpolates():
    t = FanoTable(mean=(1.0, 3.0), fano=(1.0, 0.6), n=(100, 100))
    np.testing.assert_allclose(t.at(np.array([0.0, 1.0, 2.0, 3.0, 50.0])), [1.0, 1.0, 0.8, 0.6, 0.6])
    assert t.as_dict()["fano"] == [1.0, 0.6]
    with pytest.raises(ValueError, match="increase"):
        FanoTable(mean=(3.0, 1.0), fano=(1.0, 1.0), n=(1, 1))
    with pytest.raises(ValueError, match="> 0"):
        FanoTable(mean=(1.0,), fano=(0.0,), n=(1,))
    with pytest.raises(ValueError, match="non-empty"):
        FanoTable(mean=(), fano=(), n=())


@pytest.mark.parametrize("fano", [0.55, 1.0, 1.6])
def test_draw_counts_has_the_table_mean_and_variance(fano):
    t = FanoTable(mean=(0.5, 20.0), fano=(fano, fano), n=(100, 100))
    for mu in (0.4, 2.5, 9.0):
        c = draw_counts(np.full(40000, mu), 2, np.random.default_rng(3), t)
        assert c.shape == (40000, 2) and np.all(c == np.round(c)) and c.min() >= 0
        assert c.mean() == pytest.approx(mu, rel=0.03)
        # binomial draws take a whole number of Bernoulli trials: the variance lands within a
        # trial's rounding of the target (largest at small means)
        want = mu * (1 - mu / max(np.ceil(mu), np.round(mu / (1 - fano)))) if fano < 1 else fano * mu
        assert c.var() == pytest.approx(want, rel=0.06)
    zero = draw_counts(np.zeros(5), 3, np.random.default_rng(0), t)
    assert not zero.any()


def test_draw_counts_without_table_is_the_poisson_draw():
    mean = np.array([[0.5, 3.0], [7.0, 0.0]])
    a = draw_counts(mean, 4, np.random.default_rng(9))
    b = np.random.default_rng(9).poisson(mean[..., None], size=(2, 2, 4))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="n_repeats"):
        draw_counts(mean, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= 0"):
        draw_counts(-mean, 2, np.random.default_rng(0))


@requires_cowley
def test_measured_on_the_real_single_trials():
    """V4 multi-unit counts of 210325 are under-dispersed, the more so at high counts."""
    from synth.data import cowley
    from synth.populations.twins import measured_fano, raw_sessions

    root = cowley_root()
    assert raw_sessions(root) == ["210325"]
    t = measured_fano(root)
    assert "210325: 50 sites x 640 images" in t.source
    raw = cowley.load_raw(root, "210325").responses
    assert sum(t.n) == int((np.nanmean(raw, axis=2) > 0).sum())
    assert t.fano[0] > 0.9 and t.fano[-1] < 0.7 and np.all(np.diff(t.fano) < 0.02)
