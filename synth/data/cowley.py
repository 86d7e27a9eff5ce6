"""Loader for the public V4 data of Cowley, Stan, Pillow & Smith (2023).

Reads the layout of the public repository ``cowleygroup/V4_compact_models`` (the layout
``synth data fetch cowley2023`` writes)::

    <root>/data_V4_responses/images/images_<session>.zip          # image%04d.jpg, k from 1
    <root>/data_V4_responses/responses_repeat_averaged/responses_<session>.npy   # (S, N)
    <root>/data_V4_responses/responses_raw/responses_<session>.npy             # (S, N, R), optional
    <root>/data_compact_models/models_torch/compact_model_<session>_neuron<k>.pt

Image ``k`` of a session is the zip member whose base name is ``image%04d.jpg``; it is
column ``k - 1`` of the response arrays. Members are matched by base name (zips may put
them in a folder and list them out of order), never by position.

Ids: ``stimulus_id`` is ``"<session>_<k:04d>"`` (``"201025_0001"`` is image0001.jpg) and
``site_id`` is ``"<session>_n<i:03d>"`` for row ``i`` (0-based) of the response arrays.

The data are GPL-3.0: read them where they are, never copy them into a repository.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synth.data.recordings import Recording
from synth.errors import DataError

log = logging.getLogger(__name__)

IMAGES_DIR = "data_V4_responses/images"
AVERAGED_DIR = "data_V4_responses/responses_repeat_averaged"
RAW_DIR = "data_V4_responses/responses_raw"
MODELS_DIR = "data_compact_models/models_torch"
NATIVE_SIZE = 112
AREA = "V4"

_ZIP_RE = re.compile(r"^images_(\w+)\.zip$")
_NPY_RE = re.compile(r"^responses_(\w+)\.npy$")
_MEMBER_RE = re.compile(r"^image(\d+)\.jpe?g$", re.IGNORECASE)
#: ITU-R BT.601 luma weights (PIL's "L" conversion).
LUMA = (0.299, 0.587, 0.114)


def images_path(root: str | os.PathLike, session: str) -> Path:
    """Path of a session's image zip."""
    return Path(root) / IMAGES_DIR / f"images_{session}.zip"


def averaged_path(root: str | os.PathLike, session: str) -> Path:
    """Path of a session's repeat-averaged responses (S, N)."""
    return Path(root) / AVERAGED_DIR / f"responses_{session}.npy"


def raw_path(root: str | os.PathLike, session: str) -> Path:
    """Path of a session's raw responses (S, N, R); may not exist."""
    return Path(root) / RAW_DIR / f"responses_{session}.npy"


def stimulus_ids(session: str, n: int) -> np.ndarray:
    """``"<session>_0001"`` ... for images 1..n (column k-1 <-> image k)."""
    return np.array([f"{session}_{k:04d}" for k in range(1, n + 1)])


def site_id(session: str, i: int) -> str:
    """``"<session>_n<i:03d>"``: response row ``i`` of a session, and the name of its twin."""
    return f"{session}_n{int(i):03d}"


def site_ids(session: str, n: int) -> np.ndarray:
    """``"<session>_n000"`` ... for response rows 0..n-1."""
    return np.array([site_id(session, i) for i in range(n)])


def _check_root(root: str | os.PathLike) -> Path:
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: Cowley 2023 data root not found (get it with `synth data fetch cowley2023 --root {r}`)")
    return r


def list_sessions(root: str | os.PathLike) -> list[str]:
    """Sessions present under ``root`` (an image zip or a repeat-averaged response file).

    Sessions are discovered from file names, so any session of the public data set that
    was downloaded is found. A session with only one of its two files is listed; loading
    it raises a DataError naming the missing file.

    Returns:
        Sorted session ids, e.g. ``["190923", "201025"]``.
    """
    r = _check_root(root)
    found: set[str] = set()
    for sub, pat in ((IMAGES_DIR, _ZIP_RE), (AVERAGED_DIR, _NPY_RE)):
        d = r / sub
        if d.is_dir():
            for p in d.iterdir():
                m = pat.match(p.name)
                if m and p.is_file():
                    found.add(m.group(1))
    return sorted(found)


def _check_session(root: str | os.PathLike, session: str) -> None:
    sessions = list_sessions(root)
    if str(session) not in sessions:
        from synth.registry import did_you_mean

        raise DataError(
            f"{root}: no session '{session}'{did_you_mean(str(session), sessions)}; "
            f"sessions present: {', '.join(sessions) or '(none)'}"
        )


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: response file not found")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as err:  # ValueError, OSError, EOFError...
        raise DataError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})") from None
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{path}: expected a numeric array, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def load_averaged(root: str | os.PathLike, session: str) -> Recording:
    """Repeat-averaged responses of a session as a Recording with R = 1.

    Raises:
        DataError: missing/unreadable file, wrong shape, NaN or inf values.
    """
    path = averaged_path(root, session)
    a = _load_npy(path)
    if a.ndim != 2:
        raise DataError(f"{path}: expected (neurons, images) responses, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise DataError(f"{path}: {bad} repeat-averaged responses are NaN or inf (expected none)")
    s, n = a.shape
    return Recording(stimulus_id=stimulus_ids(session, n), site_id=site_ids(session, s), responses=a[:, :, None], areas=np.array([AREA] * s))


def load_raw(root: str | os.PathLike, session: str) -> Recording | None:
    """Single-repeat responses (S, N, R), NaN-padded, or None when the session has none.

    Raises:
        DataError: unreadable file, wrong shape, inf values, an image with no repeat, or a
            shape that disagrees with the repeat-averaged file.
    """
    path = raw_path(root, session)
    if not path.exists():
        return None
    a = _load_npy(path)
    if a.ndim != 3:
        raise DataError(f"{path}: expected (neurons, images, repeats) responses, got shape {a.shape}")
    if np.isinf(a).any():
        raise DataError(f"{path}: responses contain inf")
    s, n, _ = a.shape
    avg = averaged_path(root, session)
    if avg.exists():
        shape = np.load(avg, mmap_mode="r").shape
        if tuple(shape) != (s, n):
            raise DataError(f"{path}: shape {a.shape} does not match {avg} shape {tuple(shape)} (neurons, images)")
    counts = np.sum(~np.isnan(a), axis=2)
    if (counts == 0).any():
        raise DataError(f"{path}: {int((counts == 0).sum())} (neuron, image) pairs have no repeat")
    return Recording(stimulus_id=stimulus_ids(session, n), site_id=site_ids(session, s), responses=a, areas=np.array([AREA] * s))


def read_zip_images(path: str | os.PathLike) -> np.ndarray:
    """Decode the ``image%04d.jpg`` members of a zip in image order (k = 1, 2, ...).

    Returns:
        uint8 (N, H, W, 3) array, row k-1 = member ``image{k:04d}.jpg``.

    Raises:
        DataError: missing or corrupt zip, corrupt member (named), duplicate or missing
            image numbers, images of different sizes.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: image zip not found")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable zip file ({err})") from None
    with zf:
        by_k: dict[int, str] = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
            m = _MEMBER_RE.match(base)
            if not m:
                continue
            k = int(m.group(1))
            if k in by_k:
                raise DataError(f"{path}: two members for image {k}: {by_k[k]} and {info.filename}")
            by_k[k] = info.filename
        if not by_k:
            raise DataError(f"{path}: no image%04d.jpg members found")
        n = max(by_k)
        missing = [k for k in range(1, n + 1) if k not in by_k]
        if missing or min(by_k) < 1:
            what = f"image{missing[0]:04d}.jpg" if missing else "image0000.jpg (numbering starts at 1)"
            raise DataError(f"{path}: {len(by_k)} images numbered up to {n}, missing or unexpected member {what}")
        out: np.ndarray | None = None
        for k in range(1, n + 1):
            name = by_k[k]
            try:
                data = zf.read(name)
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    arr = np.asarray(im.convert("RGB"))
            except (zipfile.BadZipFile, zlib.error, UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError) as err:
                raise DataError(f"{path}: member {name}: cannot read JPEG ({type(err).__name__}: {err})") from None
            if out is None:
                out = np.empty((n,) + arr.shape, dtype=np.uint8)
            elif arr.shape != out.shape[1:]:
                raise DataError(f"{path}: member {name} is {arr.shape[1]}x{arr.shape[0]}, expected {out.shape[2]}x{out.shape[1]} like image0001.jpg")
            out[k - 1] = arr
    assert out is not None
    return out


def to_tensor(images: np.ndarray, *, image_size: int = NATIVE_SIZE, grayscale: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, C, image_size, image_size) in [0, 1].

    Resizing (when the size differs) is bilinear with antialiasing; ``grayscale`` gives
    one luminance channel (BT.601 weights).
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    if grayscale:
        x = to_luminance(x)
    return x.contiguous()


def to_luminance(x_rgb: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB in [0, 1] to ``(N, 1, H, W)`` luminance (BT.601 weights ``LUMA``)."""
    w = torch.tensor(LUMA, dtype=x_rgb.dtype).view(1, 3, 1, 1)
    return (x_rgb * w).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)


def _session_arrays(root: str | os.PathLike, session: str) -> tuple[Recording, np.ndarray]:
    """A session's repeat-averaged Recording and its decoded uint8 images (N, H, W, 3), checked
    to be as many as the response columns."""
    _check_session(root, session)
    rec = load_averaged(root, session)
    zpath = images_path(root, session)
    raw = read_zip_images(zpath)
    if raw.shape[0] != rec.n_stimuli:
        raise DataError(
            f"{zpath}: {raw.shape[0]} images but {averaged_path(root, session)} has {rec.n_stimuli} response columns"
        )
    return rec, raw


def _check_trial_means(root: str | os.PathLike, session: str, trials: Recording, averaged: Recording) -> None:
    """A session's single trials must average to its repeat-averaged file (they do in the
    published data), or the two files disagree about what was recorded."""
    means = trials.mean()
    if not np.allclose(means, averaged.responses[:, :, 0], rtol=1e-6, atol=1e-9):
        worst = float(np.max(np.abs(means - averaged.responses[:, :, 0])))
        raise DataError(
            f"{raw_path(root, session)}: the single trials' means differ from {averaged_path(root, session)} "
            f"by up to {worst:.3g} (expected the repeat-averaged file to be their mean)"
        )


def load_session(root: str | os.PathLike, session: str, *, image_size: int = NATIVE_SIZE, grayscale: bool = False) -> tuple[np.ndarray, torch.Tensor, Recording]:
    """Images and repeat-averaged responses of one session.

    Args:
        root: data root (the layout in the module docstring).
        session: session id, e.g. ``"201025"`` (see ``list_sessions``).
        image_size: output side length; the native 112 is kept as is, other sizes are
            resized with antialiasing.
        grayscale: return one luminance channel instead of RGB.

    Returns:
        ``(stimulus_id, images, recording)``: stimulus ids (N,), images float32
        (N, C, image_size, image_size) in [0, 1] in stimulus-id order, and the
        repeat-averaged Recording (S, N, 1) with the same stimulus ids. Single repeats,
        where published, come from ``load_raw``.

    Raises:
        DataError: missing or corrupt file (named), or a different number of images and
            response columns.
    """
    session = str(session)
    rec, raw = _session_arrays(root, session)
    zpath = images_path(root, session)
    if raw.shape[1:3] != (NATIVE_SIZE, NATIVE_SIZE):
        log.warning("%s: images are %dx%d, expected %dx%d", zpath, raw.shape[2], raw.shape[1], NATIVE_SIZE, NATIVE_SIZE)
    x = to_tensor(raw, image_size=image_size, grayscale=grayscale)
    log.debug("loaded session %s: %d images, %d sites", session, rec.n_stimuli, rec.n_sites)
    return rec.stimulus_id.copy(), x, rec


def twin_files(root: str | os.PathLike, session: str) -> dict[int, Path]:
    """Compact-model (digital twin) files of a session: {neuron index k: path}."""
    d = Path(root) / MODELS_DIR
    pat = re.compile(rf"^compact_model_{re.escape(str(session))}_neuron(\d+)\.pt$")
    out: dict[int, Path] = {}
    if d.is_dir():
        for p in d.iterdir():
            m = pat.match(p.name)
            if m:
                out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def twin_sessions(root: str | os.PathLike) -> list[str]:
    """Sessions that have compact models (digital twins) under ``root``."""
    r = _check_root(root)
    d = r / MODELS_DIR
    pat = re.compile(r"^compact_model_(\w+?)_neuron\d+\.pt$")
    found = set()
    if d.is_dir():
        for p in d.iterdir():
            m = pat.match(p.name)
            if m:
                found.add(m.group(1))
    return sorted(found)


def write_lab_layout(root: str | os.PathLike, out: str | os.PathLike, *, sessions: list[str] | None = None) -> list[str]:
    """Write sessions in a lab's layout: ``<out>/<session>/images/<stimulus_id>.png`` and
    ``<out>/<session>/responses.npz``.

    That is the layout of ``targets/lab_example.yaml`` with ``{session}`` paths
    (``configs/lab_sessions.yaml``), so a lab can run its own path on real V4 data, with a
    session's digital twins as the subject of ``synth record``. Images are the published
    JPEGs decoded to 8-bit RGB PNGs (112 px, as recorded); responses are a session's single
    trials ``(S, N, R)``, NaN-padded, where the source has them (``responses_raw``: 210325;
    their means are the repeat-averaged file's), else the repeat-averaged ones ``(S, N, 1)``,
    with the loader's ids. Written in a hidden sibling folder and
    renamed when complete; ``out`` must not exist. The copies are GPL-3.0 like the source.

    Args:
        root: data root (the layout in the module docstring).
        out: folder to create.
        sessions: session ids (default: every session under ``root``).

    Returns:
        The sessions written.

    Raises:
        DataError: ``out`` exists, an unknown session, a missing or corrupt file.
    """
    import shutil
    import tempfile

    from PIL import Image

    from synth.runtime import progress

    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: exists; choose a new folder (nothing is overwritten)")
    have = list_sessions(root)
    sessions = have if sessions is None else [str(s) for s in sessions]
    unknown = [s for s in sessions if s not in have]
    if unknown:
        raise DataError(f"{Path(root)}: no session '{unknown[0]}'; sessions present: {', '.join(have) or '(none)'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for s in progress(sessions, desc="sessions written", total=len(sessions)):
            rec, raw = _session_arrays(root, s)
            trials = load_raw(root, s)
            if trials is not None:
                _check_trial_means(root, s, trials, rec)
                rec = trials
            d = work / s / "images"
            d.mkdir(parents=True)
            for sid, a in zip(rec.stimulus_id, raw):
                Image.fromarray(a, "RGB").save(d / f"{sid}.png")
            np.savez(work / s / "responses.npz", stimulus_id=rec.stimulus_id, site_id=rec.site_id, responses=rec.responses)
            log.info("session %s: %d images, %d sites%s", s, rec.n_stimuli, rec.n_sites, ", single trials" if trials is not None else "")
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return sessions
