"""The command line end to end: bad input is refused in one line, runs are never half-written,
an interrupted run resumes to the same result, and a finished run repeats from its resolved config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml

from _shared import closest_natural
from synth.cli import main

REPO = Path(__file__).resolve().parents[1]

#: A closed loop small enough for CI (seconds on one core): 6 sites, 120 natural images, 32 px.
TINY = {
    "name": "tiny",
    "seed": 3,
    "device": "cpu",
    "target": {"file": str(REPO / "targets" / "virtual_v4.yaml"), "params": {"n_v4": 5, "n_it": 1, "n_images": 120, "n_repeats": 2}},
    "data": {"image_size": 32, "grayscale": True},
    "fit": {"epochs": 2, "input_size": 0, "backbone_kwargs": {"channels": 8, "n_layers": 2}},
    "stimuli": {"batch_size": 4},
    "synthesis": {"steps": 6, "batch_size": 4, "stopping": {"rule": "fixed"}},
    "followup": {"n_repeats": 2},
    "validate": {"n_bootstrap": 10},
}


def write_cfg(path: Path, data: dict | None = None, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY if data is None else data))
    for k, v in changes.items():
        node = cfg
        *head, last = k.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles, status=2):
    assert code == status, err
    # log lines (HH:MM:SS LEVEL ...) may precede it; the error itself is one line
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not re.match(r"^\d\d:\d\d:\d\d (INFO|WARNING|DEBUG) ", ln)]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------- bad configs
BAD_YAML = [
    ("syntax", b"name: x\nfit: {epochs: 3\n", "YAML syntax error at line"),
    ("empty", b"", "empty file"),
    ("list", b"- name: x\n- seed: 1\n", "expected a mapping of config sections, got list"),
    ("binary", bytes(range(256)) * 4, "not a text file"),
    ("scalar", b"42\n", "expected a mapping of config sections, got int"),
]


@pytest.mark.parametrize("name,body,needle", BAD_YAML, ids=[b[0] for b in BAD_YAML])
def test_malformed_yaml_is_one_line_and_leaves_nothing(tmp_path, capsys, name, body, needle):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_bytes(body)
    out = tmp_path / "run"
    code, _, err = run_cli(["run", cfg, "--out", out], capsys)
    assert_one_line_error(code, err, str(cfg), needle)
    assert not out.exists() and not out.with_name("run.partial").exists()


BAD_VALUES = [
    ({"fit__epocks": 3}, "fit: unknown key 'epocks'", "did you mean 'epochs'"),
    ({"fit__epochs": "many"}, "fit.epochs", "expected an integer"),
    ({"synthesis__steps": 0}, "synthesis.steps", ">= 1"),
    ({"device": "tpu"}, "device", "unknown device 'tpu'"),
    ({"fit__backbone": "alexnett"}, "fit.backbone", "did you mean 'alexnet'"),
    ({"synthesis__transforms": [{"name": "jiter"}]}, "synthesis.transforms[0]", "did you mean 'jitter'"),
    ({"synthesis__objectives": {"one_hot": {"name": "one_hott"}}}, "synthesis.objectives.one_hot", "one_hot"),
    ({"fit__split": {"train": 0.9, "val": 0.1, "test": 0.1}}, "fit.split", "add up to 1"),
    ({"target__file": "targets/nope.yaml"}, "bad.yaml: target.file", "not found"),
    ({"data__image_size": 8}, "data.image_size", ">= 16"),
]


@pytest.mark.parametrize("changes,key,needle", BAD_VALUES, ids=[v[1] for v in BAD_VALUES])
def test_bad_values_name_file_key_and_expectation(tmp_path, capsys, changes, key, needle):
    cfg = write_cfg(tmp_path / "bad.yaml", **changes)
    out = tmp_path / "run"
    code, _, err = run_cli(["run", cfg, "--out", out], capsys)
    assert_one_line_error(code, err, key, needle)
    assert not out.exists() and not out.with_name("run.partial").exists()
    # `synth check` refuses the same config the same way
    code, _, err2 = run_cli(["check", cfg], capsys)
    assert_one_line_error(code, err2, key)


def test_set_overrides_are_validated_like_the_file(tmp_path, capsys):
    cfg = write_cfg(tmp_path / "ok.yaml")
    code, out, _ = run_cli(["check", cfg, "--set", "synthesis.steps=9", "--print"], capsys)
    assert code == 0 and yaml.safe_load(out.rsplit("\n", 2)[0])["synthesis"]["steps"] == 9
    # a dotted key changes one argument of a defaulted component, keeping the rest
    code, out, _ = run_cli(["check", cfg, "--set", "synthesis.param.decay_power=2.5", "--print"], capsys)
    param = yaml.safe_load(out.rsplit("\n", 2)[0])["synthesis"]["param"]
    assert code == 0 and param["name"] == "fourier" and param["decay_power"] == 2.5
    for item, needle in [
        ("synthesis.param.decay_powr=2", "decay_powr"),
        ("synthesis.steps=-1", "synthesis.steps"),
        ("synthesis.stepz=3", "did you mean 'steps'"),
        ("nodots", "--set expects dotted.key=value"),
        ("seed.x=1", "'seed' is not a section"),
    ]:
        code, _, err = run_cli(["check", cfg, "--set", item], capsys)
        assert_one_line_error(code, err, needle)


def test_unavailable_cuda_and_existing_out_are_refused(tmp_path, capsys):
    import torch

    cfg = write_cfg(tmp_path / "ok.yaml")
    if not torch.cuda.is_available():
        code, _, err = run_cli(["run", cfg, "--device", "cuda", "--out", tmp_path / "r"], capsys)
        assert_one_line_error(code, err, "CUDA is not available")
        assert not (tmp_path / "r").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = run_cli(["run", cfg, "--out", existing], capsys)
    assert_one_line_error(code, err, "already exists", "never overwrites")
    assert (existing / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    cfg = write_cfg(tmp_path / "bad.yaml", fit__epochs="many")
    from synth.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["run", str(cfg), "--debug"])


@pytest.mark.parametrize("argv", [[], ["run"], ["check"], ["validate"], ["record"], ["bench", "synthesis"], ["bench", "ceiling"], ["bench", "gradients"], ["bench", "redraw"], ["bench", "choice"], ["bench", "teachers"], ["data", "fetch"]])
def test_help_for_every_command(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: synth") and len(out.splitlines()) > 3


def test_bench_teachers_errors_are_one_line(tmp_path, capsys):
    code, out, err = run_cli(["bench", "teachers", str(tmp_path), "--session", "190923"], capsys)
    assert_one_line_error(code, err, "no compact models for session 190923")
    code, out, err = run_cli(["bench", "teachers", str(tmp_path), "--session", "190923", "--images", "0"], capsys)
    assert_one_line_error(code, err, "--images", "positive")
    code, out, err = run_cli(["bench", "teachers", str(tmp_path), "--session", "190923", "--layers", "layer9"], capsys)
    assert_one_line_error(code, err, "--layers", "layer9")


def test_bench_ceiling_needs_a_target_with_twins(tmp_path, capsys):
    cfg = write_cfg(tmp_path / "tiny.yaml")
    code, out, err = run_cli(["bench", "ceiling", cfg], capsys)
    assert_one_line_error(code, err, "tiny.yaml", "has no digital twins")
    code, out, err = run_cli(["bench", "ceiling", cfg, "--sites", "0"], capsys)
    assert_one_line_error(code, err, "--sites", "positive")


# --------------------------------------------------------------------------- lab data problems
def make_lab_session(root: Path, *, n: int = 40, sites: int = 3, size: int = 32, seed: int = 0, session: str = "session_01") -> Path:
    """A small lab session in the layout of targets/lab_example.yaml."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = root / session / "images"
    img_dir.mkdir(parents=True)
    ids = [f"nat{i:03d}" for i in range(n)]
    imgs = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    for sid, a in zip(ids, imgs):
        Image.fromarray(a, mode="L").save(img_dir / f"{sid}.png")
    drive = imgs.reshape(n, -1).astype(float).mean(1) / 255.0
    resp = rng.poisson(lam=np.clip(5 + 10 * np.outer(np.arange(1, sites + 1), drive), 0, None)[:, :, None] * np.ones((1, 1, 3))).astype(float)
    np.savez(root / session / "responses.npz", stimulus_id=np.array(ids), site_id=np.array([f"e{k}" for k in range(sites)]), responses=resp)
    return root


def lab_cfg(tmp_path: Path, root: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "lab_recordings.yaml").read_text())
    data["target"]["file"] = str(REPO / "targets" / "lab_example.yaml")
    data["target"]["root"] = str(root)
    data.update({"device": "cpu", "data": {"image_size": 32, "grayscale": True}})
    data["fit"].update({"epochs": 2, "input_size": 0, "backbone_kwargs": {"channels": 8, "n_layers": 2}, "split": {"train": 0.6, "val": 0.2, "test": 0.2}})
    data["stimuli"].update({"seeds_per_target": 1, "batch_size": 4})
    data["synthesis"] = {"steps": 4, "batch_size": 4, "stopping": {"rule": "fixed"}}
    return write_cfg(tmp_path / "lab.yaml", data)


def _break_missing(root):
    (root / "session_01" / "images" / "nat005.png").unlink()
    return "nat005", "no image file"


def _break_corrupt(root):
    (root / "session_01" / "images" / "nat007.png").write_bytes(b"\x89PNG garbage")
    return "nat007.png", "cannot read image"


def _break_size(root):
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8), mode="L").save(root / "session_01" / "images" / "nat001.png")
    return "nat001.png", "expected 32x32"


def _break_mode(root):
    from PIL import Image

    a = np.zeros((32, 32, 3), np.uint8)
    a[..., 0] = 200
    Image.fromarray(a, mode="RGB").save(root / "session_01" / "images" / "nat002.png")
    return "nat002.png", "colour image"


def _break_nan(root):
    p = root / "session_01" / "responses.npz"
    z = dict(np.load(p))
    z["responses"][1, 3, :] = np.nan
    np.savez(p, **z)
    return "responses.npz", "NaN"


def _break_shape(root):
    p = root / "session_01" / "responses.npz"
    z = dict(np.load(p))
    z["responses"] = z["responses"][:, :-1]
    np.savez(p, **z)
    return "responses.npz", "does not match"


def _break_inf(root):
    p = root / "session_01" / "responses.npz"
    z = dict(np.load(p))
    z["responses"][0, 0, 0] = np.inf
    np.savez(p, **z)
    return "responses.npz", "inf"


def _break_not_npz(root):
    (root / "session_01" / "responses.npz").write_text("not an archive")
    return "responses.npz", ""


BREAKS = [_break_missing, _break_corrupt, _break_size, _break_mode, _break_nan, _break_shape, _break_inf, _break_not_npz]


@pytest.mark.parametrize("brk", BREAKS, ids=[b.__name__[7:] for b in BREAKS])
def test_data_problems_caught_before_work_starts(tmp_path, capsys, brk):
    root = make_lab_session(tmp_path / "lab")
    needle_file, needle = brk(root)
    cfg = lab_cfg(tmp_path, root)
    out = tmp_path / "run"
    code, _, err = run_cli(["run", cfg, "--out", out], capsys)
    assert_one_line_error(code, err, needle_file, needle)
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_lab_recordings_config_writes_a_stimulus_set_for_the_rig(tmp_path, capsys):
    root = make_lab_session(tmp_path / "lab")
    cfg = lab_cfg(tmp_path, root)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", cfg, "--out", out, "-q"], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    z = np.load(out / "stimuli.npz")
    assert z["predicted"].shape == (6, 3)  # 3 sites x (stretch + one-hot)
    assert sorted(p.name for p in (out / "stimuli").glob("*.png")) == sorted(f"{s}.png" for s in z["stimulus_id"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["followup"] is None and rep["fit"]["n_sites"] == 3
    code, _, err = run_cli(["bench", "gradients", out], capsys)
    assert_one_line_error(code, err, "config.resolved.yaml", "has no differentiable model of its sites")
    code, _, err = run_cli(["bench", "redraw", out], capsys)
    assert_one_line_error(code, err, "config.resolved.yaml", "records on the rig (no simulated recorder to redraw)")


def test_lab_core_trains_on_the_labs_other_sessions(tmp_path, capsys, monkeypatch):
    """A lab's root with three sessions: today's gets a readout on a core of the other two, cached."""
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "lab"
    for k, s in enumerate(("2026-11-30", "2026-12-01", "2026-12-07")):
        make_lab_session(root, session=s, seed=k, sites=2 + k)
    (root / "notes").mkdir()  # not a session: no responses file
    data = yaml.safe_load((REPO / "configs" / "lab_sessions.yaml").read_text())  # the shipped config, made tiny
    data["target"].update(file=str(REPO / "targets" / "lab_example.yaml"), root=str(root), session="2026-12-07")
    data.update({"device": "cpu", "data": {"image_size": 32, "grayscale": True}})
    data["fit"].update(epochs=2, split={"train": 0.6, "val": 0.2, "test": 0.2})
    data["fit"]["core"].update(backbone_kwargs={"channels": 4, "n_layers": 2}, input_size=32, epochs=2, batch_size=8, precision="fp32")
    assert len(data["fit"]["ensemble"]) == 1  # the shipped member core, made tiny too
    data["fit"]["ensemble"][0]["core"].update(input_size=16, epochs=1)
    data["stimuli"].update(seeds_per_target=1, batch_size=4)
    data["synthesis"].update(steps=4, batch_size=4, precision="fp32")
    cfg = write_cfg(tmp_path / "lab_core.yaml", data)
    code, _, err = run_cli(["run", cfg, "--out", tmp_path / "run1", "-q"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert rep["core"]["cache"] == "miss" and rep["core"]["sessions"] == ["2026-11-30", "2026-12-01"]
    assert rep["core"]["excluded_session"] == "2026-12-07" and rep["core"]["distill_twins"] == []
    assert rep["core"]["data"]["sessions"] == {"2026-11-30": {"images": 40, "sites": 2}, "2026-12-01": {"images": 40, "sites": 3}}
    assert rep["fit"]["n_sites"] == 4  # today's session's sites, on the core of the other two
    (member,) = rep["ensemble_cores"]  # the member's own core, on the same sessions
    assert member["cache"] == "miss" and member["sessions"] == rep["core"]["sessions"] and member["key"] != rep["core"]["key"]
    assert len(rep["fit"]["ensemble"]) == 2
    code, _, err = run_cli(["run", cfg, "--out", tmp_path / "run2", "-q"], capsys)
    assert code == 0, err
    rep2 = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert rep2["core"]["cache"] == "hit" and rep2["core"]["key"] == rep["core"]["key"]
    assert rep2["ensemble_cores"][0]["cache"] == "hit"
    # a changed image of a past session is new training data: a new core
    from PIL import Image

    Image.fromarray(np.full((32, 32), 7, np.uint8), mode="L").save(root / "2026-11-30" / "images" / "nat000.png")
    code, _, err = run_cli(["run", cfg, "--out", tmp_path / "run3", "-q"], capsys)
    assert code == 0, err
    rep3 = json.loads((tmp_path / "run3" / "report.json").read_text())
    assert rep3["core"]["cache"] == "miss" and rep3["core"]["key"] != rep["core"]["key"]
    # choosing a past session as today's is refused when the core is told to use it
    code, _, err = run_cli(["run", cfg, "--out", tmp_path / "run4", "--set", "fit.core.sessions=[2026-12-07]"], capsys)
    assert_one_line_error(code, err, "fit.core.sessions", "evaluated session 2026-12-07")
    # without a session, the templated target says which key to set
    code, _, err = run_cli(["run", cfg, "--out", tmp_path / "run5", "--set", "target.session=null"], capsys)
    assert_one_line_error(code, err, "target.session", "choose today's session")
    assert not (tmp_path / "run4").exists() and not (tmp_path / "run5").exists()


def test_auto_weights_on_a_single_session_lab_target_is_one_line(tmp_path, capsys):
    root = make_lab_session(tmp_path / "lab")
    data = yaml.safe_load(lab_cfg(tmp_path, root).read_text())
    data["fit"].update(backbone="pretrained_core", weights="auto", backbone_kwargs={}, input_size=None)
    code, _, err = run_cli(["run", write_cfg(tmp_path / "c.yaml", data), "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "fit.weights", "{session} in params.images and params.responses")


# --------------------------------------------------------------------------- end to end
def _report_without_timing(run: Path) -> dict:
    rep = json.loads((run / "report.json").read_text())
    rep.pop("timing")
    rep["fit"]["details"].pop("train_seconds", None)
    return rep


def _pngs(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "stimuli").glob("*.png"))}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_cfg(tmp / "tiny.yaml")
    run = tmp / "run"
    code = main(["run", str(cfg), "--out", str(run), "-q"])
    assert code == 0
    return cfg, run


def test_run_folder_has_everything_a_lab_needs(tiny_run):
    _, run = tiny_run
    for name in ("config.resolved.yaml", "provenance.json", "report.json", "report.html", "manifest.csv", "stimuli.npz", "followup.npz", "run.log"):
        assert (run / name).is_file(), name
    assert not (run / "RUNNING").exists()
    rep = json.loads((run / "report.json").read_text())
    for key in ("median_r_test", "n_sites", "n_train_images", "n_test_images"):
        assert key in rep["fit"]
    for sec, key in (("stretch", "fraction_above_natural_max"), ("stretch", "median_gain"), ("one_hot", "median_score_ratio"),
                     ("one_hot", "fraction_beating_best_natural"), ("synthetic_prediction", "median_site_r")):
        assert np.isfinite(rep[sec][key]), (sec, key)
    assert set(rep["timing"]) >= {"record", "fit", "synthesize", "followup", "validate"} and rep["device"] == "cpu"
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 3 and "torch" in prov["versions"] and prov["device"] == "cpu"
    assert prov["synthesis_precision"] == "fp32"  # the config's default
    assert any(k.endswith("virtual_v4.yaml") for k in prov["inputs_sha256"])
    assert len((run / "manifest.csv").read_text().strip().splitlines()) == 1 + 12  # 6 sites x 2 kinds
    # the loss / objective / target-response history of every image, step by step
    with np.load(run / "synthesis_history.npz") as h:
        assert set(h["stimulus_id"]) == set(np.load(run / "stimuli.npz")["stimulus_id"])
        assert {"loss", "objective", "target_response"} <= set(h.files)
        assert h["loss"].shape == (12, TINY["synthesis"]["steps"])
        assert np.isfinite(h["loss"][:, 0]).all()


def test_noise_free_figures_are_the_recorders_expected_responses(tiny_run):
    """report.json → noise_free: stretch / one-hot outcomes from the simulated sites' true rates."""
    from synth.config import load_config
    from synth.data.stimuli import read_stimulus_set
    from synth.pipeline import load_target
    from synth.runtime import derive_seed
    from synth.validation.io import read_manifest

    _, run = tiny_run
    rep = json.loads((run / "report.json").read_text())["noise_free"]
    cfg = load_config(run / "config.resolved.yaml")
    target = load_target(cfg)
    nat = target.natural(image_size=cfg.data.image_size, grayscale=cfg.data.grayscale, seed=derive_seed(cfg.seed, "natural"))
    rec = target.recorder()
    nat_max = rec.expected(nat.images).numpy().max(0)
    stim = read_stimulus_set(run)
    resp = dict(zip(stim.stimulus_id, rec.expected(stim.images).numpy()))
    sites = list(rec.site_ids)
    best: dict[str, float] = {}
    for row in read_manifest(run / "manifest.csv"):
        if row["objective"] == "stretch":
            t = sites.index(row["target_site"])
            best[t] = max(best.get(t, -np.inf), resp[row["stimulus_id"]][t])
    frac = np.mean([best[t] > nat_max[t] for t in best])
    gain = np.median([best[t] / nat_max[t] - 1 for t in best])
    assert rep["stretch"]["fraction_above_natural_max"] == pytest.approx(frac)
    assert rep["stretch"]["median_gain"] == pytest.approx(gain, rel=1e-5)
    assert np.isfinite(rep["one_hot"]["median_score_ratio"]) and "no trial noise" in rep["note"]


def test_resolved_config_repeats_the_run_exactly(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    again = tmp_path / "again"
    code, _, err = run_cli(["run", run / "config.resolved.yaml", "--out", again, "-q"], capsys)
    assert code == 0, err
    assert _pngs(again) == _pngs(run)
    assert _report_without_timing(again) == _report_without_timing(run)


def test_resume_refuses_finished_and_foreign_folders(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    code, _, err = run_cli(["run", "--resume", run], capsys)
    assert_one_line_error(code, err, "already complete")
    code, _, err = run_cli(["run", "--resume", tmp_path], capsys)
    assert_one_line_error(code, err, "not an unfinished synth run folder")


#: the same thread count in every process, so CPU results are bit-identical between them
ENV = dict(os.environ, SYNTH_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _synth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synth", *args, "-q"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def _default_sigint() -> None:
    # A test runner started in the background (`cmd &` in a script) ignores SIGINT, and the
    # child would inherit that; Ctrl-C is what this test simulates, so restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cfg: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "synth", "run", str(cfg), "--out", str(out), "-q"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_default_sigint)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["crash", "ctrl-c"])
def test_killed_mid_synthesis_leaves_no_finished_folder_and_resumes_identically(tmp_path, sig):
    # enough synthesis steps that the kill lands after the first of three checkpoints
    cfg = write_cfg(tmp_path / "tiny.yaml", synthesis__steps=40)
    ref = tmp_path / "ref"
    res = _synth("run", str(cfg), "--out", str(ref))
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    partial = out.with_name("run.partial")
    proc = _start(cfg, out)
    first = partial / "checkpoints" / "synthesis_batch_0000.npz"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert first.exists(), proc.communicate()[1].decode()[-2000:]
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists(), "an interrupted run must not look finished"
    assert partial.is_dir() and (partial / "RUNNING").exists() and not (partial / "report.json").exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"interrupted" in proc.stderr.read()
    done = sorted(p.name for p in (partial / "checkpoints").glob("synthesis_batch_*.npz"))
    assert 1 <= len(done) < 3, done

    res = _synth("run", "--resume", str(partial))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(out)
    assert out.is_dir() and not partial.exists() and not (out / "RUNNING").exists()
    assert _pngs(out) == _pngs(ref)
    assert _report_without_timing(out) == _report_without_timing(ref)


def _figures(out: str) -> dict[str, tuple[float, ...]]:
    """`synth bench gradients` lines -> {model: (pixel, parameter)} and {"gradient_alignment": (x,)}."""
    figs = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+): median over sites of the median cosine: pixel (-?[\d.]+), parameter (-?[\d.]+)$", line)
        if m:
            figs[m.group(1)] = (float(m.group(2)), float(m.group(3)))
        elif line.startswith("gradient_alignment: "):
            figs["gradient_alignment"] = (float(line.split(": ")[1]),)
    return figs


def test_bench_gradients_on_a_finished_run(tiny_run, tmp_path, capsys):
    """The printed alignment is the library's, for the run's surrogate, test images and parameterization."""
    from synth.config import load_config
    from synth.pipeline import load_natural, load_target
    from synth.populations.alignment import gradient_alignment
    from synth.surrogate import Surrogate
    from synth.synthesis.params import PARAMS

    _, run = tiny_run
    code, out, err = run_cli(["bench", "gradients", run, "--images", "5", "--sites", "3", "-q"], capsys)
    assert code == 0, err
    figs = _figures(out)
    assert set(figs) == {"surrogate.pt", "gradient_alignment"}, out
    cfg = load_config(run / "config.resolved.yaml")
    target = load_target(cfg)
    nat, splits = load_natural(cfg, target)
    param = PARAMS.build(cfg.synthesis.param, key="p", channels=1, size=32)
    want = gradient_alignment({"s": Surrogate.load(run / "surrogate.pt")}, target.recorder().site_model,
                              nat.images[splits.test[:5]], sites=range(3), param=param)
    assert figs["surrogate.pt"] == (round(want.median("s", "pixel"), 3), round(want.median("s"), 3))
    assert figs["gradient_alignment"] == (round(want.median("s"), 3),)
    # the run's stretch outcomes split the compared sites
    per = json.loads((run / "report.json").read_text())["stretch"]["per_target"]
    n_targets = sum(t["target_site"] in list(target.site_ids[:3]) for t in per)
    counts = [int(m) for m in re.findall(r"stretch outcome in report.json: (\d+) sites", out)]
    assert sum(counts) == n_targets > 0
    # at the run's own stretch images (spread over the set) instead
    from synth.data.stimuli import read_stimulus_set

    code, out, err = run_cli(["bench", "gradients", run, "--images", "4", "--sites", "2", "--at", "stretch", "-q"], capsys)
    assert code == 0, err
    stim = read_stimulus_set(run)
    rows = np.flatnonzero(np.asarray(stim.column("objective")) == "stretch")
    assert rows.size > 4
    rows = rows[np.unique(np.linspace(0, rows.size - 1, 4).round().astype(int))]
    assert "4 of the run's stretch images" in out.splitlines()[0]
    want = gradient_alignment({"s": Surrogate.load(run / "surrogate.pt")}, target.recorder().site_model, stim.images[rows], sites=range(2), param=param)
    assert _figures(out)["gradient_alignment"] == (round(want.median("s"), 3),)
    # bad input
    code, _, err = run_cli(["bench", "gradients", tmp_path], capsys)
    assert_one_line_error(code, err, str(tmp_path), "not a finished synth run folder")
    partial = tmp_path / "no_ckpt"
    partial.mkdir()
    (partial / "config.resolved.yaml").write_bytes((run / "config.resolved.yaml").read_bytes())
    code, _, err = run_cli(["bench", "gradients", partial], capsys)
    assert_one_line_error(code, err, "surrogate checkpoint surrogate.pt missing")
    code, _, err = run_cli(["bench", "gradients", run, "--images", "0"], capsys)
    assert_one_line_error(code, err, "--images", "positive")


def test_synth_validate_reproduces_the_run_report(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    rep = json.loads((run / "report.json").read_text())
    out = tmp_path / "v"
    code, stdout, err = run_cli(["validate", "--predictions", run / "stimuli.npz", "--recordings", run / "followup.npz",
                                 "--stimuli", run, "--out", out, "--seed", rep["bootstrap"]["seed"],
                                 "--n-bootstrap", rep["bootstrap"]["n"]], capsys)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    val = json.loads((out / "report.json").read_text())
    for key in ("stretch", "one_hot", "synthetic_prediction"):
        assert val[key] == rep[key], key
    assert (out / "report.html").stat().st_size > 10_000


def test_synth_validate_takes_the_natural_set_from_a_second_recording(tiny_run, tmp_path, capsys):
    """A lab that records only the synthesized images today adds the natural set's original
    recording: the same report as one file holding both."""
    from synth.data.recordings import Recording

    _, run = tiny_run
    rep = json.loads((run / "report.json").read_text())
    rec = Recording.load(run / "followup.npz")
    synthesized = set(np.load(run / "stimuli.npz")["stimulus_id"].tolist())
    today = [s for s in rec.stimulus_id if s in synthesized]
    rec.select(stimuli=today).save(tmp_path / "today.npz")
    rec.select(stimuli=[s for s in rec.stimulus_id if s not in synthesized]).save(tmp_path / "natural.npz")
    common = ["--predictions", run / "stimuli.npz", "--stimuli", run, "--seed", rep["bootstrap"]["seed"], "--n-bootstrap", rep["bootstrap"]["n"]]
    code, _, err = run_cli(["validate", "--recordings", tmp_path / "today.npz", "--out", tmp_path / "v1", *common], capsys)
    assert_one_line_error(code, err, "holds 0 of the", "add its original recording with a second --recordings")
    code, _, err = run_cli(["validate", "--recordings", tmp_path / "today.npz", "--recordings", tmp_path / "natural.npz",
                            "--out", tmp_path / "v2", *common], capsys)
    assert code == 0, err
    val = json.loads((tmp_path / "v2" / "report.json").read_text())
    for key in ("stretch", "one_hot", "synthetic_prediction"):
        assert val[key] == rep[key], key
    assert val["inputs"]["recordings"] == [str(tmp_path / "today.npz"), str(tmp_path / "natural.npz")]
    code, _, err = run_cli(["validate", "--recordings", tmp_path / "today.npz", "--recordings", run / "followup.npz",
                            "--out", tmp_path / "v3", *common], capsys)
    assert_one_line_error(code, err, "followup.npz: stimulus_id", "is also in an earlier recording file")


def test_held_out_surrogate_scores_every_saved_image(tmp_path, capsys):
    """The ensemble guard: a second surrogate on another split scores the saved PNGs."""
    cfg = write_cfg(tmp_path / "guard.yaml", stimuli__held_out_surrogate=True, stimuli__one_hot=False)
    out = tmp_path / "guard_run"
    code, _, err = run_cli(["run", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert (out / "surrogate_heldout.pt").exists() and (out / "fit_heldout.json").exists()
    with np.load(out / "stimuli.npz") as z:
        ho, pred = z["held_out_predicted"], z["predicted"]
    assert ho.shape == pred.shape and np.isfinite(ho).all()
    assert not np.allclose(ho, pred)  # a different model, not a copy
    import csv

    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert {"held_out_predicted_target", "models_agree"} <= set(rows[0])
    report = json.loads((out / "report.json").read_text())
    guard = report["ensemble_guard"]
    assert guard["n_images"] == len(rows)
    agree = sum(int(r["models_agree"]) for r in rows)
    assert guard["fraction_models_agree"] == pytest.approx(agree / len(rows))
    assert len(guard["disagreeing_stimulus_ids"]) == len(rows) - agree
    assert -1 <= report["fit"]["held_out_median_r_test"] <= 1


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory):
    """A tiny run with a judge: three candidates per target, the judge keeps one."""
    tmp_path = tmp_path_factory.mktemp("judge")
    cfg = write_cfg(tmp_path / "judge.yaml", fit__judge={"backbone_kwargs": {"channels": 6}, "epochs": 3},
                    stimuli__candidates_per_target=3, stimuli__seeds_per_target=1)
    out = tmp_path / "judge_run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return out


def test_judge_keeps_the_candidates_it_scores_best(judge_run):
    """fit.judge + stimuli.candidates_per_target: three candidates per target are
    synthesized by the surrogate alone; the judge's best one of each is the stimulus set."""
    from synth.data.stimuli import read_stimulus_set
    from synth.surrogate import Surrogate, predict
    from synth.synthesis.scoring import candidate_scores

    out = judge_run
    report = json.loads((out / "report.json").read_text())
    choice, sites = report["choice"], report["fit"]["n_sites"]
    assert (choice["n_candidates"], choice["n_kept"]) == (2 * 3 * sites, 2 * sites)  # stretch and one-hot, every site
    assert -1 <= report["fit"]["judge"]["median_r_test"] <= 1 and (out / "fit_judge.json").exists()
    stim = read_stimulus_set(out)
    judge, surrogate = Surrogate.load(out / "surrogate_judge.pt"), Surrogate.load(out / "surrogate.pt")
    assert judge.backbone.build_spec != surrogate.backbone.build_spec
    with np.load(out / "stimuli.npz") as z:
        assert list(z["stimulus_id"]) == list(stim.stimulus_id)
        pred, judged = z["predicted"], z["judge_predicted"]
    assert np.allclose(pred, predict(surrogate, stim.images), rtol=1e-4, atol=1e-5)  # the surrogate synthesized
    assert np.allclose(judged, predict(judge, stim.images), rtol=1e-4, atol=1e-5)  # the judge rated
    import csv

    rows = list(csv.DictReader(open(out / "manifest.csv")))
    with np.load(out / "natural.npz") as z:
        site_ids = [str(s) for s in z["site_id"]]
    scores = choice["scores"]
    for r in rows:  # each kept image is its group's best by the judge, and its score is the judge's
        kept = r["stimulus_id"]
        rivals = [f"{r['objective']}_{r['target_site']}_s{k}" for k in range(3)]
        assert kept in rivals and scores[kept] == max(scores[s] for s in rivals)
        assert float(r["judge_score"]) == pytest.approx(scores[kept], rel=1e-5)
        assert sum(s in choice["dropped_stimulus_ids"] for s in rivals) == 2
    assert any(not r["stimulus_id"].endswith("_s0") for r in rows)  # the choice is not always the first seed
    from synth.config import load_config
    from synth.pipeline import load_natural, load_target

    run_cfg = load_config(out / "config.resolved.yaml")  # the judge's scores again, from its natural predictions
    nat, _ = load_natural(run_cfg, load_target(run_cfg))
    again = candidate_scores([r["objective"] for r in rows], np.array([site_ids.index(r["target_site"]) for r in rows]),
                             judged, predict(judge, nat.images))
    assert np.allclose(again, [float(r["judge_score"]) for r in rows], rtol=1e-4, atol=1e-6)


_CHOICE = re.compile(r"^(first|judge|best|all) \((\d+) images\): (.*)$")
_CHOICE_FIG = re.compile(r"^(\S+) noise-free (-?[\d.]+) redrawn (-?[\d.]+) sd ([\d.]+)$")


def test_bench_choice_scores_every_candidate_on_the_recorder(judge_run, tiny_run, capsys):
    """bench choice: the judge's choice is the stimulus set (its figures are the run's and
    bench redraw's), the recorder's own best choice is at least as good as the judge's or
    the first candidates', noise-free; a run without a judge is a one-line error."""
    from synth.validation.redraw import FIGURES

    out = judge_run
    code, text, err = run_cli(["bench", "choice", out, "--draws", "3", "-q"], capsys)
    assert code == 0, err
    lines = text.splitlines()
    report = json.loads((out / "report.json").read_text())
    sites = report["fit"]["n_sites"]
    assert f"{6 * sites} candidates (3 per target, the run kept 1)" in lines[0]
    rho = re.findall(r"(stretch|one_hot) (-?[\d.]+) \((\d+) targets\)", lines[1])
    assert [r[0] for r in rho] == ["stretch", "one_hot"] and all(-1 <= float(r[1]) <= 1 for r in rho), lines[1]
    figs = {}
    for m in map(_CHOICE.match, lines[2:]):
        assert m, text
        parts = dict((g.group(1), g.groups()[1:]) for g in map(_CHOICE_FIG.match, m.group(3).split("; ")))
        assert set(parts) == set(FIGURES), m.group(3)
        figs[m.group(1)] = (int(m.group(2)), {f: (float(a), float(b)) for f, (a, b, _) in parts.items()})
    assert {k: n for k, (n, _) in figs.items()} == {"first": 2 * sites, "judge": 2 * sites, "best": 2 * sites, "all": 6 * sites}
    for f in FIGURES:  # the judge's choice is the stimulus set: the run's noise-free figures
        block, key = f.split(".")
        if key in report["noise_free"][block]:
            assert figs["judge"][1][f][0] == round(report["noise_free"][block][key], 3), f
    code, redrawn, err = run_cli(["bench", "redraw", out, "--draws", "3", "-q"], capsys)  # and bench redraw's recordings
    assert code == 0, err
    means = {m.group(1): m.group(2) for m in map(_REDRAW.match, redrawn.splitlines()) if m}
    assert means and all(float(means[f]) == figs["judge"][1][f][1] for f in means), (means, figs["judge"])
    for f in ("stretch.fraction_above_natural_max", "stretch.median_gain", "one_hot.median_score_ratio"):
        # a target scores its best image: the recorder's best of three is as good as all three, and no worse than any other
        assert figs["best"][1][f][0] == figs["all"][1][f][0], (f, figs)
        assert figs["best"][1][f][0] >= max(figs["judge"][1][f][0], figs["first"][1][f][0]), (f, figs)
    code, _, err = run_cli(["bench", "choice", tiny_run[1]], capsys)
    assert_one_line_error(code, err, "report.json", "no 'choice' block")


def test_candidates_need_a_judge_and_a_judge_needs_candidates(tmp_path, capsys):
    for changes, needles in [
        ({"stimuli__candidates_per_target": 3}, ("stimuli.candidates_per_target", "need fit.judge")),
        ({"stimuli__candidates_per_target": 1, "stimuli__seeds_per_target": 2}, ("stimuli.candidates_per_target", "at least seeds_per_target (2)")),
        ({"fit__judge": {"epochs": 3}}, ("fit.judge", "not above seeds_per_target")),
        ({"fit__judge": {"split": {"train": 0.5}}, "stimuli__candidates_per_target": 2}, ("fit.judge.split", "set fit.split instead")),
        ({"fit__judge": [1], "stimuli__candidates_per_target": 2}, ("fit.judge", "expected a mapping")),
        ({"fit__ensemble": [{"judge": {"epochs": 3}}]}, ("fit.ensemble[0].judge", "set fit.judge instead")),
    ]:
        cfg = write_cfg(tmp_path / "bad_judge.yaml", **changes)
        code, _, err = run_cli(["run", cfg, "--out", tmp_path / "never", "--quiet"], capsys)
        assert_one_line_error(code, err, "bad_judge.yaml", *needles)
        assert not (tmp_path / "never").exists()


def test_ensemble_surrogate_averages_its_members(tmp_path, capsys):
    """fit.ensemble: a second recipe is fitted too; synthesis and predictions use the mean."""
    cfg = write_cfg(tmp_path / "ens.yaml", fit__ensemble=[{"backbone_kwargs": {"channels": 6}, "epochs": 3}], stimuli__one_hot=False)
    out = tmp_path / "ens_run"
    code, _, err = run_cli(["run", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    from synth.data.stimuli import read_stimulus_set
    from synth.surrogate import Surrogate, predict

    a, b = Surrogate.load(out / "surrogate.pt"), Surrogate.load(out / "surrogate_member1.pt")
    assert a.backbone.build_spec != b.backbone.build_spec  # the member's own recipe
    stim = read_stimulus_set(out)
    with np.load(out / "stimuli.npz") as z:
        order = {s: i for i, s in enumerate(z["stimulus_id"])}
        pred = z["predicted"]
    rows = [order[s] for s in stim.stimulus_id]
    mean = (predict(a, stim.images) + predict(b, stim.images)) / 2
    assert np.allclose(pred[rows], mean, rtol=1e-4, atol=1e-4)
    fit = json.loads((out / "report.json").read_text())["fit"]
    assert len(fit["ensemble"]) == 2 and all(-1 <= m["median_r_test"] <= 1 for m in fit["ensemble"])
    assert fit["ensemble"][1]["details"]["epochs_run"] == {"out": 3}
    assert fit["ensemble"][1]["details"]["feature_shape"]["out"][0] == 6
    # bench gradients compares each member and their mean, and reports the mean (what synthesized)
    code, text, err = run_cli(["bench", "gradients", out, "--images", "4", "--sites", "2", "-q"], capsys)
    assert code == 0, err
    figs = _figures(text)
    assert set(figs) == {"surrogate.pt", "surrogate_member1.pt", "ensemble", "gradient_alignment"}, text
    assert figs["gradient_alignment"] == (figs["ensemble"][1],)
    code, _, err = run_cli(["bench", "gradients", out, "--at", "one_hot"], capsys)
    assert_one_line_error(code, err, "no one_hot images in its stimulus set")


def test_refit_on_all_images_synthesizes_with_the_refitted_ensemble(tmp_path, capsys):
    """fit.refit: all: the held-out r is the split surrogate's; synthesis, natural.npz and
    stimuli.npz use each member refitted on every natural image."""
    cfg = write_cfg(
        tmp_path / "refit.yaml", fit__refit="all", fit__ensemble=[{"backbone_kwargs": {"channels": 6}}], stimuli__one_hot=False
    )
    out = tmp_path / "refit_run"
    code, _, err = run_cli(["run", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    from synth.data.recordings import Recording
    from synth.data.stimuli import read_stimulus_set
    from synth.pipeline import make_splits, refit_splits
    from synth.runtime import derive_seed
    from synth.surrogate import Surrogate, predict
    from synth.validation.metrics import pearson_per_site

    load = lambda name: Surrogate.load(out / name)  # noqa: E731
    split_pair = [load("surrogate.pt"), load("surrogate_member1.pt")]
    all_pair = [load("surrogate_all.pt"), load("surrogate_member1_all.pt")]
    fit_all = json.loads((out / "fit_all.json").read_text())
    n = TINY["target"]["params"]["n_images"]
    tr, va = refit_splits(n, 0.1, derive_seed(TINY["seed"], "refit_split"))
    assert (fit_all["n_train"], fit_all["n_val"]) == (tr.size, va.size) == (n - 12, 12)
    test = make_splits(n, {"train": 0.7, "val": 0.1, "test": 0.2}, TINY["seed"]).test
    assert np.isin(test, tr).any()  # the refit sees test images; the split fit did not

    with np.load(out / "natural.npz") as z:
        nat_ids, nat_pred = z["stimulus_id"], z["predicted"]
    from synth.targets import build_target

    nat = build_target(Path(TINY["target"]["file"]), overrides=TINY["target"]["params"]).natural(
        image_size=32, grayscale=True, seed=derive_seed(TINY["seed"], "natural")
    )
    assert list(nat.stimulus_id) == list(nat_ids)
    mean = lambda pair, x: (predict(pair[0], x) + predict(pair[1], x)) / 2  # noqa: E731
    assert np.allclose(nat_pred, mean(all_pair, nat.images), atol=1e-4)
    assert not np.allclose(nat_pred, mean(split_pair, nat.images), atol=1e-3)
    stim = read_stimulus_set(out)
    with np.load(out / "stimuli.npz") as z:
        order = {s: i for i, s in enumerate(z["stimulus_id"])}
        pred = z["predicted"][[order[s] for s in stim.stimulus_id]]
    assert np.allclose(pred, mean(all_pair, stim.images), rtol=1e-4, atol=1e-4)

    fit = json.loads((out / "report.json").read_text())["fit"]
    test_rec = nat.recording.select(stimuli=nat.stimulus_id[test])
    r_split = np.nanmedian(pearson_per_site(mean(split_pair, nat.images[test]).T, test_rec.mean()))
    assert fit["median_r_test"] == pytest.approx(r_split, abs=1e-5)
    assert fit["refit"]["n_train_images"] == n - 12 and len(fit["refit"]["val_median_r"]) == 2
    # bench gradients looks at the surrogates that synthesized: the refitted ones
    code, text, err = run_cli(["bench", "gradients", out, "--images", "3", "--sites", "1", "-q"], capsys)
    assert code == 0, err
    assert set(_figures(text)) == {"surrogate_all.pt", "surrogate_member1_all.pt", "ensemble", "gradient_alignment"}, text


@pytest.mark.parametrize("rank_by", ["surrogate", "recorded"])
def test_natural_starts_begin_each_image_at_its_targets_best_natural_images(tmp_path, capsys, rank_by):
    """stimuli.start: natural: a target's k-th image starts from its k-th best natural image
    (ranked by the surrogate or the recording), named in the manifest, and stays near it."""
    cfg = write_cfg(
        tmp_path / "start.yaml", stimuli__start="natural", stimuli__start_rank_by=rank_by, stimuli__seeds_per_target=2, synthesis__steps=3
    )
    out = tmp_path / "start_run"
    code, _, err = run_cli(["run", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    import csv

    from PIL import Image

    from synth.runtime import derive_seed
    from synth.targets import build_target
    from synth.validation.control import one_hot_scores

    nat = build_target(Path(TINY["target"]["file"]), overrides=TINY["target"]["params"]).natural(
        image_size=32, grayscale=True, seed=derive_seed(TINY["seed"], "natural")
    )
    with np.load(out / "natural.npz") as z:
        site_ids, resp = list(z["site_id"]), z["predicted"]
    if rank_by == "recorded":
        resp = nat.recording.mean().T
    _, oh = one_hot_scores(resp.T, resp.T)  # (sites, images)
    ids = np.asarray(nat.stimulus_id).astype(str)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 6 * 2 * 2
    for row in rows:
        t = site_ids.index(row["target_site"])
        k = int(row["stimulus_id"].rsplit("_s", 1)[1])
        score = resp[:, t] if row["objective"] == "stretch" else oh[t]
        assert row["start_stimulus_id"] == ids[np.argsort(-score, kind="stable")[k]], row["stimulus_id"]
        img = np.asarray(Image.open(out / row["file"]), dtype=np.float64).ravel() / 255
        assert closest_natural(img[None], nat.images.numpy())[0] == list(ids).index(row["start_stimulus_id"]), row["stimulus_id"]


def test_view_search_starts_each_image_at_the_view_it_names(tmp_path, capsys):
    """stimuli.start_zooms / start_flips: each image starts from the view (an enlarged window,
    mirrored or not) of a natural image that the manifest names, and stays near it."""
    cfg = write_cfg(
        tmp_path / "views.yaml", stimuli__start="natural", stimuli__start_zooms=[1.0, 2.0], stimuli__start_flips=True,
        stimuli__start_candidates=3, stimuli__seeds_per_target=2, synthesis__steps=3,
    )
    out = tmp_path / "views_run"
    code, _, err = run_cli(["run", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    import csv

    from PIL import Image

    from synth.runtime import derive_seed
    from synth.synthesis.starts import apply_views, start_views
    from synth.targets import build_target

    nat = build_target(Path(TINY["target"]["file"]), overrides=TINY["target"]["params"]).natural(
        image_size=32, grayscale=True, seed=derive_seed(TINY["seed"], "natural")
    )
    ids = list(np.asarray(nat.stimulus_id).astype(str))
    views = start_views((1.0, 2.0), flips=True)
    labels = [v.label() for v in views]
    every = apply_views(nat.images, views).numpy()  # row i * len(views) + v
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 6 * 2 * 2
    for row in rows:
        named = ids.index(row["start_stimulus_id"]) * len(views) + labels.index(row["start_view"])
        img = np.asarray(Image.open(out / row["file"]), dtype=np.float64).ravel() / 255
        assert closest_natural(img[None], every)[0] == named, row["stimulus_id"]
    assert any(row["start_view"] != labels[0] for row in rows)  # the search chose other views than whole images
    for bad, needle in (({"stimuli__start": "noise"}, "set start: natural"), ({"stimuli__start_rank_by": "recorded"}, "start_rank_by: surrogate")):
        cfg = write_cfg(tmp_path / "bad.yaml", **{"stimuli__start": "natural", "stimuli__start_zooms": [1.0, 2.0], **bad})
        code, _, err = run_cli(["run", cfg, "--out", tmp_path / "bad_run", "--quiet"], capsys)
        assert code == 2 and "stimuli.start_zooms" in err and needle in err, err
        assert not (tmp_path / "bad_run").exists()


def test_noise_starts_name_no_start_image(tiny_run):
    import csv

    _, run = tiny_run
    assert "start_stimulus_id" not in next(csv.DictReader(open(run / "manifest.csv")))


def test_without_natural_rerecording_the_original_recording_gives_the_natural_statistics(tmp_path, capsys):
    cfg = write_cfg(tmp_path / "norerec.yaml", followup__record_natural=False)
    out = tmp_path / "norerec_run"
    code, _, err = run_cli(["run", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    from synth.data.recordings import Recording

    rec = Recording.load(out / "followup.npz")
    nat = np.load(out / "natural.npz")["stimulus_id"]
    synth_ids = np.load(out / "stimuli.npz")["stimulus_id"]
    assert set(rec.stimulus_id) == set(nat) | set(synth_ids)
    # natural rows carry the original recording's repeat count (TINY: 2), the follow-up its own
    n_nat = rec.select(stimuli=nat).n_repeats()
    assert (n_nat == TINY["target"]["params"]["n_repeats"]).all()
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["stretch"]["fraction_above_natural_max"] <= 1
    # bench redraw then records only the synthesized images again, the natural set staying the original recording
    code, text, err = run_cli(["bench", "redraw", out, "--draws", "2", "-q"], capsys)
    assert code == 0, err
    rows = {m.group(1): m.groups()[1:] for m in map(_REDRAW.match, text.splitlines()) if m}
    f = "one_hot.median_score_ratio"
    assert float(rows[f][4]) == round(report["noise_free"]["one_hot"]["median_score_ratio"], 3)
    from synth.config import load_config
    from synth.data.stimuli import read_stimulus_set
    from synth.pipeline import load_natural, load_target
    from synth.validation.io import read_manifest
    from synth.validation.redraw import redraw_figures

    conf = load_config(out / "config.resolved.yaml")
    target = load_target(conf)
    natural, _ = load_natural(conf, target)
    recorder, recorded = target.recorder(), []

    class Spy:
        site_ids = recorder.site_ids
        expected = staticmethod(recorder.expected)

        def record(self, x, sids, **kw):
            recorded.append(list(sids))
            return recorder.record(x, sids, **kw)

    stim = read_stimulus_set(out)
    ids = [str(i) for i in natural.stimulus_id] + [str(i) for i in stim.stimulus_id]
    redraw_figures(Spy(), torch.cat([natural.images, stim.images]), ids, [str(i) for i in natural.stimulus_id],
                   read_manifest(out / "manifest.csv"), n_repeats=2, draws=2, seed=0, original=natural.recording)
    assert recorded == [[str(i) for i in stim.stimulus_id]] * 2


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_works_before_or_after_the_subcommand(tmp_path, capsys, where):
    import synth.progress

    cfg = write_cfg(tmp_path / "q.yaml")
    argv = ["--quiet", "check", cfg] if where == "before" else ["check", cfg, "--quiet"]
    synth.progress.set_quiet(False)
    try:
        code, _, _ = run_cli(argv, capsys)
        assert code == 0 and synth.progress._QUIET is True
        code, _, _ = run_cli(["check", cfg], capsys)
        assert code == 0 and synth.progress._QUIET is False
    finally:
        synth.progress.set_quiet(False)


_REDRAW = re.compile(r"^(\S+): redrawn mean (-?[\d.]+) sd ([\d.]+) \[5%: (-?[\d.]+), 95%: (-?[\d.]+)\]; noise-free (-?[\d.]+)"
                     r"; the run's recording (-?[\d.]+) \(above (\d+)% of the draws\)$")


def test_bench_redraw_records_the_same_images_again(tiny_run, tmp_path, capsys):
    """Fresh recordings of the run's images: the library's figures, the run's own draw and noise-free figures beside them."""
    from synth.config import load_config
    from synth.data.stimuli import read_stimulus_set
    from synth.pipeline import load_natural, load_target
    from synth.runtime import derive_seed
    from synth.validation.io import read_manifest
    from synth.validation.redraw import FIGURES, redraw_figures

    _, run = tiny_run
    code, out, err = run_cli(["bench", "redraw", run, "--draws", "4", "-q"], capsys)
    assert code == 0, err
    rows = {m.group(1): m.groups()[1:] for m in map(_REDRAW.match, out.splitlines()) if m}
    assert set(rows) == set(FIGURES), out
    rep = json.loads((run / "report.json").read_text())
    for f, (mean, sd, p5, p95, free, own, _) in rows.items():
        block, key = f.split(".")
        assert float(own) == round(rep[block][key], 3)
        if key in rep["noise_free"][block]:
            assert float(free) == round(rep["noise_free"][block][key], 3)
        assert float(p5) <= float(mean) <= float(p95) and float(sd) >= 0
    cfg = load_config(run / "config.resolved.yaml")
    target = load_target(cfg)
    recorder = target.recorder()
    nat, _ = load_natural(cfg, target)
    stim = read_stimulus_set(run)
    ids = [str(s) for s in nat.stimulus_id] + [str(s) for s in stim.stimulus_id]
    images = torch.cat([nat.images, stim.images])
    args = (images, ids, [str(s) for s in nat.stimulus_id], read_manifest(run / "manifest.csv"))
    got = redraw_figures(recorder, *args, n_repeats=cfg.followup.n_repeats, draws=4, seed=derive_seed(cfg.seed, "redraw"))
    f = "stretch.fraction_above_natural_max"
    assert rows[f][0] == f"{got.summary(f)['mean']:.3f}"
    assert got.values["stretch.median_gain"].std() > 0  # trial noise moves the figures from one recording to the next

    class Exact:  # the same recorder without trial noise: every recording is the expected one
        site_ids = recorder.site_ids

        def expected(self, x):
            return recorder.expected(x)

        def record(self, x, sids, *, n_repeats, seed, expected):  # noqa: ARG002
            from synth.data.recordings import Recording

            return Recording(stimulus_id=np.asarray(sids), site_id=np.asarray(self.site_ids).astype(str),
                             responses=np.repeat(expected.numpy().astype(np.float64).T[:, :, None], n_repeats, axis=2))

    exact = redraw_figures(Exact(), *args, n_repeats=3, draws=2, seed=0)
    for f in FIGURES:
        np.testing.assert_allclose(exact.values[f], exact.expected[f])
        assert exact.rank(f, exact.expected[f]) == 0.5
    # bad input
    code, _, err = run_cli(["bench", "redraw", run, "--draws", "1"], capsys)
    assert_one_line_error(code, err, "--draws", "at least 2")
    code, _, err = run_cli(["bench", "redraw", tmp_path], capsys)
    assert_one_line_error(code, err, str(tmp_path), "not a finished synth run folder")


def test_bench_redraw_of_some_target_sites_scores_only_their_images(tiny_run, capsys):
    """--target-sites: the figures of the images made for those sites, the run's own recording scored on them too."""
    from synth.data.recordings import Recording
    from synth.validation.io import read_manifest

    _, run = tiny_run
    manifest = read_manifest(run / "manifest.csv")
    targets = sorted({str(r["target_site"]) for r in manifest if r["objective"] == "stretch"})
    rec = Recording.load(run / "followup.npz")
    natural = [str(s) for s in np.load(run / "natural.npz")["stimulus_id"]]
    means = np.nanmean(rec.responses, axis=2)  # (sites, stimuli)
    col = {str(s): j for j, s in enumerate(rec.stimulus_id)}
    own = []
    for site in targets:
        code, out, err = run_cli(["bench", "redraw", run, "--target-sites", site, "--draws", "2", "-q"], capsys)
        assert code == 0, err
        assert "(made for 1 of the sites)" in out
        rows = {m.group(1): m.groups()[1:] for m in map(_REDRAW.match, out.splitlines()) if m}
        own.append(float(rows["stretch.fraction_above_natural_max"][5]))
        # by hand from the run's recording: the site's best stretch image against its natural maximum
        i = list(rec.site_id).index(site)
        stretch = [col[str(r["stimulus_id"])] for r in manifest if r["objective"] == "stretch" and r["target_site"] == site]
        assert own[-1] == float(means[i, stretch].max() > means[i, [col[s] for s in natural]].max())
    # the whole run's fraction is the mean over its targets' one-site fractions
    rep = json.loads((run / "report.json").read_text())
    assert round(float(np.mean(own)), 3) == round(rep["stretch"]["fraction_above_natural_max"], 3)
    # bad input
    code, _, err = run_cli(["bench", "redraw", run, "--target-sites", "nosuch_site"], capsys)
    assert_one_line_error(code, err, "--target-sites", "nosuch_site", "is not a site of target")
    # a site of the target that no image was made for (stimuli.sites picked others)
    from synth.validation.redraw import manifest_of_sites

    assert [r["stimulus_id"] for r in manifest_of_sites(manifest, targets[:1])] == [r["stimulus_id"] for r in manifest if r["target_site"] == targets[0]]
    with pytest.raises(ValueError, match="no image targets site v4_x"):
        manifest_of_sites(manifest, [targets[0], "v4_x"])
