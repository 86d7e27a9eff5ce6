"""run_validate end to end: report folder, CSV == npz, refusal to overwrite, HTML in a real browser."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.errors import DataError, UserError
from synth.validation.io import Predictions, load_recording, write_recording_csv
from synth.validation.validate import build_report, closed_loop_report, run_validate

from .conftest import REPO, make_run

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
    held = rep["stretch"]["held_out_repeats"]["median_gain"]
    assert f"{held:.3f}" != f"{rep['stretch']['median_gain']:.3f}"
    lo, hi = rep["stretch"]["held_out_repeats"]["ci95"]["median_gain"]
    assert "<th>held-out repeats</th>" in html and f"<td>{held:.3f} [{lo:.3f}, {hi:.3f}]</td>" in html
    for sid in run["syn_ids"]:
        assert f'alt="{sid}"' in html


def test_csv_and_npz_give_identical_reports(tmp_path, run):
    pred = Predictions.load(tmp_path / "pred.npz")
    a, _ = build_report(pred, load_recording(tmp_path / "rec.npz"), run_dir=run["run"], n_bootstrap=30)
    b, _ = build_report(pred, load_recording(tmp_path / "rec.csv"), run_dir=run["run"], n_bootstrap=30)
    assert a == b and a["stretch"]["ci95"]["median_gain"] is not None


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


def test_closed_loop_and_synth_validate_agree_and_only_validate_warns(tmp_path, run, caplog):
    """What the pipeline merges into the run's report.json equals what `synth validate`
    writes for the same files and seed; the expected natural-only images of the follow-up
    do not make the closed loop warn, while `synth validate` reports them with counts."""
    seed = 987654321  # a derive_seed-sized seed, as the pipeline passes
    with caplog.at_level(logging.WARNING, logger="synth"):
        loop = closed_loop_report(run["run"], run["recording"], natural_ids=run["natural_ids"],
                                  n_bootstrap=25, min_reliability=0.1, seed=seed)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert loop["validation"]["matched"]["stimuli_matched"] == 12  # stimuli.npz: the synthesized images
    assert loop["validation"]["matched"]["stimuli_recorded_not_predicted"] == 40
    assert (run["run"] / "report.html").read_text().startswith("<!DOCTYPE html>")
    run["recording"].save(run["run"] / "followup.npz")  # the pipeline saves it there
    json.dumps(loop, allow_nan=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synth"):
        rep = run_validate(str(run["run"] / "stimuli.npz"), str(run["run"] / "followup.npz"), str(tmp_path / "v"),
                           str(run["run"]), min_reliability=0.1, n_bootstrap=25, seed=seed)
    assert "partial match" in caplog.text and "12 stimuli in common" in caplog.text
    assert "40 recorded without a prediction" in caplog.text
    for key in ("stretch", "one_hot", "synthetic_prediction", "natural", "bootstrap"):
        assert rep[key] == loop[key], key
    assert set(loop["validation"]) <= set(rep)
    for key, value in loop["validation"].items():
        assert rep[key] == value, key
    assert loop["validation"]["median_r2_er"] is not None and loop["stretch"]["ci95"]["median_gain"] is not None
    # a different seed changes the bootstrap intervals: the equality above is not vacuous
    other = closed_loop_report(run["run"], run["recording"], natural_ids=run["natural_ids"], n_bootstrap=25,
                               min_reliability=0.1, seed=seed + 1, html=False)
    assert other["stretch"]["ci95"] != loop["stretch"]["ci95"]
    assert other["stretch"]["median_gain"] == loop["stretch"]["median_gain"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "synth", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_validate_end_to_end(tmp_path, run):
    out = tmp_path / "cli_report"
    res = _cli("validate", "--predictions", str(tmp_path / "pred.npz"), "--recordings", str(tmp_path / "rec.csv"),
               "--out", str(out), "--stimuli", str(run["run"]), "--n-bootstrap", "20", "--seed", "3",
               "--min-reliability", "0.2")
    assert res.returncode == 0, res.stderr
    rep = _load(out)
    assert rep["settings"] == {"min_reliability": 0.2, "n_bootstrap": 20, "n_splits": 20, "seed": 3}
    printed = dict(kv.split("=") for kv in res.stdout.split("\n")[0].split())
    for k in ("median_pearson_r", "median_r2_er", "median_split_half_reliability"):
        assert float(printed[k]) == pytest.approx(rep[k], abs=5e-4)
    assert str(out) in res.stdout
    assert rep["stretch"]["n_targets"] == 6 and (out / "report.html").stat().st_size > 10_000
    # the same inputs through the library give the same report
    lib, _ = build_report(Predictions.load(tmp_path / "pred.npz"), load_recording(tmp_path / "rec.csv"), run_dir=run["run"],
                          min_reliability=0.2, n_bootstrap=20, seed=3)
    assert {k: v for k, v in rep.items() if k not in ("kind", "inputs")} == lib
    # user mistakes: exit status 2 and one line naming the file, no traceback, no folder
    bad = _cli("validate", "--predictions", str(tmp_path / "missing.npz"), "--recordings", str(tmp_path / "rec.npz"),
               "--out", str(tmp_path / "never"))
    assert bad.returncode == 2
    assert "missing.npz" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "never").exists()
    again = _cli("validate", "--predictions", str(tmp_path / "pred.npz"), "--recordings", str(tmp_path / "rec.npz"),
                 "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def _screenshot(html: Path, png: Path, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size=1200,{height}", html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )


@pytest.mark.skipif(not os.path.exists(CHROMIUM) or shutil.which(CHROMIUM) is None,
                    reason="headless check needs Chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path, run):
    """The page as a browser draws it: every figure decoded (their colours are on screen),
    grayscale stimulus thumbnails below them, nothing wider than the window."""
    rng = np.random.default_rng(0)
    for png_file in (run["run"] / "stimuli").glob("*.png"):  # grayscale stimuli, as a rig shows them
        Image.fromarray((rng.random((32, 32)) * 200 + 28).astype(np.uint8), mode="L").save(png_file)
    out = tmp_path / "report"
    run_validate(str(tmp_path / "pred.npz"), str(tmp_path / "rec.npz"), str(out), str(run["run"]), n_bootstrap=20)
    shot = tmp_path / "shot.png"
    _screenshot(out / "report.html", shot, height=4000)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (4000, 1200)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    nonwhite = (img < 240).any(axis=2)
    rows = np.flatnonzero(nonwhite.any(axis=1))
    cols = np.flatnonzero(nonwhite.any(axis=0))
    assert rows.max() < 3990, "page longer than the screenshot: raise its height"
    assert rows.max() > 1500 and cols.max() < 1190  # all sections laid out, no horizontal overflow
    hues = {
        "scatter / raw r² (blue)": (b > r + 60) & (b > g + 20),
        "r²_ER (orange)": (r > 200) & (g > 110) & (g < 200) & (b < 130),
        "bars above reference (green)": (g > r + 50) & (g > b + 50),
        "bars below reference (red)": (r > g + 90) & (r > b + 90),
    }
    for name, mask in hues.items():
        assert mask.sum() > 150, f"{name}: {mask.sum()} pixels, the figure did not render"
    # the montage: textured gray thumbnails after the figures
    gray = (np.abs(r - g) < 6) & (np.abs(g - b) < 6) & (r > 40) & (r < 215)
    first_green = np.flatnonzero(hues["bars above reference (green)"].any(axis=1)).min()
    assert gray[first_green:].sum() > 12 * 80 * 80 // 2, "stimulus thumbnails missing"
