"""``synth record``: a simulated subject records a finished run's images as the rig would; the
file is what ``synth validate`` reads, and a run's own simulated follow-up is repeated exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from _shared import cowley_root, requires_cowley
from synth.data.recordings import Recording
from synth.runtime import file_sha256
from synth.validation.io import load_recording
from test_cli import REPO, assert_one_line_error, lab_cfg, make_lab_session, run_cli, write_cfg


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    """A tiny finished run on the virtual population (it has a simulated follow-up)."""
    from synth.cli import main

    tmp = tmp_path_factory.mktemp("record")
    run = tmp / "run"
    assert main(["run", str(write_cfg(tmp / "tiny.yaml")), "--out", str(run), "-q"]) == 0
    return run


def _same(a: Recording, b: Recording) -> bool:
    return (
        a.stimulus_id.tolist() == b.stimulus_id.tolist()
        and a.site_id.tolist() == b.site_id.tolist()
        and np.array_equal(a.responses, b.responses, equal_nan=True)
    )


def test_record_repeats_the_runs_own_followup_and_says_how(sim_run, tmp_path, capsys):
    out = tmp_path / "rig" / "followup.npz"
    code, stdout, err = run_cli(["record", sim_run, "--out", out, "-q"], capsys)
    assert code == 0, err
    assert stdout.strip().endswith(str(out))
    rec, own = Recording.load(out), Recording.load(sim_run / "followup.npz")
    assert _same(rec, own)  # same subject, seed and repeats: the run's follow-up, trial for trial
    info = json.loads((out.parent / "followup.npz.json").read_text())
    assert info["sha256"] == file_sha256(out)
    assert (info["n_natural"] + info["n_stimuli"], info["n_sites"], info["n_repeats"]) == (rec.n_stimuli, rec.n_sites, 2)
    assert info["seed"] == 3 and info["subject"]["name"] and info["versions"]["torch"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["followup.npz", "followup.npz.json"]  # no temporary files left

    # another seed draws other trials around the same expected responses; --repeats sets the trials
    other = tmp_path / "other.csv"
    code, _, err = run_cli(["record", sim_run, "--out", other, "--seed", "4", "--repeats", "3", "-q"], capsys)
    assert code == 0, err
    rec2 = load_recording(other)
    assert rec2.responses.shape == (rec.n_sites, rec.n_stimuli, 3)
    assert rec2.stimulus_id.tolist() == rec.stimulus_id.tolist()
    assert not np.array_equal(rec2.responses[:, :, :2], rec.responses)

    # --set changes the subject's params (here: no trial noise); the run's target keeps its data and sites
    quiet = tmp_path / "noise_free.npz"
    code, _, err = run_cli(["record", sim_run, "--out", quiet, "--set", "gain_noise=0", "--set", "poisson=false", "-q"], capsys)
    assert code == 0, err
    rec3 = Recording.load(quiet)
    assert rec3.site_id.tolist() == rec.site_id.tolist()
    assert np.array_equal(rec3.responses[:, :, 0], rec3.responses[:, :, 1])  # every trial the expected response
    assert not np.array_equal(rec3.responses, rec.responses)
    assert np.corrcoef(rec3.responses[:, :, 0].ravel(), rec.mean().ravel())[0, 1] > 0.8
    assert json.loads((tmp_path / "noise_free.npz.json").read_text())["subject"]["params"]["poisson"] is False


def test_record_refuses_bad_input_in_one_line_and_never_overwrites(sim_run, tmp_path, capsys):
    out = tmp_path / "f.npz"
    out.write_bytes(b"the rig's file")
    code, _, err = run_cli(["record", sim_run, "--out", out], capsys)
    assert_one_line_error(code, err, "f.npz", "never overwrites")
    assert out.read_bytes() == b"the rig's file"
    code, _, err = run_cli(["record", sim_run, "--out", tmp_path / "f.txt"], capsys)
    assert_one_line_error(code, err, "f.txt", ".npz or .csv")
    code, _, err = run_cli(["record", tmp_path, "--out", tmp_path / "g.npz"], capsys)
    assert_one_line_error(code, err, "config.resolved.yaml", "not a finished synth run folder")
    code, _, err = run_cli(["record", sim_run, "--out", tmp_path / "g.npz", "--set", "n_v4=2"], capsys)
    assert_one_line_error(code, err, "has no site", "it must record the run's sites")
    code, _, err = run_cli(["record", sim_run, "--out", tmp_path / "g.npz", "--subject", REPO / "targets" / "virtual_v4.yaml",
                            "--set", "n_v5=2"], capsys)
    assert_one_line_error(code, err, "virtual_v4.yaml", "n_v5", "did you mean")
    code, _, err = run_cli(["record", sim_run, "--out", tmp_path / "g.npz", "--repeats", "0"], capsys)
    assert_one_line_error(code, err, "--repeats", "positive")
    assert not list(tmp_path.glob("g*")) and not list(tmp_path.glob(".g*"))


def test_a_lab_run_needs_a_subject_with_its_sites(tmp_path, capsys):
    root = make_lab_session(tmp_path / "lab")
    run = tmp_path / "run"
    code, _, err = run_cli(["run", lab_cfg(tmp_path, root), "--out", run, "-q"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["record", run, "--out", tmp_path / "f.npz"], capsys)
    assert_one_line_error(code, err, "records on the rig, not in simulation", "--subject")
    code, _, err = run_cli(["record", run, "--out", tmp_path / "f.npz", "--subject", REPO / "targets" / "virtual_v4.yaml"], capsys)
    assert_one_line_error(code, err, "virtual_v4.yaml", "has no site 'e0'")
    # the lab's data changed since the run: refused, not recorded against the wrong images
    (root / "session_01" / "images" / "nat003.png").rename(root / "session_01" / "images" / "nat999.png")
    z = dict(np.load(root / "session_01" / "responses.npz"))
    z["stimulus_id"] = np.where(z["stimulus_id"] == "nat003", "nat999", z["stimulus_id"])
    np.savez(root / "session_01" / "responses.npz", **z)
    code, _, err = run_cli(["record", run, "--out", tmp_path / "f.npz", "--subject", REPO / "targets" / "virtual_v4.yaml"], capsys)
    assert_one_line_error(code, err, "natural.npz", "the natural data changed since the run")
    assert not (tmp_path / "f.npz").exists()


@requires_cowley
def test_monday_dry_run_a_lab_run_recorded_by_digital_twins_then_validated(tmp_path, capsys):
    """A lab's session (here 60 images of Cowley session 190923 in a lab's layout) -> synth run
    -> synth record with that session's twins as the subject -> synth validate."""
    from PIL import Image

    from synth.data import cowley

    src = cowley_root()
    ids, x, rec = cowley.load_session(src, "190923")  # 112 px RGB, as recorded
    keep = np.arange(60)
    lab = tmp_path / "lab" / "session_01"
    (lab / "images").mkdir(parents=True)
    for i in keep:
        Image.fromarray(np.rint(x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8), mode="RGB").save(lab / "images" / f"{ids[i]}.png")
    np.savez(lab / "responses.npz", stimulus_id=np.asarray(ids)[keep], site_id=rec.site_id, responses=rec.responses[:, keep])
    cfg = lab_cfg(tmp_path, tmp_path / "lab")
    data = yaml.safe_load(cfg.read_text())
    data["stimuli"]["one_hot"] = False  # stretch images of 33 sites are enough here
    data["data"] = {"image_size": 112, "grayscale": False}
    cfg.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    code, _, err = run_cli(["run", cfg, "--out", run, "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "followup.npz"
    code, stdout, err = run_cli(["record", run, "--out", out, "--subject", REPO / "targets" / "cowley2023.yaml",
                                 "--set", f"root={src}", "--set", "session=190923", "--repeats", "4", "-q"], capsys)
    assert code == 0, err
    got = Recording.load(out)
    assert got.site_id.tolist() == rec.site_id.tolist()
    assert got.n_stimuli == 60 + 33 and got.responses.shape[2] == 4
    assert np.all(got.responses >= 0) and np.all(got.responses == np.round(got.responses))  # Poisson spike counts
    # the twins record the lab's natural images as the recording did (calibrated units: they correlate)
    nat = got.select(stimuli=np.asarray(ids)[keep]).mean()
    r = [np.corrcoef(nat[s], rec.responses[s, keep].mean(1))[0, 1] for s in range(got.n_sites)]
    assert np.nanmedian(r) > 0.3, np.nanmedian(r)
    code, stdout, err = run_cli(["validate", "--predictions", run / "stimuli.npz", "--recordings", out, "--stimuli", run,
                                 "--out", tmp_path / "report", "--n-bootstrap", "10", "-q"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["stretch"]["n_targets"] == 33 and 0 <= report["stretch"]["fraction_above_natural_max"] <= 1
