"""Past recording sessions as training data for a shared core (``fit.weights: auto``).

The core stage (:mod:`synth.surrogate.core`) trains one core on a lab's other sessions.
Where those sessions live is the target's business; the core stage sees them through a
:class:`SessionSource`:

- :class:`CowleySessions`: the layout of the Cowley et al. (2023) release (image zips,
  repeat-averaged ``.npy`` responses, digital twins of some sessions);
- :class:`LabSessions`: a lab's own sessions in the ``kind: recordings`` layout, one image
  folder and one responses ``.npz`` per session, found through ``{session}`` in the
  target's paths (``images: "{session}/images"``, ``responses: "{session}/responses.npz"``).

Example:
    >>> src = LabSessions("lab_data", "{session}/images", "{session}/responses.npz", image_size=112, grayscale=True)
    >>> src.list_sessions()  # doctest: +SKIP
    ['2026-11-30', '2026-12-01']
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from synth.errors import ConfigError, DataError

#: The placeholder a ``kind: recordings`` target's paths use for the session id.
SESSION_FIELD = "{session}"


class SessionSource(Protocol):
    """The sessions under one data root, as the core stage needs them.

    ``checksum_files`` names are part of a core's cache key: a changed file retrains it.
    """

    kind: str
    root: str

    def list_sessions(self) -> list[str]:
        """Every session present (sorted; none is assumed)."""

    def checksum_files(self, session: str) -> dict[str, Path]:
        """``{name: path}`` of the files a session's training data is read from."""

    def load(self, session: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, C, H, W)`` in [0, 1] as the source stores them and repeat-averaged
        responses ``(N, S)``."""

    def in_mode(self, x: torch.Tensor, grayscale: bool) -> torch.Tensor:
        """Images from :meth:`load` in the experiment's image mode."""

    def twin_sessions(self) -> list[str]:
        """Sessions with digital twins (teachers for distillation)."""

    def twin_files(self, session: str) -> dict[str, Path]:
        """``{name: path}`` of a session's twin files."""

    def teacher(self, session: str, device: torch.device | str = "cpu"):
        """A session's twins as a recorder (``expected(images)``, ``site_model(k)``)."""


@dataclass(frozen=True)
class CowleySessions:
    """The sessions of a Cowley et al. (2023) data root (:mod:`synth.data.cowley`)."""

    root: str
    kind: str = "cowley2023"

    def list_sessions(self) -> list[str]:
        from synth.data import cowley

        return cowley.list_sessions(self.root)

    def checksum_files(self, session: str) -> dict[str, Path]:
        from synth.data import cowley

        return {f"{session}/{p.name}": p for p in (cowley.images_path(self.root, session), cowley.averaged_path(self.root, session))}

    def load(self, session: str) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images at the native 112 px (the twins' input) and repeat-averaged responses."""
        from synth.data import cowley

        _, x, rec = cowley.load_session(self.root, session, image_size=cowley.NATIVE_SIZE, grayscale=False)
        return x, torch.as_tensor(rec.mean().T, dtype=torch.float32)

    def in_mode(self, x: torch.Tensor, grayscale: bool) -> torch.Tensor:
        return to_mode(x, grayscale)

    def twin_sessions(self) -> list[str]:
        from synth.data import cowley

        return cowley.twin_sessions(self.root)

    def twin_files(self, session: str) -> dict[str, Path]:
        from synth.data import cowley

        return {f"{session}/{p.name}": p for p in cowley.twin_files(self.root, session).values()}

    def teacher(self, session: str, device: torch.device | str = "cpu"):
        """A teacher session's twins, computed on ``device``, calibrated on that session's own natural images."""
        from synth.populations.twins import build_cowley2023

        return build_cowley2023(root=self.root, session=session, followup_noise="none").recorder(device=device)


def to_mode(x_rgb: torch.Tensor, grayscale: bool) -> torch.Tensor:
    """RGB images to one luminance channel (BT.601 weights) when ``grayscale``."""
    from synth.data.cowley import to_luminance

    return to_luminance(x_rgb) if grayscale else x_rgb


def session_templates(images: str, responses: str) -> tuple[str, str] | None:
    """The ``(images, responses)`` paths when both hold ``{session}``, None when neither does.

    Raises:
        ConfigError: only one of them holds it (named by its ``params`` key).
    """
    has = {"params.images": SESSION_FIELD in str(images), "params.responses": SESSION_FIELD in str(responses)}
    if not any(has.values()):
        return None
    for key, t in (("params.images", images), ("params.responses", responses)):
        if not has[key]:
            raise ConfigError(f"{t!r} has no {SESSION_FIELD} while the other path has one; put it in both", key=key)
    return str(images), str(responses)


def find_sessions(root: str | os.PathLike, images: str, responses: str) -> list[str]:
    """Session ids under ``root`` whose responses file and image folder (templates with
    ``{session}``) both exist, sorted."""
    parts = os.path.join(str(root), responses).split(SESSION_FIELD)
    pattern = "*".join(glob.escape(p) for p in parts)
    regex = re.compile(re.escape(parts[0]) + r"(?P<s>[^/\\]+)" + "".join(r"(?P=s)" * (i > 1) + re.escape(p) for i, p in enumerate(parts[1:], 1)) + "$")
    found = set()
    for p in glob.glob(pattern):
        m = regex.match(p)
        if m and Path(p).is_file() and (Path(root) / images.replace(SESSION_FIELD, m.group("s"))).is_dir():
            found.add(m.group("s"))
    return sorted(found)


@dataclass(frozen=True)
class LabSessions:
    """A lab's sessions in the ``kind: recordings`` layout.

    Args:
        root: data root the templates are relative to.
        images: image folder template with ``{session}`` (``"{session}/images"``).
        responses: responses ``.npz`` template with ``{session}``.
        image_size: every session's images must have this size (``data.image_size``).
        grayscale: image mode (``data.grayscale``); images are checked against it.
    """

    root: str
    images: str
    responses: str
    image_size: int
    grayscale: bool
    kind: str = "recordings"

    def __post_init__(self) -> None:
        if session_templates(self.images, self.responses) is None:
            raise ConfigError(f"neither {self.images!r} nor {self.responses!r} holds {SESSION_FIELD}: they name one session only", key="params.images")

    def path(self, template: str, session: str) -> Path:
        return Path(self.root) / template.replace(SESSION_FIELD, session)

    def list_sessions(self) -> list[str]:
        """Sessions whose responses file and image folder both exist."""
        return find_sessions(self.root, self.images, self.responses)

    def checksum_files(self, session: str) -> dict[str, Path]:
        from synth.data.recordings import Recording
        from synth.populations.lab import image_files

        resp = self.path(self.responses, session)
        rec = Recording.load(resp)
        out = {f"{session}/{resp.name}": resp}
        folder = self.path(self.images, session)
        by_stem = image_files(folder)
        for sid in rec.stimulus_id:
            p = by_stem.get(str(sid))
            if p is None:
                raise DataError(f"{folder}: no image file for stimulus_id {sid!r} (expected {sid}.png or .jpg)")
            out[f"{session}/images/{p.name}"] = p
        return out

    def load(self, session: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at ``image_size`` in the source's mode (checked per file) and responses."""
        from synth.data.recordings import Recording
        from synth.populations.lab import load_image_folder

        resp = self.path(self.responses, session)
        rec = Recording.load(resp)
        means = rec.mean()
        if not np.isfinite(means).all():
            raise DataError(f"{resp}: some images have no valid repeat for some sites (NaN responses)")
        x, _ = load_image_folder(self.path(self.images, session), list(rec.stimulus_id), image_size=self.image_size, grayscale=self.grayscale)
        return x, torch.as_tensor(means.T, dtype=torch.float32)

    def in_mode(self, x: torch.Tensor, grayscale: bool) -> torch.Tensor:
        if bool(grayscale) != self.grayscale:
            raise DataError(f"{self.root}: sessions were loaded with grayscale={self.grayscale}, the core asks for {bool(grayscale)}")
        return x

    def twin_sessions(self) -> list[str]:
        return []

    def twin_files(self, session: str) -> dict[str, Path]:
        raise DataError(f"session {session} under {self.root} has no digital twins (a lab's sessions have none)")

    def teacher(self, session: str, device: torch.device | str = "cpu"):
        raise DataError(f"session {session} under {self.root} has no digital twins (a lab's sessions have none)")

