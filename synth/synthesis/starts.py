"""Where each image's optimization starts: noise, or the natural images that already do best.

By default every image starts from its parameterization's seeded random values (noise).
With natural starts, each job starts from a natural image of the session instead (its
random values added on top): the job's own objective is evaluated on responses to every
natural image (the surrogate's predictions, or the recorded responses), and the k-th job
of an (objective, target) group, in job order (the k-th seed of that target), starts
from the k-th best natural image. On real V4 data this keeps synthesis nearer the
natural images, where the surrogate's gradients agree best with the neurons' own (see
docs/cowley2023.md).

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

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from synth.synthesis.jobs import Job, natural_statistics
from synth.synthesis.objectives import ObjectiveInputs, build_objective, resolve_spec, spec_key

__all__ = ["STARTS", "rank_natural_starts"]

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
    r = torch.as_tensor(responses, dtype=torch.float32).cpu()
    if r.ndim != 2 or r.shape[0] < 1:
        raise ValueError(f"responses must be (natural images, sites) with at least one image, got shape {tuple(r.shape)}")
    n, s = r.shape
    if len(site_ids) != s:
        raise ValueError(f"responses have {s} sites but site_ids has {len(site_ids)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("responses contain NaN or infinite values")
    if images is not None and images.shape[0] != n:
        raise ValueError(f"images has {images.shape[0]} natural images but responses has {n}")
    mean, std = natural_statistics(responses)  # the statistics the synthesis objective z-scores with
    out = np.zeros(len(jobs), dtype=np.int64)
    order: dict[tuple[str, int], np.ndarray] = {}
    taken: dict[tuple[str, int], int] = {}
    for i, job in enumerate(jobs):
        t = int(job.target_site)
        if not 0 <= t < s:
            raise ValueError(f"job {job.stimulus_id}: target_site {t} out of range for {s} sites")
        spec = resolve_spec(job.objective, aliases)
        key = (spec_key(spec), t)
        if key not in order:
            obj = build_objective(spec, key="objective")
            vals = []
            for a in range(0, n, chunk):
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
            v = torch.cat(vals).numpy()
            # best first; ties keep the natural set's order
            order[key] = np.argsort(-v, kind="stable")
        k = taken.get(key, 0)
        taken[key] = k + 1
        out[i] = order[key][k % n]
    return out
