"""Session sources for the core stage: a lab's sessions found through ``{session}``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synth.data.sessions import CowleySessions, LabSessions, to_mode
from synth.errors import ConfigError, DataError
from synth.populations.lab import build_lab_target


def _session(root: Path, images: str, responses: str, session: str, *, n: int = 5, sites: int = 2, size: int = 16) -> None:
    img = root / images.replace("{session}", session)
    img.mkdir(parents=True)
    ids = [f"im{i}" for i in range(n)]
    for i, sid in enumerate(ids):
        Image.fromarray(np.full((size, size), 20 * i, np.uint8), mode="L").save(img / f"{sid}.png")
    resp = root / responses.replace("{session}", session)
    resp.parent.mkdir(parents=True, exist_ok=True)
    r = np.arange(sites * n * 2, dtype=float).reshape(sites, n, 2)
    np.savez(resp, stimulus_id=np.array(ids), site_id=np.array([f"{session}-e{k}" for k in range(sites)]), responses=r)


@pytest.mark.parametrize(
    "images, responses",
    [
        ("{session}/images", "{session}/responses.npz"),
        ("stim/{session}", "rec/{session}/{session}_counts.npz"),  # the id twice in one path
        ("{session}_img", "resp_{session}.npz"),  # files side by side in the root
    ],
)
def test_lab_sessions_are_found_through_the_placeholder(tmp_path, images, responses):
    for s in ("m1_2026-11-30", "m1_2026-12-01"):
        _session(tmp_path, images, responses, s)
    # a responses file without its image folder is not a session
    orphan = tmp_path / responses.replace("{session}", "orphan")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"")
    src = LabSessions(str(tmp_path), images, responses, image_size=16, grayscale=True)
    assert src.list_sessions() == ["m1_2026-11-30", "m1_2026-12-01"]
    x, y = src.load("m1_2026-12-01")
    assert x.shape == (5, 1, 16, 16) and y.shape == (5, 2)
    assert torch.allclose(y[:, 0], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))  # repeat means, (N, S)
    files = src.checksum_files("m1_2026-12-01")
    assert len(files) == 6 and all(p.is_file() for p in files.values())
    assert src.twin_sessions() == []


def test_lab_sessions_refuse_a_path_without_the_placeholder_and_a_wrong_mode(tmp_path):
    with pytest.raises(ConfigError, match="params.images: 'images' has no \\{session\\} while the other path has one"):
        LabSessions(str(tmp_path), "images", "{session}/r.npz", image_size=16, grayscale=True)
    with pytest.raises(ConfigError, match="name one session only"):
        LabSessions(str(tmp_path), "a/images", "a/r.npz", image_size=16, grayscale=True)
    _session(tmp_path, "{session}/images", "{session}/r.npz", "a")
    src = LabSessions(str(tmp_path), "{session}/images", "{session}/r.npz", image_size=16, grayscale=True)
    x, _ = src.load("a")
    assert src.in_mode(x, True) is x
    with pytest.raises(DataError, match="grayscale=True"):
        src.in_mode(x, False)
    with pytest.raises(DataError, match="expected 12x12"):
        LabSessions(str(tmp_path), "{session}/images", "{session}/r.npz", image_size=12, grayscale=True).load("a")


def test_lab_target_fills_in_the_session(tmp_path):
    _session(tmp_path, "{session}/images", "{session}/r.npz", "a")
    t = build_lab_target(images="{session}/images", responses="{session}/r.npz", root=str(tmp_path), session="a")
    assert t.images == str(tmp_path / "a" / "images") and list(t.site_ids) == ["a-e0", "a-e1"]
    assert t.sessions(image_size=16, grayscale=True).list_sessions() == ["a"]
    single = build_lab_target(images="a/images", responses="a/r.npz", root=str(tmp_path), session="a")
    assert single.sessions(image_size=16, grayscale=True) is None  # one session: nothing to train a core on
    with pytest.raises(ConfigError, match="target.session"):
        build_lab_target(images="{session}/images", responses="{session}/r.npz", root=str(tmp_path))
    with pytest.raises(ConfigError, match="params.images.*put it in both"):
        build_lab_target(images="a/images", responses="{session}/r.npz", root=str(tmp_path), session="a")
    with pytest.raises(ConfigError, match="no session 'b' under .*sessions present: a$"):
        build_lab_target(images="{session}/images", responses="{session}/r.npz", root=str(tmp_path), session="b")
    with pytest.raises(ConfigError, match="expected a session id"):
        build_lab_target(images="{session}/images", responses="{session}/r.npz", root=str(tmp_path), session="../a")


def test_cowley_sessions_to_mode_is_luminance():
    x = torch.zeros(1, 3, 2, 2)
    x[:, 1] = 1.0
    g = to_mode(x, True)
    assert g.shape == (1, 1, 2, 2) and torch.allclose(g, torch.full_like(g, 0.587), atol=1e-3)
    assert to_mode(x, False) is x
    assert CowleySessions("/nowhere").in_mode(x, True).shape == (1, 1, 2, 2)
