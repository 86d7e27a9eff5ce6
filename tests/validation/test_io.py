"""Readers: long-format recording CSV, predictions npz, manifest."""

from __future__ import annotations

import numpy as np
import pytest

from synth.data.recordings import Recording
from synth.errors import DataError
from synth.validation.io import (
    Predictions,
    jsonable,
    load_recording,
    normalize_objective,
    read_manifest,
    read_recording_csv,
    write_recording_csv,
)


def test_csv_reads_repeats_in_label_order_and_skips_missing(tmp_path):
    p = tmp_path / "rec.csv"
    p.write_text(
        "site_id,stimulus_id,repeat,response,extra\n"  # any column order, extra columns ignored
        "A,img1,2,3.0,x\n"
        "A,img1,0,1.0,x\n"
        "B,img1,0,10,x\n"
        "A,img2,5,4.5,x\n"
        "\n"
        "A,img2,1,nan,x\n"  # a missing trial
        "B,img2,7,,x\n"  # a missing trial
        "B,img2,3,-2e1,x\n"
    )
    rec = read_recording_csv(p)
    assert list(rec.stimulus_id) == ["img1", "img2"] and list(rec.site_id) == ["A", "B"]
    assert rec.responses.shape == (2, 2, 2)
    np.testing.assert_array_equal(rec.responses[0, 0], [1.0, 3.0])
    np.testing.assert_array_equal(rec.responses[0, 1], [4.5, np.nan])
    np.testing.assert_array_equal(rec.responses[1, 0], [10.0, np.nan])
    np.testing.assert_array_equal(rec.responses[1, 1], [-20.0, np.nan])


def test_csv_roundtrip_equals_npz(tmp_path):
    rng = np.random.default_rng(0)
    resp = rng.normal(size=(3, 7, 5))
    resp[rng.random(resp.shape) < 0.25] = np.nan
    resp[0, 0, :] = np.nan
    resp[0, 0, 3] = 0.1 + 0.2  # a value with a long decimal expansion
    rec = Recording(stimulus_id=np.array([f"s{i}" for i in range(7)]), site_id=np.array(["u", "v", "w"]), responses=resp)
    write_recording_csv(rec, tmp_path / "r.csv")
    back = load_recording(tmp_path / "r.csv")
    assert list(back.site_id) == list(rec.site_id) and list(back.stimulus_id) == list(rec.stimulus_id)
    for s in range(3):
        for i in range(7):
            want = resp[s, i][~np.isnan(resp[s, i])]
            got = back.responses[s, i][~np.isnan(back.responses[s, i])]
            np.testing.assert_array_equal(got, want)  # bit-exact values, in repeat order


@pytest.mark.parametrize(
    "body, line, pattern",
    [
        ("stimulus_id,site_id,repeat\n", 1, "lacks column"),
        ("stimulus_id,site_id,repeat,response\na,b,0,1\na,b,x,2\n", 3, "repeat 'x' is not an integer"),
        ("stimulus_id,site_id,repeat,response\na,b,0,1\na,b,1.5,2\n", 3, "not an integer"),
        ("stimulus_id,site_id,repeat,response\na,b,-1,1\n", 2, "negative"),
        ("stimulus_id,site_id,repeat,response\na,b,0,abc\n", 2, "response 'abc' is not a number"),
        ("stimulus_id,site_id,repeat,response\na,b,0,inf\n", 2, "not finite"),
        ("stimulus_id,site_id,repeat,response\n,b,0,1\n", 2, "empty stimulus_id"),
        ("stimulus_id,site_id,repeat,response\na,,0,1\n", 2, "empty site_id"),
        ("stimulus_id,site_id,repeat,response\na,b,0\n", 2, "3 fields"),
        ("stimulus_id,site_id,repeat,response\na,b,0,1\nc,b,0,1\na,b,0,2\n", 4, "duplicate trial.*already on line 2"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, body, line, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(DataError, match=pattern) as err:
        read_recording_csv(p)
    assert str(err.value).startswith(f"{p}:{line}: ")
    assert "\n" not in str(err.value)


def test_csv_empty_and_missing(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_recording_csv(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("stimulus_id,site_id,repeat,response\n")
    with pytest.raises(DataError, match="no responses"):
        read_recording_csv(tmp_path / "h.csv")
    with pytest.raises(DataError, match="not found"):
        load_recording(tmp_path / "nope.csv")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown recording format"):
        load_recording(tmp_path / "x.txt")


def test_predictions_load_errors(tmp_path):
    np.savez(tmp_path / "p.npz", stimulus_id=np.array(["a", "b"]), site_id=np.array(["s"]), predicted=np.ones((2, 1)))
    p = Predictions.load(tmp_path / "p.npz")
    assert p.predicted.shape == (2, 1) and p.as_dict()["b"].tolist() == [1.0]
    np.savez(tmp_path / "q.npz", stimulus_id=np.array(["a", "b"]), site_id=np.array(["s"]))
    with pytest.raises(DataError, match=r"q\.npz: missing array\(s\) predicted"):
        Predictions.load(tmp_path / "q.npz")
    np.savez(tmp_path / "r.npz", stimulus_id=np.array(["a", "b"]), site_id=np.array(["s"]), predicted=np.ones((3, 1)))
    with pytest.raises(DataError, match=r"r\.npz: predicted has shape \(3, 1\)"):
        Predictions.load(tmp_path / "r.npz")
    np.savez(tmp_path / "d.npz", stimulus_id=np.array(["a", "a"]), site_id=np.array(["s"]), predicted=np.ones((2, 1)))
    with pytest.raises(DataError, match="not unique"):
        Predictions.load(tmp_path / "d.npz")
    with pytest.raises(DataError, match="not found"):
        Predictions.load(tmp_path / "none.npz")


def test_predictions_concat_joins_sites_by_id():
    a = Predictions(stimulus_id=np.array(["n1", "n2"]), site_id=np.array(["x", "y"]), predicted=[[1, 2], [3, 4]])
    b = Predictions(stimulus_id=np.array(["s1"]), site_id=np.array(["y", "x", "z"]), predicted=[[20, 10, 0]])
    c = Predictions.concat([a, b])
    assert list(c.site_id) == ["x", "y"]
    np.testing.assert_array_equal(c.predicted, [[1, 2], [3, 4], [10, 20]])


def test_manifest(tmp_path):
    p = tmp_path / "manifest.csv"
    p.write_text("stimulus_id,file,objective,target_site,seed\nst_a,st_a.png,stretch,a,1\noh_a,oh_a.png,one-hot,a,2\n")
    rows = read_manifest(p)
    assert [r["stimulus_id"] for r in rows] == ["st_a", "oh_a"] and rows[1]["objective"] == "one-hot"
    assert normalize_objective(rows[1]["objective"]) == "one_hot"
    p.write_text("stimulus_id,file,objective,target_site\nst_a,x.png,stretch,a\nst_a,y.png,stretch,b\n")
    with pytest.raises(DataError, match=r"manifest.csv:3: stimulus_id 'st_a' already on line 2"):
        read_manifest(p)
    p.write_text("stimulus_id,file,objective\nst_a,x.png,stretch\n")
    with pytest.raises(DataError, match="lacks column"):
        read_manifest(p)


def test_jsonable():
    out = jsonable({"a": np.float64(np.nan), "b": np.arange(2), "c": (np.int64(3), np.bool_(True)), "d": float("inf")})
    assert out == {"a": None, "b": [0, 1], "c": [3, True], "d": None}


def _rec(stims, sites, seed):
    rng = np.random.default_rng(seed)
    return Recording(stimulus_id=np.array(stims), site_id=np.array(sites), responses=rng.poisson(5, (len(sites), len(stims), 3)).astype(float))


def test_load_recordings_joins_files_on_common_sites(tmp_path, caplog):
    """Today's follow-up + the natural set's original recording: stimuli in file order, sites in every file."""
    from synth.validation.io import load_recordings

    a = _rec(["s1", "s2"], ["e0", "e1", "e2"], 0)
    b = _rec(["n1", "n2", "n3"], ["e2", "e0", "e9"], 1)  # another site order; e1 lost, e9 new
    a.save(tmp_path / "a.npz")
    write_recording_csv(b, tmp_path / "b.csv")
    with caplog.at_level("WARNING"):
        got = load_recordings([tmp_path / "a.npz", tmp_path / "b.csv"])
    assert got.stimulus_id.tolist() == ["s1", "s2", "n1", "n2", "n3"]
    assert got.site_id.tolist() == ["e0", "e2"]
    np.testing.assert_array_equal(got.responses[:, :2], a.responses[[0, 2]])
    np.testing.assert_array_equal(got.responses[:, 2:], b.responses[[1, 0]])
    assert "a.npz: 1 of its 3 sites" in caplog.text and "b.csv: 1 of its 3 sites" in caplog.text
    assert load_recordings([tmp_path / "a.npz"]).responses.shape == (3, 2, 3)  # one file: as it is

    _rec(["n2", "n4"], ["e0", "e2"], 2).save(tmp_path / "c.npz")
    with pytest.raises(DataError, match=r"c\.npz: stimulus_id 'n2' is also in an earlier recording file"):
        load_recordings([tmp_path / "a.npz", tmp_path / "b.csv", tmp_path / "c.npz"])
    _rec(["m1"], ["x0"], 3).save(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"d\.npz: no site_id in common with .*a\.npz"):
        load_recordings([tmp_path / "a.npz", tmp_path / "d.npz"])
