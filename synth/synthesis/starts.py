"""Where each image's optimization starts: noise, or the natural images that already do best.

By default every image starts from its parameterization's seeded random values (noise).
With natural starts, each job starts from a natural image of the session instead (its
random values added on top): the job's own objective is evaluated on responses to every
natural image (the surrogate's predictions, or the recorded responses), and the k-th job
of an (objective, target) group, in job order (the k-th seed of that target), starts
from the k-th best natural image. On real V4 data this keeps synthesis nearer the
natural images, where the surrogate's gradients agree best with the neurons' own (see
docs/cowley2023.md).

With a view search (``search_natural_starts``), each job's start is the best *view* of a
natural image: its top ``candidates`` natural images are each seen whole and as enlarged
crops (``zoom`` z > 1: a window of 1/z of the side at 3 x 3 positions, enlarged back to
the full size), optionally mirrored left-right; the surrogate rates every view on the
job's objective and the k-th job starts from the best view of the k-th best-rated image.
A view moves or enlarges what a site prefers onto its receptive field; the whole image
is always one of the views.

Example:
    >>> import torch
    >>> from synth.synthesis import Job
    >>> from synth.synthesis.starts import rank_natural_starts
    >>> r = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 5.0]])  # 3 natural images, 2 sites
    >>> jobs = [Job("a", "stretch", 0, 1), Job("b", "stretch", 0, 2), Job("c", "stretch", 1, 3)]
    >>> rank_natural_starts(jobs, r, site_ids=["s0", "s1"]).tolist()
    [1, 2, 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from synth.synthesis.jobs import Job, natural_statistics
from synth.synthesis.objectives import ObjectiveInputs, build_objective, resolve_spec, spec_key

__all__ = ["STARTS", "View", "apply_views", "rank_natural_starts", "search_natural_starts", "start_views"]

#: Where an image's optimization can start (``stimuli.start``).
STARTS = ("noise", "natural")


def rank_natural_starts(
    jobs: Sequence[Job],
    responses: torch.Tensor | np.ndarray,
    *,
    site_ids: Sequence[str] | np.ndarray,
    images: torch.Tensor | None = None,
    aliases: Mapping[str, Any] | None = None,
    chunk: int = 512,
) -> np.ndarray:
    """The natural image each job starts from (module docstring).

    Objectives are z-scored by the mean and standard deviation of ``responses`` over
    the natural images themselves (``natural_statistics``, as the synthesis context
    does). Objectives that couple images (diversity) count 0 here.

    Args:
        jobs: the jobs to synthesize.
        responses: ``(N, S)`` responses of the S sites to the N natural images (predicted
            or recorded means), in the model's site order; no NaN.
        site_ids: ``(S,)`` site ids (objectives may name sites).
        images: optional ``(N, C, H, W)`` natural images, for objectives that look at them.
        aliases: ``SynthesisConfig.objectives`` (named objective specs).
        chunk: natural images per objective evaluation.

    Returns:
        ``(len(jobs),)`` int64 indices into the natural images. Groups with more jobs than
        natural images wrap around.

    Shape:
        - responses: ``(N, S)``
        - images: ``(N, C, H, W)``
    """
    r = _checked(responses, site_ids, images)
    n, s = r.shape
    mean, std = natural_statistics(responses)  # the statistics the synthesis objective z-scores with
    out = np.zeros(len(jobs), dtype=np.int64)
    order: dict[tuple[str, int], np.ndarray] = {}
    taken: dict[tuple[str, int], int] = {}
    for i, job in enumerate(jobs):
        key, spec, t = _group(job, s, aliases)
        if key not in order:
            v = _objective_values(build_objective(spec, key="objective"), t, r, mean, std, site_ids, images, chunk)
            # best first; ties keep the natural set's order
            order[key] = np.argsort(-v, kind="stable")
        k = taken.get(key, 0)
        taken[key] = k + 1
        out[i] = order[key][k % n]
    return out


def _checked(responses: torch.Tensor | np.ndarray, site_ids: Sequence[str] | np.ndarray, images: torch.Tensor | None) -> torch.Tensor:
    """``responses`` as a float32 CPU tensor, checked against ``site_ids`` and ``images``."""
    r = torch.as_tensor(responses, dtype=torch.float32).cpu()
    if r.ndim != 2 or r.shape[0] < 1:
        raise ValueError(f"responses must be (natural images, sites) with at least one image, got shape {tuple(r.shape)}")
    if len(site_ids) != r.shape[1]:
        raise ValueError(f"responses have {r.shape[1]} sites but site_ids has {len(site_ids)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("responses contain NaN or infinite values")
    if images is not None and images.shape[0] != r.shape[0]:
        raise ValueError(f"images has {images.shape[0]} natural images but responses has {r.shape[0]}")
    return r


def _group(job: Job, n_sites: int, aliases: Mapping[str, Any] | None):
    """A job's (objective, target) group key, its objective spec and its target index."""
    t = int(job.target_site)
    if not 0 <= t < n_sites:
        raise ValueError(f"job {job.stimulus_id}: target_site {t} out of range for {n_sites} sites")
    spec = resolve_spec(job.objective, aliases)
    return (spec_key(spec), t), spec, t


def _objective_values(obj, t: int, r: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, site_ids, images: torch.Tensor | None, chunk: int) -> np.ndarray:
    """An objective's value for target ``t`` on each row of responses ``r`` (N, S)."""
    vals = []
    for a in range(0, r.shape[0], chunk):
        rr = r[a : a + chunk]
        b = rr.shape[0]
        inputs = ObjectiveInputs(
            responses=rr,
            images=images[a : a + chunk] if images is not None else rr.new_zeros((b, 1, 1, 1)),
            target=torch.full((b,), t, dtype=torch.long),
            natural_mean=mean,
            natural_std=std,
            site_ids=[str(x) for x in site_ids],
            background=torch.full((b,), 0.5),
        )
        vals.append(obj(inputs).detach().float().cpu())
    return torch.cat(vals).numpy()


@dataclass(frozen=True)
class View:
    """A view of an image: a window of ``1/zoom`` of its side centred at ``(x, y)`` (in
    units of the image's half side, 0 = centre), enlarged to the full size, and mirrored
    left-right when ``flip``."""

    zoom: float = 1.0
    x: float = 0.0
    y: float = 0.0
    flip: bool = False

    def label(self) -> str:
        """e.g. ``zoom 1.5 x -0.33 y +0.00 mirrored`` (the manifest's ``start_view``)."""
        return f"zoom {self.zoom:g} x {self.x:+.2f} y {self.y:+.2f}" + (" mirrored" if self.flip else "")

    def theta(self) -> list[list[float]]:
        """The affine map from output to input coordinates (``F.affine_grid``)."""
        return [[(-1.0 if self.flip else 1.0) / self.zoom, 0.0, self.x], [0.0, 1.0 / self.zoom, self.y]]


def start_views(zooms: Sequence[float] = (1.0,), flips: bool = False) -> list[View]:
    """The views a natural start is searched over.

    Zoom 1 is the whole image; each zoom z > 1 gives 3 x 3 windows (the corners, edge
    midpoints and centre of the positions that keep the window inside the image). With
    ``flips`` every view also appears mirrored. The first view is always the image itself.

    Example:
        >>> [v.label() for v in start_views((1.0, 2.0))][:3]
        ['zoom 1 x +0.00 y +0.00', 'zoom 2 x -0.50 y -0.50', 'zoom 2 x +0.00 y -0.50']
        >>> len(start_views((1.0, 1.5, 2.0), flips=True))
        38
    """
    out: list[View] = []
    for z in dict.fromkeys(float(z) for z in (1.0, *zooms)):  # the image itself first, no duplicates
        if not 1.0 <= z <= 8.0:
            raise ValueError(f"zoom {z:g} out of range; expected 1 <= zoom <= 8")
        m = 1.0 - 1.0 / z
        pos = [0.0] if m == 0 else [-m, 0.0, m]
        for flip in (False, True) if flips else (False,):
            out.extend(View(z, x, y, flip) for y in pos for x in pos)
    return out


def apply_views(images: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Every view of every image, image-major: row ``i * len(views) + v`` is view v of image i.

    Shape:
        - images: ``(B, C, H, W)``
        - returns: ``(B * len(views), C, H, W)``, bilinear resampling (the whole image is
          returned exactly).
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    b, v = images.shape[0], len(views)
    theta = torch.tensor([w.theta() for w in views], dtype=images.dtype, device=images.device).repeat(b, 1, 1)
    src = images.repeat_interleave(v, dim=0)
    grid = F.affine_grid(theta, list(src.shape), align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    plain = torch.tensor([w == View() for w in views], device=images.device).repeat(b)
    out[plain] = src[plain]  # the whole image, bit for bit
    return out


def search_natural_starts(
    jobs: Sequence[Job],
    responses: torch.Tensor | np.ndarray,
    predict: Callable[[torch.Tensor], np.ndarray | torch.Tensor],
    images: torch.Tensor,
    *,
    site_ids: Sequence[str] | np.ndarray,
    views: Sequence[View],
    candidates: int = 16,
    aliases: Mapping[str, Any] | None = None,
    chunk: int = 512,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Each job's start: the best view of a natural image (module docstring).

    A job's group (objective, target) ranks the natural images by ``responses`` as
    :func:`rank_natural_starts` does; its top ``candidates`` images are seen in every view,
    ``predict`` rates the views, and the objective (z-scored by ``responses``' natural
    statistics) orders them. The k-th job of a group takes the best view of the k-th
    image in that order (each image once; more jobs than candidates wrap around).

    Args:
        jobs: the jobs to synthesize.
        responses: ``(N, S)`` the surrogate's predictions for the N natural images.
        predict: images ``(B, C, H, W)`` -> predicted responses ``(B, S)`` (the surrogate).
        images: ``(N, C, H, W)`` natural images in [0, 1].
        site_ids: ``(S,)`` site ids.
        views: from :func:`start_views`.
        candidates: natural images per group whose views are rated.
        aliases: ``SynthesisConfig.objectives``.
        chunk: images per ``predict`` call.

    Returns:
        ``(natural index (J,), view index (J,), start images (J, C, H, W))``.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if not views:
        raise ValueError("no views to search")
    r = _checked(responses, site_ids, images)
    n, s = r.shape
    mean, std = natural_statistics(responses)
    nv = len(views)
    groups: dict[tuple[str, int], tuple[Any, int, np.ndarray]] = {}
    keys = []
    for job in jobs:
        key, spec, t = _group(job, s, aliases)
        keys.append(key)
        if key not in groups:
            obj = build_objective(spec, key="objective")
            v = _objective_values(obj, t, r, mean, std, site_ids, images, chunk)
            groups[key] = (obj, t, np.argsort(-v, kind="stable")[: min(candidates, n)])
    # every view of every candidate image, rated once
    need = sorted({int(i) for _, _, top in groups.values() for i in top})
    per = max(1, chunk // nv)
    rated: dict[int, torch.Tensor] = {}
    for a in range(0, len(need), per):
        idx = need[a : a + per]
        p = torch.as_tensor(np.asarray(predict(apply_views(images[idx], views))), dtype=torch.float32).cpu()
        for j, i in enumerate(idx):
            rated[i] = p[j * nv : (j + 1) * nv]
    best: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for key, (obj, t, top) in groups.items():
        rr = torch.cat([rated[int(i)] for i in top])
        v = _objective_values(obj, t, rr, mean, std, site_ids, apply_views(images[top], views), chunk)
        order = np.argsort(-v, kind="stable")
        seen: dict[int, int] = {}
        for o in order:  # each image once, at its best view, best images first
            seen.setdefault(int(o) // nv, int(o) % nv)
        best[key] = [(int(top[c]), w) for c, w in seen.items()]
    src = np.zeros(len(jobs), dtype=np.int64)
    view = np.zeros(len(jobs), dtype=np.int64)
    taken: dict[tuple[str, int], int] = {}
    for i, key in enumerate(keys):
        k = taken.get(key, 0)
        taken[key] = k + 1
        src[i], view[i] = best[key][k % len(best[key])]
    starts = torch.cat([apply_views(images[int(a) : int(a) + 1], [views[int(w)]]) for a, w in zip(src, view)]) if len(jobs) else images[:0]
    return src, view, starts
