"""Recordings: responses of sites to stimuli, joined by ``stimulus_id`` and ``site_id``.

The on-disk format (``.npz``) is the one ``synth validate`` reads:
``stimulus_id`` (N,) str, ``site_id`` (S,) str, ``responses`` (S, N, R) float with
repeats NaN-padded (repeat counts may differ between images).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from synth.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recording:
    """Responses of S sites to N stimuli, R repeat slots (NaN where a repeat is absent).

    Attributes:
        stimulus_id: (N,) unique strings.
        site_id: (S,) unique strings.
        responses: (S, N, R) float64, NaN-padded along the last axis.
        areas: optional (S,) area labels ("V4", "IT", ...).
    """

    stimulus_id: np.ndarray
    site_id: np.ndarray
    responses: np.ndarray
    areas: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        sid = np.asarray(self.stimulus_id).astype(str)
        site = np.asarray(self.site_id).astype(str)
        resp = np.asarray(self.responses, dtype=np.float64)
        if resp.ndim == 2:
            resp = resp[:, :, None]
        if resp.ndim != 3:
            raise DataError(f"responses must be (sites, stimuli, repeats), got shape {resp.shape}")
        if resp.shape[:2] != (site.size, sid.size):
            raise DataError(
                f"responses shape {resp.shape} does not match {site.size} sites x {sid.size} stimuli"
            )
        if len(set(sid.tolist())) != sid.size:
            raise DataError("stimulus_id values are not unique")
        if len(set(site.tolist())) != site.size:
            raise DataError("site_id values are not unique")
        if np.isinf(resp).any():
            raise DataError("responses contain inf")
        object.__setattr__(self, "stimulus_id", sid)
        object.__setattr__(self, "site_id", site)
        object.__setattr__(self, "responses", resp)
        if self.areas is not None:
            areas = np.asarray(self.areas).astype(str)
            if areas.shape != site.shape:
                raise DataError(f"areas has shape {areas.shape}, expected {site.shape}")
            object.__setattr__(self, "areas", areas)

    @property
    def n_sites(self) -> int:
        return int(self.site_id.size)

    @property
    def n_stimuli(self) -> int:
        return int(self.stimulus_id.size)

    def mean(self) -> np.ndarray:
        """Repeat-averaged responses, (S, N); NaN where an image has no repeat."""
        k = np.sum(~np.isnan(self.responses), axis=2)
        total = np.where(np.isnan(self.responses), 0.0, self.responses).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(k > 0, total / np.maximum(k, 1), np.nan)

    def n_repeats(self) -> np.ndarray:
        """Repeats per image, (N,) (counted on the first site)."""
        return np.sum(~np.isnan(self.responses[0]), axis=1) if self.n_sites else np.zeros(self.n_stimuli, int)

    def select(self, *, stimuli: np.ndarray | list[str] | None = None, sites: np.ndarray | list[str] | None = None) -> "Recording":
        """Subset by ids (in the order given); DataError if an id is absent."""
        si = np.arange(self.n_stimuli)
        ti = np.arange(self.n_sites)
        if stimuli is not None:
            pos = {s: i for i, s in enumerate(self.stimulus_id)}
            missing = [s for s in np.asarray(stimuli).astype(str) if s not in pos]
            if missing:
                raise DataError(f"{len(missing)} stimulus ids not in recording, e.g. {missing[0]!r}")
            si = np.array([pos[s] for s in np.asarray(stimuli).astype(str)], dtype=int)
        if sites is not None:
            pos = {s: i for i, s in enumerate(self.site_id)}
            missing = [s for s in np.asarray(sites).astype(str) if s not in pos]
            if missing:
                raise DataError(f"{len(missing)} site ids not in recording, e.g. {missing[0]!r}")
            ti = np.array([pos[s] for s in np.asarray(sites).astype(str)], dtype=int)
        return Recording(
            stimulus_id=self.stimulus_id[si],
            site_id=self.site_id[ti],
            responses=self.responses[np.ix_(ti, si)],
            areas=None if self.areas is None else self.areas[ti],
        )

    def concat(self, other: "Recording") -> "Recording":
        """This recording's stimuli followed by ``other``'s, sites joined by ``site_id``.

        Repeat slots are NaN-padded to the larger count. ``other`` must hold the same sites
        (any order) and no stimulus id of this one.

        Raises:
            DataError: different site sets or shared stimulus ids.
        """
        if set(self.site_id) != set(other.site_id):
            raise DataError(f"cannot join recordings of different sites ({self.n_sites} vs {other.n_sites} sites)")
        shared = set(self.stimulus_id) & set(other.stimulus_id)
        if shared:
            raise DataError(f"{len(shared)} stimulus ids are in both recordings, e.g. {sorted(shared)[0]!r}")
        other = other.select(sites=self.site_id)
        r = max(self.responses.shape[2], other.responses.shape[2])

        def pad(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.full(a.shape[:2] + (r - a.shape[2],), np.nan)], axis=2)

        return Recording(
            stimulus_id=np.concatenate([self.stimulus_id, other.stimulus_id]),
            site_id=self.site_id,
            responses=np.concatenate([pad(self.responses), pad(other.responses)], axis=1),
            areas=self.areas,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``.npz`` format (see module docstring)."""
        kw = dict(stimulus_id=self.stimulus_id, site_id=self.site_id, responses=self.responses)
        if self.areas is not None:
            kw["areas"] = self.areas
        np.savez(path, **kw)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recording":
        """Read the ``.npz`` format; DataError naming the file on any problem."""
        path = str(path)
        if not os.path.exists(path):
            raise DataError(f"{path}: recording file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("stimulus_id", "site_id", "responses") if k not in z.files]
                if missing:
                    raise DataError(f"{path}: missing array(s) {', '.join(missing)}; expected stimulus_id, site_id, responses")
                return cls(
                    stimulus_id=z["stimulus_id"],
                    site_id=z["site_id"],
                    responses=z["responses"],
                    areas=z["areas"] if "areas" in z.files else None,
                )
        except DataError as err:
            msg = str(err)
            raise DataError(msg if msg.startswith(path) else f"{path}: {msg}") from None
        except Exception as err:  # zipfile.BadZipFile, ValueError, OSError ...
            raise DataError(f"{path}: not a readable .npz recording ({type(err).__name__}: {err})") from None
