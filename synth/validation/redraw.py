"""How much of a recorded control figure is the luck of one recording?

A simulated follow-up (digital twins, the virtual population) draws its trials around
expected responses it knows. One recording is one draw: the natural maximum and a
target's best image are both picked on noisy repeat means, so the stretch fraction and
the one-hot ratio move from draw to draw even with the same images. ``redraw_figures``
records the same images again ``draws`` times with fresh trial noise and gives the
distribution of each headline figure (``synth bench redraw RUN_DIR``): what a lab should
expect from such a recording, and where the run's own draw fell. Simulation only; a real
recording is one draw.

Example:
    >>> out = redraw_figures(recorder, images, ids, natural_ids, manifest,
    ...                      n_repeats=10, draws=20, seed=0)           # doctest: +SKIP
    >>> out.summary("stretch.fraction_above_natural_max")               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from synth.data.recordings import Recording
from synth.runtime import derive_seed, progress
from synth.validation.control import closed_loop_metrics

#: the headline figures redrawn, as ``block.key`` of ``closed_loop_metrics``
FIGURES = (
    "stretch.fraction_above_natural_max",
    "stretch.median_gain",
    "one_hot.median_score_ratio",
    "one_hot.fraction_beating_best_natural",
)


@dataclass(frozen=True)
class Redrawn:
    """Headline control figures over redrawn recordings.

    Attributes:
        values: figure -> ``(draws,)`` values, one per recording.
        expected: figure -> the value on the expected responses (no trial noise).
    """

    values: dict[str, np.ndarray]
    expected: dict[str, float]

    def summary(self, figure: str) -> dict[str, float]:
        """Mean, sd and 5th / 95th percentiles of a figure over the draws."""
        v = self.values[figure]
        v = v[np.isfinite(v)]
        if v.size == 0:
            return {"mean": float("nan"), "sd": float("nan"), "p5": float("nan"), "p95": float("nan")}
        return {"mean": float(v.mean()), "sd": float(v.std()), "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}

    def rank(self, figure: str, value: float) -> float:
        """Fraction of the draws below ``value`` (ties count half)."""
        v = self.values[figure]
        v = v[np.isfinite(v)]
        return float(((v < value).sum() + 0.5 * (v == value).sum()) / max(v.size, 1))


def headline_figures(m: Mapping) -> dict[str, float]:
    """The :data:`FIGURES` of a ``closed_loop_metrics`` dict or a ``report.json`` (NaN where absent)."""
    out = {}
    for f in FIGURES:
        block, key = f.split(".")
        v = (m.get(block) or {}).get(key)
        out[f] = float("nan") if v is None else float(v)
    return out


def manifest_of_sites(manifest: Sequence[Mapping[str, str]], sites: Sequence[str]) -> list[Mapping[str, str]]:
    """The manifest rows of the images made for one of ``sites`` (their ``target_site``).

    Figures over these rows are a subset's: the stretch fraction and one-hot ratio of those
    targets only, each one-hot score still taken against every recorded site. Used to
    compare runs that synthesized for different sites on the sites they share.

    Raises:
        ValueError: a site that no row targets (the message names it).
    """
    want = [str(s) for s in sites]
    wanted = set(want)
    rows = [r for r in manifest if str(r["target_site"]) in wanted]
    have = {str(r["target_site"]) for r in rows}
    missing = [s for s in want if s not in have]
    if missing:
        raise ValueError(f"no image targets site {missing[0]}")
    return rows


def noise_free_metrics(
    mean: torch.Tensor,
    stimulus_ids: Sequence[str],
    site_ids: Sequence[str],
    manifest: Sequence[Mapping[str, str]],
    natural_ids: Sequence[str],
) -> dict:
    """``closed_loop_metrics`` on a simulated recorder's expected responses (no trial noise).

    Args:
        mean: ``(N, S)`` expected responses to the images ``stimulus_ids`` (natural and
            synthesized), sites in ``site_ids`` order.
        stimulus_ids, site_ids, manifest, natural_ids: as for ``closed_loop_metrics``.
    """
    exp = Recording(
        stimulus_id=np.asarray([str(s) for s in stimulus_ids]),
        site_id=np.asarray(site_ids).astype(str),
        responses=mean.cpu().numpy().astype(np.float64).T[:, :, None],
    )
    return closed_loop_metrics(exp, None, manifest, natural_ids, n_bootstrap=0)


def redraw_figures(
    recorder,
    images: torch.Tensor,
    stimulus_ids: Sequence[str],
    natural_ids: Sequence[str],
    manifest: Sequence[Mapping[str, str]],
    *,
    n_repeats: int,
    draws: int,
    seed: int,
    original: Recording | None = None,
    mean: torch.Tensor | None = None,
) -> Redrawn:
    """The control figures of ``draws`` fresh recordings of the same images.

    Args:
        recorder: a simulated recorder (``expected(images)`` and ``record(...)``).
        images: ``(N, C, H, W)`` the natural and the synthesized images, in
            ``stimulus_ids`` order.
        stimulus_ids: ``(N,)`` their ids.
        natural_ids: the natural set's ids (its maxima and z-scores).
        manifest: the stimulus set's manifest rows (objective, target site per image).
        n_repeats: trials per image and recording.
        draws: recordings to draw (>= 2).
        seed: draw ``d`` records with ``derive_seed(seed, "redraw", d)``.
        original: when given, the natural images are not re-recorded: their statistics
            come from this recording (``followup.record_natural: false``) and only the
            other images are redrawn. The noise-free figures use the recorder's expected
            responses to every image either way (as ``report.json → noise_free``).
        mean: ``(N, S)`` the recorder's expected responses to ``images`` when already
            computed (default: computed here).

    Returns:
        :class:`Redrawn`.
    """
    if draws < 2:
        raise ValueError(f"draws must be >= 2, got {draws}")
    ids = [str(s) for s in stimulus_ids]
    if len(ids) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(ids)} stimulus ids")
    if mean is None:
        mean = recorder.expected(images)
    elif tuple(mean.shape) != (len(ids), len(recorder.site_ids)):
        raise ValueError(f"expected responses of shape {(len(ids), len(recorder.site_ids))}, got {tuple(mean.shape)}")
    expected = headline_figures(noise_free_metrics(mean, ids, recorder.site_ids, manifest, natural_ids))
    rows = np.arange(len(ids))
    if original is not None:
        natural = set(str(s) for s in natural_ids)
        rows = np.array([i for i, s in enumerate(ids) if s not in natural], dtype=int)
    values: dict[str, list[float]] = {f: [] for f in FIGURES}
    for d in progress(range(draws), desc="redrawn recordings", total=draws):
        rec = recorder.record(images[rows], [ids[i] for i in rows], n_repeats=n_repeats, seed=derive_seed(seed, "redraw", d), expected=mean[rows])
        if original is not None:
            rec = original.concat(rec)
        for f, v in headline_figures(closed_loop_metrics(rec, None, manifest, natural_ids, n_bootstrap=0)).items():
            values[f].append(v)
    return Redrawn(values={f: np.asarray(v) for f, v in values.items()}, expected=expected)
