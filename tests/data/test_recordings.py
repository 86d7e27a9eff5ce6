"""Recording: the (sites x stimuli x repeats) container joined by ids."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from synth.data.recordings import Recording
from synth.errors import DataError


def _rec(stim, sites, r, seed=0):
    rng = np.random.default_rng(seed)
    return Recording(stimulus_id=np.array(stim), site_id=np.array(sites), responses=rng.normal(size=(len(sites), len(stim), r)))


def test_mean_ignores_nan_repeats_without_warnings():
    resp = np.array([[[1.0, 3.0, np.nan], [np.nan, np.nan, np.nan]]])
    rec = Recording(stimulus_id=np.array(["a", "b"]), site_id=np.array(["s"]), responses=resp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = rec.mean()
    assert m[0, 0] == 2.0 and np.isnan(m[0, 1])
    assert rec.n_repeats().tolist() == [2, 0]


def test_concat_joins_sites_by_id_and_pads_repeats():
    a = _rec(["n1", "n2"], ["s1", "s2"], 2, seed=1)
    b = _rec(["x1"], ["s2", "s1"], 3, seed=2)
    c = a.concat(b)
    assert c.stimulus_id.tolist() == ["n1", "n2", "x1"]
    assert c.responses.shape == (2, 3, 3)
    np.testing.assert_array_equal(c.responses[:, :2, :2], a.responses)
    assert np.isnan(c.responses[:, :2, 2]).all()
    # site s1 of c is row 1 of b
    np.testing.assert_array_equal(c.select(sites=["s1"], stimuli=["x1"]).responses[0, 0], b.responses[1, 0])


def test_concat_refuses_other_sites_and_shared_stimuli():
    a = _rec(["n1"], ["s1"], 1)
    with pytest.raises(DataError, match="different sites"):
        a.concat(_rec(["x"], ["s9"], 1))
    with pytest.raises(DataError, match="in both recordings"):
        a.concat(_rec(["n1"], ["s1"], 1))


def test_bad_shapes_and_duplicates_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not match"):
        Recording(stimulus_id=np.array(["a"]), site_id=np.array(["s"]), responses=np.zeros((1, 2, 1)))
    with pytest.raises(DataError, match="not unique"):
        Recording(stimulus_id=np.array(["a", "a"]), site_id=np.array(["s"]), responses=np.zeros((1, 2, 1)))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        Recording.load(bad)
