import json

import pytest

from synth.errors import UserError
from synth.rundir import RunDir


def test_create_works_in_partial_and_renames(tmp_path):
    run = RunDir.create("demo", tmp_path / "run1")
    assert run.work.name == "run1.partial" and run.work.is_dir()
    assert not (tmp_path / "run1").exists()
    run.path("a.txt").write_text("x")
    final = run.finish()
    assert final == tmp_path / "run1" and (final / "a.txt").read_text() == "x"
    assert not (final / "RUNNING").exists()
    assert not run.work.exists()


def test_never_overwrites(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        RunDir.create("demo", tmp_path / "exists")


def test_existing_partial_points_to_resume(tmp_path):
    RunDir.create("demo", tmp_path / "r")
    with pytest.raises(UserError, match="--resume"):
        RunDir.create("demo", tmp_path / "r")


def test_open_partial(tmp_path):
    run = RunDir.create("demo", tmp_path / "r")
    again = RunDir.open_partial(run.work)
    assert again.final == tmp_path / "r"
    with pytest.raises(UserError, match="not an unfinished"):
        RunDir.open_partial(tmp_path)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.json").write_text(json.dumps({}))
    with pytest.raises(UserError, match="already complete"):
        RunDir.open_partial(tmp_path / "done")


def test_default_name_is_timestamped(tmp_path):
    run = RunDir.create("demo", base=tmp_path)
    assert run.final.parent == tmp_path and run.final.name.endswith("_demo")
    run.discard()
    assert not run.work.exists()
