"""run_validate end to end: report folder, CSV == npz, refusal to overwrite, HTML in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.errors import DataError, UserError
from synth.validation.io import Predictions, write_recording_csv
from synth.validation.validate import build_report, closed_loop_report, run_validate

from .conftest import make_run

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def run(tmp_path):
    d = make_run(tmp_path, n_sites=6, n_natural=40, n_repeats=5, noise=0.5, seed=0)
    d["recording"].save(tmp_path / "rec.npz")
    write_recording_csv(d["recording"], tmp_path / "rec.csv")
    # predictions for every recorded image (natural + synthesized)
    Predictions.concat([d["pred_nat"], d["pred_syn"]]).save(tmp_path / "pred.npz")
    return d


def _load(p: Path) -> dict:
    return json.loads((p / "report.json").read_text())


def test_end_to_end_writes_report_json_and_html(tmp_path, run):
    out = tmp_path / "report"
    rep = run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(out), str(run["run"]),
                       min_reliability=0.2, n_bootstrap=40, seed=1)
    assert sorted(os.listdir(out)) == ["report.html", "report.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".report")]  # no temp folder left
    on_disk = _load(out)
    assert on_disk == rep
    for k in ("median_pearson_r", "median_r2_er", "median_split_half_reliability"):
        assert isinstance(rep[k], float)
    assert rep["matched"]["stimuli_matched"] == 40 + 12 and rep["matched"]["sites_matched"] == 6
    assert len(rep["per_site"]) == 6 and set(rep["per_site"][0]) >= {
        "site_id", "pearson_r", "r2_er", "split_half_reliability", "n_images", "included"}
    assert rep["median_pearson_r"] > 0.8  # the model is the signal, rescaled
    assert rep["stretch"]["fraction_above_natural_max"] == 0.5
    assert rep["stretch"]["ci95"]["median_gain"][0] <= rep["stretch"]["median_gain"] <= rep["stretch"]["ci95"]["median_gain"][1]
    assert rep["one_hot"]["predicted"]["median_score_ratio"] is not None
    assert rep["synthetic_prediction"]["median_site_r"] > 0.8
    assert rep["inputs"]["sha256"][str(tmp_path / "rec.npz")]
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "</html>" in html
    n_png = len(re.findall(r'src="data:image/png;base64,', html))
    assert n_png == 4 + 12  # scatter, ceiling, stretch, one-hot + one thumbnail per stimulus
    assert "target site03" in html and "http://" not in html and "https://" not in html
    for sid in run["syn_ids"]:
        assert f'alt="{sid}"' in html


def test_csv_and_npz_give_identical_reports(tmp_path, run):
    a = run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(tmp_path / "A"), str(run["run"]), n_bootstrap=30)
    b = run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.csv"), str(tmp_path / "B"), str(run["run"]), n_bootstrap=30)
    a.pop("inputs")
    b.pop("inputs")
    assert a == b


def test_shuffled_recording_gives_identical_report(tmp_path, run):
    from synth.data.recordings import Recording

    rec = run["recording"]
    rng = np.random.default_rng(0)
    ps, pt = rng.permutation(rec.n_stimuli), rng.permutation(rec.n_sites)
    shuffled = Recording(stimulus_id=rec.stimulus_id[ps], site_id=rec.site_id[pt], responses=rec.responses[pt][:, ps])
    pred = Predictions.load(tmp_path / "pred.npz")
    a, _ = build_report(pred, rec, run_dir=run["run"], n_bootstrap=20)
    b, _ = build_report(pred, shuffled, run_dir=run["run"], n_bootstrap=20)
    assert a == b and a["stretch"]["n_targets"] == 6


def test_refuses_non_empty_out_and_accepts_empty(tmp_path, run):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(out))
    assert os.listdir(out) == ["keep.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(tmp_path / "afile"))
    empty = tmp_path / "empty"
    empty.mkdir()
    run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(empty), n_bootstrap=0)
    assert (empty / "report.json").exists()


def test_bad_inputs_leave_nothing_behind(tmp_path, run):
    other = Predictions(stimulus_id=np.array(["zz1", "zz2"]), site_id=np.array(["site00"]), predicted=np.ones((2, 1)))
    other.save(tmp_path / "other.npz")
    with pytest.raises(DataError, match="share no stimulus_id"):
        run_validate(str(tmp_path / "other.npz"), str(tmp_path / "rec.npz"), str(tmp_path / "o1"))
    with pytest.raises(UserError, match="not a folder"):
        run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(tmp_path / "o2"), str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="n-bootstrap"):
        run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(tmp_path / "o3"), n_bootstrap=-1)
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_closed_loop_report_for_the_pipeline(tmp_path, run):
    out = closed_loop_report(run["run"], run["recording"], natural_ids=run["natural_ids"], n_bootstrap=20, seed=0)
    assert set(out) >= {"stretch", "one_hot", "synthetic_prediction", "validation"}
    assert out["validation"]["matched"]["stimuli_matched"] == 12  # stimuli.npz: the synthesized images
    assert (run["run"] / "report.html").exists()
    json.dumps(out, allow_nan=False)
    # the same figures as `synth validate --predictions RUN/stimuli.npz --stimuli RUN`
    rep, _ = build_report(Predictions.load(run["run"] / "stimuli.npz"), run["recording"], run_dir=run["run"], n_bootstrap=20, seed=0)
    assert rep["stretch"] == out["stretch"] and rep["one_hot"] == out["one_hot"]
    assert rep["median_r2_er"] == out["validation"]["median_r2_er"]


def _screenshot(html: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2400", html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )


@pytest.mark.skipif(not os.path.exists(CHROMIUM) or shutil.which(CHROMIUM) is None,
                    reason="headless check needs Chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path, run):
    out = tmp_path / "report"
    run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(out), str(run["run"]), n_bootstrap=20)
    png = tmp_path / "shot.png"
    _screenshot(out / "report.html", png)
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert img.shape[0] >= 2000 and img.shape[1] >= 1100
    nonwhite = (img < 240).any(axis=2)
    assert nonwhite.mean() > 0.03  # text, plots and thumbnails, not a blank page
    assert img.std() > 20
    # something drawn in the plot area well below the header (the figures loaded)
    assert nonwhite[600:1600].mean() > 0.02
    # colour present (plot markers / thumbnails), not only black text
    sat = img.max(axis=2) - img.min(axis=2)
    assert (sat > 60).mean() > 0.005
