"""A lab's own recordings as a target: an image folder + a responses file.

The follow-up recording is the lab's rig, so this target has no simulated recorder:
``synth run`` stops after writing the stimulus set (with the model's predictions), and
``synth validate`` scores the real follow-up recording later.

targets/<name>.yaml::

    name: my_v4_array
    kind: recordings
    params:
      images: data/my_session/images      # <stimulus_id>.png / .jpg / .jpeg files
      responses: data/my_session/responses.npz   # stimulus_id, site_id, responses (S, N, R)
      areas: V4                            # one label for all sites (optional)

Several sessions under one root: put ``{session}`` in both paths (``images:
"{session}/images"``, ``responses: "{session}/responses.npz"``) and pick today's with
``target.session``. The other sessions can then train a shared core (``fit.backbone:
pretrained_core``, ``fit.weights: auto``; :mod:`synth.surrogate.core`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synth.data.recordings import Recording
from synth.errors import ConfigError, DataError
from synth.populations.base import TARGETS, NaturalData
from synth.runtime import file_sha256

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_image_folder(folder: str | os.PathLike, stimulus_ids: list[str], *, image_size: int, grayscale: bool) -> tuple[torch.Tensor, dict[str, str]]:
    """Load ``<stimulus_id>.<ext>`` images from a folder, checking size and mode.

    Returns:
        images (N, C, image_size, image_size) float32 in [0, 1] in the order of
        ``stimulus_ids``, and {file: sha256}.

    Raises:
        DataError: a missing, unreadable, wrongly sized or wrongly coloured image (named).
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    by_stem = image_files(folder)
    out = np.empty((len(stimulus_ids), image_size, image_size, 1 if grayscale else 3), dtype=np.uint8)
    sums: dict[str, str] = {}
    for i, sid in enumerate(stimulus_ids):
        p = by_stem.get(sid)
        if p is None:
            raise DataError(f"{folder}: no image file for stimulus_id {sid!r} (expected {sid}.png or .jpg)")
        try:
            with Image.open(p) as im:
                im.load()
                mode = im.mode
                if im.size != (image_size, image_size):
                    raise DataError(f"{p}: image is {im.size[0]}x{im.size[1]}, expected {image_size}x{image_size} (data.image_size)")
                if grayscale:
                    if mode not in ("L", "I;16", "I"):
                        if mode == "RGB" and _is_gray(np.asarray(im)):
                            im = im.convert("L")
                        else:
                            raise DataError(f"{p}: colour image (mode {mode}) but data.grayscale is true")
                    arr = np.asarray(im.convert("L"))[..., None]
                else:
                    if mode not in ("RGB", "L"):
                        raise DataError(f"{p}: image mode {mode}, expected RGB or L")
                    arr = np.asarray(im.convert("RGB"))
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{p}: cannot read image ({err})") from None
        out[i] = arr
        sums[str(p)] = file_sha256(p)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0, sums


def image_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{stimulus_id: path}`` of the image files in a folder (``IMAGE_EXTS``).

    Raises:
        DataError: the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


def _is_gray(a: np.ndarray) -> bool:
    return a.ndim == 3 and bool(np.all(a[..., 0] == a[..., 1])) and bool(np.all(a[..., 1] == a[..., 2]))


@dataclass
class LabRecordingsTarget:
    """Natural images and responses recorded by a lab; no simulated follow-up recorder."""

    name: str
    images: str
    responses: str
    area: str = "V4"
    root: str | None = None
    session: str | None = None
    templates: tuple[str, str] | None = None  # (images, responses) with {session}, when the root holds several sessions

    def __post_init__(self) -> None:
        self._rec = Recording.load(self.responses)
        self.site_ids = self._rec.site_id
        self.areas = np.array([self.area] * self._rec.n_sites)

    def natural(self, *, image_size: int, grayscale: bool, seed: int) -> NaturalData:  # noqa: ARG002
        rec = self._rec
        means = rec.mean()
        if not np.isfinite(means).all():
            raise DataError(f"{self.responses}: some images have no valid repeat for some sites (NaN responses)")
        x, sums = load_image_folder(self.images, list(rec.stimulus_id), image_size=image_size, grayscale=grayscale)
        sums[str(self.responses)] = file_sha256(self.responses)
        return NaturalData(images=x, recording=rec, stimulus_id=rec.stimulus_id, info={"images": self.images, "responses": self.responses, "checksums": sums})

    def sessions(self, *, image_size: int, grayscale: bool):
        """The sessions under the root (:class:`~synth.data.sessions.LabSessions`), or
        None when the paths name one session only."""
        if self.templates is None:
            return None
        from synth.data.sessions import LabSessions

        return LabSessions(str(self.root or "."), *self.templates, image_size=int(image_size), grayscale=bool(grayscale))

    def recorder(self, device: torch.device | str | None = None) -> None:  # noqa: ARG002
        """None: a lab's follow-up is recorded on the rig (then ``synth validate``)."""
        return None


@TARGETS.register("recordings")
def build_lab_target(*, images: str, responses: str, area: str = "V4", name: str = "lab", root: str | None = None, session: str | None = None) -> LabRecordingsTarget:
    """Builder for ``kind: recordings`` (paths relative to ``root`` when given; with
    ``{session}`` in them, ``session`` fills it in)."""
    from synth.data.sessions import SESSION_FIELD, find_sessions, session_templates

    base = Path(root) if root else Path(".")
    templates = session_templates(images, responses)
    if templates is not None:
        if session is None:
            raise ConfigError(f"the target's paths hold {SESSION_FIELD}; choose today's session with target.session", key="target.session")
        session = str(session)
        if not session or any(c in session for c in "/\\") or session in (".", ".."):
            raise ConfigError(f"expected a session id (a folder name), got {session!r}", key="target.session")
        images, responses = images.replace(SESSION_FIELD, session), responses.replace(SESSION_FIELD, session)
    elif session is not None:
        log.debug("session %s ignored by the recordings target (no {session} in its paths)", session)
    img = base / images
    resp = base / responses
    if templates is not None and not (resp.is_file() and img.is_dir()):
        present = find_sessions(base, *templates)
        raise ConfigError(
            f"no session {session!r} under {base} ({resp} and {img} expected); sessions present: {', '.join(present) or 'none'}",
            key="target.session",
        )
    if not resp.exists():
        raise ConfigError(f"responses file not found: {resp}", key="params.responses")
    if not img.is_dir():
        raise ConfigError(f"image folder not found: {img}", key="params.images")
    return LabRecordingsTarget(
        name=name, images=str(img), responses=str(resp), area=area, root=str(base), session=session, templates=templates
    )
