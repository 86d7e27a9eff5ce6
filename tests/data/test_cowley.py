"""Loader for the Cowley et al. (2023) V4 data: real sessions, id matching, error cases."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _shared import cowley_root, requires_cowley
from synth.data import cowley
from synth.errors import DataError

# --------------------------------------------------------------------------- helpers


def _jpeg(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    im = Image.fromarray(a).resize((size, size), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def _make_root(tmp: Path, session: str, jpegs: list[bytes], responses: np.ndarray, *, folder: str = "", order: list[int] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """A data root with one session: jpegs[k-1] is image k (written in ``order``)."""
    root = tmp / "root"
    (root / cowley.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (root / cowley.AVERAGED_DIR).mkdir(parents=True, exist_ok=True)
    order = list(range(len(jpegs))) if order is None else order
    with zipfile.ZipFile(cowley.images_path(root, session), "w", compression=zipfile.ZIP_STORED) as zf:
        if folder:
            zf.writestr(folder + "/", b"")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
        for i in order:
            zf.writestr(f"{folder + '/' if folder else ''}image{i + 1:04d}.jpg", jpegs[i])
    np.save(cowley.averaged_path(root, session), responses)
    return root


# --------------------------------------------------------------------------- synthetic


def test_write_lab_layout_is_read_back_by_the_lab_target_as_the_loader_reads_it(tmp_path):
    """``synth data export``: each session becomes images/<id>.png + responses.npz, which a lab
    target with {session} paths loads to the same ids, pixels and responses as the loader."""
    from synth.cli import main
    from synth.populations.lab import build_lab_target

    jpegs = [_jpeg(s) for s in range(5)]
    resp = np.arange(3 * 5, dtype=float).reshape(3, 5)
    root = _make_root(tmp_path, "999001", jpegs, resp, order=[2, 0, 4, 1, 3])
    _make_root(tmp_path, "999002", jpegs[:4], resp[:2, :4] + 1)
    # 999001 also has single trials (NaN-padded, as 210325's): those are exported
    trials = np.stack([resp - 1, resp + 1, np.full_like(resp, np.nan)], axis=2)
    trials[:, 0, 2] = resp[:, 0]
    cowley.raw_path(root, "999001").parent.mkdir(parents=True)
    np.save(cowley.raw_path(root, "999001"), trials)
    out = tmp_path / "lab"
    assert main(["data", "export", "cowley2023", "--root", str(root), "--out", str(out), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab", "root"]  # no work folder left behind
    for session, n in (("999001", 5), ("999002", 4)):
        ids, x, rec = cowley.load_session(root, session)
        target = build_lab_target(images="{session}/images", responses="{session}/responses.npz", root=str(out), session=session)
        nat = target.natural(image_size=112, grayscale=False, seed=0)
        assert list(nat.stimulus_id) == list(ids) and len(ids) == n
        assert torch.equal(nat.images, x)  # lossless: the decoded JPEG, pixel for pixel
        assert list(nat.recording.site_id) == list(rec.site_id)
        if session == "999001":
            np.testing.assert_array_equal(nat.recording.responses, trials)  # single trials, NaN padding kept
            np.testing.assert_allclose(nat.recording.mean(), rec.responses[:, :, 0])
        else:
            np.testing.assert_array_equal(nat.recording.responses, rec.responses)
    assert main(["data", "export", "cowley2023", "--root", str(root), "--out", str(out), "-q"]) == 2  # never overwritten
    with pytest.raises(DataError, match="no session '999003'"):
        cowley.write_lab_layout(root, tmp_path / "other", sessions=["999003"])
    bad = trials.copy()
    bad[1, 2, 0] += 3.0
    np.save(cowley.raw_path(root, "999001"), bad)
    with pytest.raises(DataError, match=r"responses_999001.npy: the single trials' means differ .* by up to 1"):
        cowley.write_lab_layout(root, tmp_path / "other")
    np.save(cowley.raw_path(root, "999001"), trials)
    (cowley.averaged_path(root, "999002")).write_bytes(b"broken")
    with pytest.raises(DataError, match="responses_999002.npy"):
        cowley.write_lab_layout(root, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab", "root"]  # a failed export leaves nothing



def test_members_matched_by_base_name_in_folder_and_shuffled(tmp_path):
    jpegs = [_jpeg(s) for s in range(6)]
    resp = np.arange(2 * 6, dtype=float).reshape(2, 6)
    order = [3, 0, 5, 1, 4, 2]
    extra = {"__MACOSX/imgs/._image0001.jpg": b"not a jpeg", "imgs/notes.txt": b"hello"}
    root = _make_root(tmp_path, "999001", jpegs, resp, folder="imgs", order=order, extra=extra)
    ids, x, rec = cowley.load_session(root, "999001")
    assert list(ids) == [f"999001_{k:04d}" for k in range(1, 7)]
    assert list(rec.site_id) == ["999001_n000", "999001_n001"]
    assert list(rec.stimulus_id) == list(ids)
    assert x.shape == (6, 3, 112, 112) and x.dtype == torch.float32
    for k in range(6):  # image k+1 is row k whatever its position in the zip
        want = torch.from_numpy(_decode(jpegs[k])).permute(2, 0, 1).float() / 255
        assert torch.equal(x[k], want)
    np.testing.assert_array_equal(rec.responses[:, :, 0], resp)


def test_resize_and_grayscale(tmp_path):
    jpegs = [_jpeg(s) for s in range(3)]
    root = _make_root(tmp_path, "999002", jpegs, np.ones((1, 3)))
    _, rgb, _ = cowley.load_session(root, "999002")
    _, gray, _ = cowley.load_session(root, "999002", grayscale=True)
    assert gray.shape == (3, 1, 112, 112)
    lum = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(gray[:, 0], lum, atol=1e-6, rtol=0)
    _, small, _ = cowley.load_session(root, "999002", image_size=56, grayscale=True)
    assert small.shape == (3, 1, 56, 56)
    assert 0.0 <= float(small.min()) and float(small.max()) <= 1.0
    # antialiased downsampling of a 2x2 block pattern ~ the block mean
    torch.testing.assert_close(small.mean(dim=(1, 2, 3)), gray.mean(dim=(1, 2, 3)), atol=2e-3, rtol=0)


def test_list_sessions_discovers_files(tmp_path):
    root = _make_root(tmp_path, "999003", [_jpeg(0)], np.ones((1, 1)))
    np.save(cowley.averaged_path(root, "999004"), np.ones((1, 1)))  # zip missing
    assert cowley.list_sessions(root) == ["999003", "999004"]
    with pytest.raises(DataError, match="images_999004.zip"):
        cowley.load_session(root, "999004")
    with pytest.raises(DataError, match="no session '999005'.*999003"):
        cowley.load_session(root, "999005")
    with pytest.raises(DataError, match="not found"):
        cowley.list_sessions(tmp_path / "nowhere")


def test_missing_response_file(tmp_path):
    root = _make_root(tmp_path, "999006", [_jpeg(0)], np.ones((1, 1)))
    cowley.averaged_path(root, "999006").unlink()
    with pytest.raises(DataError, match=r"responses_999006\.npy"):
        cowley.load_session(root, "999006")


def test_truncated_zip(tmp_path):
    root = _make_root(tmp_path, "999007", [_jpeg(s) for s in range(4)], np.ones((1, 4)))
    z = cowley.images_path(root, "999007")
    data = z.read_bytes()
    z.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"images_999007\.zip: not a readable zip"):
        cowley.load_session(root, "999007")


def test_corrupt_jpeg_member_is_named(tmp_path):
    jpegs = [_jpeg(s) for s in range(3)]
    jpegs[1] = jpegs[1][:200]  # truncated JPEG
    root = _make_root(tmp_path, "999008", jpegs, np.ones((1, 3)), folder="imgs")
    with pytest.raises(DataError, match=r"images_999008\.zip: member imgs/image0002\.jpg: cannot read JPEG"):
        cowley.load_session(root, "999008")


def test_count_mismatch_names_both_numbers(tmp_path):
    root = _make_root(tmp_path, "999009", [_jpeg(s) for s in range(5)], np.ones((2, 4)))
    with pytest.raises(DataError, match=r"5 images but .*responses_999009\.npy has 4 response columns"):
        cowley.load_session(root, "999009")


def test_gap_in_image_numbers(tmp_path):
    jpegs = [_jpeg(s) for s in range(4)]
    root = _make_root(tmp_path, "999010", jpegs, np.ones((1, 4)), order=[0, 1, 3])
    with pytest.raises(DataError, match="image0003.jpg"):
        cowley.load_session(root, "999010")


def test_nan_in_repeat_averaged(tmp_path):
    resp = np.ones((2, 3))
    resp[1, 2] = np.nan
    root = _make_root(tmp_path, "999011", [_jpeg(s) for s in range(3)], resp)
    with pytest.raises(DataError, match=r"responses_999011\.npy: 1 repeat-averaged responses are NaN or inf"):
        cowley.load_session(root, "999011")


def test_raw_repeats(tmp_path):
    root = _make_root(tmp_path, "999012", [_jpeg(s) for s in range(3)], np.ones((2, 3)))
    assert cowley.load_raw(root, "999012") is None
    raw = np.full((2, 3, 4), np.nan)
    raw[:, :, :2] = 1.0
    raw[:, 0, 2] = 4.0
    cowley.raw_path(root, "999012").parent.mkdir(parents=True)
    np.save(cowley.raw_path(root, "999012"), raw)
    rec = cowley.load_raw(root, "999012")
    assert rec.responses.shape == (2, 3, 4)
    assert list(rec.n_repeats()) == [3, 2, 2]
    np.save(cowley.raw_path(root, "999012"), raw[:, :2])
    with pytest.raises(DataError, match="does not match"):
        cowley.load_raw(root, "999012")


# --------------------------------------------------------------------------- real data


@requires_cowley
def test_real_sessions_listed():
    sessions = cowley.list_sessions(cowley_root())
    assert sessions == sorted(sessions)
    assert {"190923", "201025", "210325"} <= set(sessions)
    assert cowley.twin_sessions(cowley_root()) == ["190923", "201025"]


@requires_cowley
@pytest.mark.parametrize("session", ["190923", "210305"])  # folder + plain zip layouts
def test_real_session_loads(session):
    root = cowley_root()
    shape = np.load(cowley.averaged_path(root, session), mmap_mode="r").shape
    ids, x, rec = cowley.load_session(root, session)
    assert x.shape == (shape[1], 3, 112, 112) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert ids[0] == f"{session}_0001" and ids[-1] == f"{session}_{shape[1]:04d}"
    assert rec.responses.shape == (shape[0], shape[1], 1)
    assert rec.site_id[0] == f"{session}_n000" and set(rec.areas) == {"V4"}
    # row k-1 is the member named image{k:04d}.jpg
    with zipfile.ZipFile(cowley.images_path(root, session)) as zf:
        names = {n.rsplit("/", 1)[-1]: n for n in zf.namelist()}
        for k in (1, shape[1]):
            want = _decode(zf.read(names[f"image{k:04d}.jpg"]))
            assert torch.equal(x[k - 1], torch.from_numpy(want).permute(2, 0, 1).float() / 255)


@requires_cowley
def test_real_foldered_shuffled_copy(tmp_path):
    """A few real JPEGs rewritten into a shuffled, foldered zip load in image order."""
    src = cowley.images_path(cowley_root(), "201025")
    with zipfile.ZipFile(src) as zf:
        jpegs = [zf.read(f"image{k:04d}.jpg") for k in range(1, 9)]
    resp = np.load(cowley.averaged_path(cowley_root(), "201025"))[:3, :8]
    order = list(range(8))
    random.Random(0).shuffle(order)
    root = _make_root(tmp_path, "201025", jpegs, resp, folder="images_201025", order=order)
    ids, x, rec = cowley.load_session(root, "201025")
    _, ref, _ = cowley.load_session(cowley_root(), "201025")
    assert torch.equal(x, ref[:8])
    np.testing.assert_array_equal(rec.mean(), resp)


@requires_cowley
def test_real_raw_210325():
    root = cowley_root()
    raw = cowley.load_raw(root, "210325")
    avg = cowley.load_averaged(root, "210325")
    assert raw.responses.shape[:2] == avg.responses.shape[:2] == (50, 640)
    n = raw.n_repeats()
    assert n.min() >= 6 and n.max() <= raw.responses.shape[2]
    np.testing.assert_allclose(raw.mean(), avg.mean(), rtol=1e-12, atol=1e-12)
    assert cowley.load_raw(root, "201025") is None
