"""The stimulus set on disk: 8-bit PNGs, a manifest and the predictions.

Layout of a stimulus set folder ``DIR``::

    DIR/stimuli/<stimulus_id>.png   8-bit PNG at the exact display size: mode L
                                    (grayscale) or RGB; what the rig shows
    DIR/manifest.csv                one row per image (columns below)
    DIR/stimuli.npz                 stimulus_id (N,), site_id (S,), predicted (N, S),
                                    plus any extra (N, S) prediction arrays

Manifest columns: ``stimulus_id, file, objective, objective_spec, target_site`` (a
site_id), ``seed, steps, luminance, contrast`` (measured on the 8-bit image, /255),
``predicted_target``, ``width, height, mode, sha256`` (of the PNG file), then extra
columns (one per extra field; an extra (N, S) array ``X`` adds ``X_target``).

Predictions must come from the SAVED 8-bit images (PNG is lossless, so the uint8 array
written is exactly what is read back): compute them with
:func:`predict_stimulus_set` (reload + predict) or on the uint8 array you pass here
(e.g. ``synth.synthesis.score_with(model, images_u8)``), never on the float images of
the optimization.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from synth.errors import DataError
from synth.runtime import file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
NPZ = "stimuli.npz"
PNG_DIR = "stimuli"
CORE_COLUMNS = (
    "stimulus_id", "file", "objective", "objective_spec", "target_site", "seed", "steps",
    "luminance", "contrast", "predicted_target", "width", "height", "mode", "sha256",
)
_ID_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class StimulusSet:
    """A stimulus set read back from disk (manifest order).

    Attributes:
        stimulus_id: (N,) str.
        images: (N, C, H, W) float32 in [0, 1] (the 8-bit PNGs / 255).
        site_id: (S,) str.
        predicted: (N, S) float, from stimuli.npz (rows matched by stimulus_id).
        manifest: the manifest rows (str values), one per image.
        extra: other (N, S) arrays of stimuli.npz (rows matched by stimulus_id).
    """

    stimulus_id: np.ndarray
    images: torch.Tensor
    site_id: np.ndarray
    predicted: np.ndarray
    manifest: list[dict[str, str]]
    extra: dict[str, np.ndarray]

    def column(self, name: str) -> list[str]:
        """One manifest column (as strings)."""
        return [row.get(name, "") for row in self.manifest]


def _objective_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return str(spec.get("name", ""))
    if isinstance(spec, (list, tuple)):
        return "+".join(_objective_name(s) for s in spec)
    return str(spec)


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode one uint8 image (H, W, C) with C = 1 (mode L) or 3 (RGB) as PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected a uint8 image (H, W, 1|3), got {image.dtype} {image.shape}")
    img = Image.fromarray(np.ascontiguousarray(image[:, :, 0]) if image.shape[2] == 1 else np.ascontiguousarray(image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_stimulus_set(
    out_dir: str | os.PathLike,
    images: np.ndarray,
    jobs: Sequence[Any],
    site_ids: Sequence[str],
    predicted: np.ndarray,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write PNGs, manifest.csv and stimuli.npz (see module docstring).

    Args:
        out_dir: the stimulus set folder (created if needed).
        images: (N, H, W, C) uint8, C = 1 or 3, exactly as synthesized and quantized.
        jobs: (N,) :class:`synth.synthesis.Job` (stimulus_id, objective, target_site, seed).
        site_ids: (S,) site ids in the model's output order (``target_site`` indexes these).
        predicted: (N, S) predicted responses to THESE uint8 images.
        extra: per-image fields: (N,) values become manifest columns (``steps`` fills the
            steps column); (N, S) arrays (e.g. a held-out surrogate's predictions) are
            saved in stimuli.npz and add a ``<name>_target`` manifest column.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: inconsistent shapes, bad ids or dtypes (a programming error).
    """
    out = Path(out_dir)
    images = np.asarray(images)
    n = len(jobs)
    site_ids = np.asarray(site_ids).astype(str)
    s = site_ids.size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[3] not in (1, 3):
        raise ValueError(f"images must be uint8 (N={n}, H, W, 1|3), got {images.dtype} {images.shape}")
    predicted = np.asarray(predicted, dtype=np.float64)
    if predicted.shape != (n, s):
        raise ValueError(f"predicted must have shape ({n}, {s}), got {predicted.shape}")
    ids = [str(j.stimulus_id) for j in jobs]
    if len(set(ids)) != n:
        raise ValueError("stimulus ids must be unique")
    for sid in ids:
        if not _ID_RE.match(sid):
            raise ValueError(f"stimulus_id {sid!r} is not a safe file name (letters, digits, _ . + - only)")
    columns: dict[str, np.ndarray] = {}
    arrays: dict[str, np.ndarray] = {}
    for k, v in (extra or {}).items():
        a = np.asarray(v)
        if a.shape == (n, s):
            arrays[k] = a.astype(np.float64)
        elif a.shape == (n,):
            columns[k] = a
        else:
            raise ValueError(f"extra field {k!r} must have shape ({n},) or ({n}, {s}), got {a.shape}")
    reserved = set(CORE_COLUMNS) | {"site_id", "predicted"}
    clash = [k for k in arrays if k in reserved or f"{k}_target" in reserved]
    if clash:
        raise ValueError(f"extra array {clash[0]!r} clashes with a stimuli.npz / manifest name")

    png_dir = out / PNG_DIR
    png_dir.mkdir(parents=True, exist_ok=True)
    x = images.astype(np.float64) / 255.0
    lum = x.reshape(n, -1).mean(1)
    con = x.reshape(n, -1).std(1)
    h, w, c = images.shape[1:]
    mode = "L" if c == 1 else "RGB"
    rows = []
    for i, job in enumerate(jobs):
        t = int(job.target_site)
        if not 0 <= t < s:
            raise ValueError(f"job {ids[i]}: target_site {t} out of range for {s} sites")
        data = png_bytes(images[i])
        rel = f"{PNG_DIR}/{ids[i]}.png"
        tmp = out / f"{rel}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / rel)
        row = {
            "stimulus_id": ids[i],
            "file": rel,
            "objective": _objective_name(job.objective),
            "objective_spec": json.dumps(job.objective, sort_keys=True, default=str),
            "target_site": site_ids[t],
            "seed": int(job.seed),
            "steps": columns["steps"][i] if "steps" in columns else "",
            "luminance": float(lum[i]),
            "contrast": float(con[i]),
            "predicted_target": float(predicted[i, t]),
            "width": w,
            "height": h,
            "mode": mode,
            "sha256": file_sha256(out / rel),
        }
        for k, v in columns.items():
            if k in CORE_COLUMNS:
                if k not in ("steps",):
                    log.debug("extra column %s ignored: measured from the saved images", k)
                continue
            row[k] = v[i]
        for k, a in arrays.items():
            row[f"{k}_target"] = float(a[i, t])
        rows.append(row)

    header = list(CORE_COLUMNS) + [k for k in columns if k not in CORE_COLUMNS] + [f"{k}_target" for k in arrays]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    wr.writeheader()
    for row in rows:
        wr.writerow({k: _fmt(v) for k, v in row.items()})
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out / MANIFEST)
    tmp = out / f".{NPZ}.tmp.npz"
    np.savez(tmp, stimulus_id=np.asarray(ids), site_id=site_ids, predicted=predicted, **arrays)
    os.replace(tmp, out / NPZ)
    log.info("wrote %d stimuli (%dx%d %s) to %s", n, w, h, mode, out)
    return out


def read_stimulus_set(
    directory: str | os.PathLike,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    verify: bool = True,
) -> StimulusSet:
    """Read a stimulus set back, checking every PNG.

    Args:
        directory: the folder written by :func:`write_stimulus_set`.
        image_size: expected display size (checked when given).
        channels: expected channels, 1 (mode L) or 3 (RGB) (checked when given).
        verify: check each PNG's SHA-256 against the manifest.

    Returns:
        :class:`StimulusSet` in manifest order.

    Raises:
        DataError: naming the file, when the manifest or npz is missing/malformed, or a
            PNG is missing, altered (SHA-256 mismatch), or of the wrong size or mode.
    """
    d = Path(directory)
    man = d / MANIFEST
    if not man.is_file():
        raise DataError(f"{man}: manifest not found (not a stimulus set folder?)")
    try:
        with open(man, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = [dict(r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{man}: cannot read manifest: {err}") from None
    missing = [c for c in ("stimulus_id", "file", "sha256", "width", "height", "mode") if c not in fields]
    if missing:
        raise DataError(f"{man}: manifest lacks column(s) {', '.join(missing)}")
    if not rows:
        raise DataError(f"{man}: manifest has no rows")
    want_mode = None if channels is None else ("L" if channels == 1 else "RGB")
    arrays = []
    for line, row in enumerate(rows, start=2):
        path = d / row["file"]
        if not path.is_file():
            raise DataError(f"{path}: stimulus image missing (manifest line {line})")
        if verify:
            digest = file_sha256(path)
            if digest != row["sha256"]:
                raise DataError(f"{path}: SHA-256 mismatch (file {digest[:12]}..., manifest {row['sha256'][:12]}...); the image was altered")
        try:
            with Image.open(path) as im:
                im.load()
                mode, size = im.mode, im.size
                arr = np.asarray(im)
        except Exception as err:  # PIL raises many types for corrupt files
            raise DataError(f"{path}: not a readable PNG ({type(err).__name__})") from None
        try:
            exp_w, exp_h = int(row["width"]), int(row["height"])
        except ValueError:
            raise DataError(f"{man}: line {line}: bad width/height {row['width']!r}, {row['height']!r}") from None
        if size != (exp_w, exp_h) or (image_size is not None and size != (image_size, image_size)):
            want = (image_size, image_size) if image_size is not None else (exp_w, exp_h)
            raise DataError(f"{path}: image is {size[0]}x{size[1]}, expected {want[0]}x{want[1]}")
        if mode != row["mode"] or (want_mode is not None and mode != want_mode) or mode not in ("L", "RGB"):
            raise DataError(f"{path}: image mode {mode}, expected {want_mode or row['mode']} (8-bit)")
        arrays.append(arr[:, :, None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{d}: stimulus images differ in size or mode: {sorted(shapes)}")
    u8 = np.stack(arrays)
    images = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    ids = np.asarray([r["stimulus_id"] for r in rows])

    npz = d / NPZ
    if not npz.is_file():
        raise DataError(f"{npz}: predictions file not found")
    try:
        with np.load(npz, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:
        raise DataError(f"{npz}: cannot read ({type(err).__name__})") from None
    for k in ("stimulus_id", "site_id", "predicted"):
        if k not in data:
            raise DataError(f"{npz}: lacks array '{k}'")
    pos = {str(s): i for i, s in enumerate(data["stimulus_id"].astype(str))}
    absent = [s for s in ids if s not in pos]
    if absent:
        raise DataError(f"{npz}: no predictions for stimulus {absent[0]!r} of the manifest")
    order = np.array([pos[s] for s in ids])
    n_rows = data["stimulus_id"].shape[0]
    extra = {k: np.asarray(v)[order] for k, v in data.items() if k not in ("stimulus_id", "site_id", "predicted") and np.ndim(v) >= 1 and np.shape(v)[0] == n_rows}
    return StimulusSet(
        stimulus_id=ids,
        images=images,
        site_id=data["site_id"].astype(str),
        predicted=np.asarray(data["predicted"], dtype=np.float64)[order],
        manifest=rows,
        extra=extra,
    )


def predict_stimulus_set(model: torch.nn.Module, directory: str | os.PathLike, *, device: torch.device | str | None = None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Reload a stimulus set's saved PNGs (checking them) and predict responses to them.

    Returns:
        ``(stimulus_id (N,), predicted (N, S))`` in manifest order.
    """
    from synth.synthesis.scoring import score_with

    st = read_stimulus_set(directory)
    return st.stimulus_id, score_with(model, st.images, device=device, batch_size=batch_size)


def reload_images(images: np.ndarray) -> np.ndarray:
    """Round-trip uint8 images (N, H, W, C) through PNG encoding (what a reader will get)."""
    out = []
    for im in np.asarray(images):
        with Image.open(io.BytesIO(png_bytes(im))) as p:
            a = np.asarray(p)
        out.append(a[:, :, None] if a.ndim == 2 else a)
    return np.stack(out)
