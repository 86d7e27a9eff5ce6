"""Synthesis against the digital twins themselves: the surrogate replaced by the "monkey".

Two uses, both only where a population is made of differentiable twins:

- the **ceiling** of a synthesis recipe (``synth bench ceiling``): stretch images
  synthesized on each twin of the evaluated session directly, scored by the same twin
  (noise-free). It says how far the recipe (parameterization, priors, transforms,
  display constraints, steps) could go with a perfect surrogate, which separates what
  the recipe loses from what the surrogate loses. A diagnostic only: the evaluated
  session's twins never synthesize its stimuli.
- **teacher stimuli** (``fit.core.distill_synth_images``): images synthesized on *other*
  sessions' twins that those twins then label for the core (``synth.surrogate.core``).

Each image maximizes one twin alone, so it costs one twin's forward and backward pass
per step (about 10 ms per image and step on 2 CPU cores at 112 px, in batches of 30).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from synth.runtime import derive_seed

log = logging.getLogger(__name__)


def stretch_on_twin(
    recorder,
    site: int,
    seeds: Sequence[int],
    cfg,
    *,
    natural: torch.Tensor,
    natural_y: torch.Tensor,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Stretch images of one twin, synthesized on that twin (one batch, one image per seed).

    Args:
        recorder: a calibrated ``TwinRecorder`` (its ``site_model(site)`` is the objective's model).
        site: the twin's column.
        seeds: one seed per image (initialization and transform draws).
        cfg: a :class:`~synth.synthesis.config.SynthesisConfig` (its ``batch_size`` is
            replaced by ``len(seeds)``).
        natural: ``(N, C, H, W)`` natural images in [0, 1] (mean luminance, contrast, size).
        natural_y: ``(N, S)`` the recorder's expected responses to them (z-scoring).
        device: where to synthesize.

    Returns:
        ``(len(seeds), C, H, W)`` images in [0, 1] at 8-bit levels (as saved), on the CPU.
    """
    import dataclasses

    from synth.synthesis import Job, ObjectiveContext, synthesize

    _, c, h, w = natural.shape
    if h != w:
        raise ValueError(f"stretch_on_twin expects square natural images, got {h} x {w}")
    if natural_y.ndim != 2 or natural_y.shape[0] != natural.shape[0]:
        raise ValueError(f"natural_y must have shape ({natural.shape[0]}, S), got {tuple(natural_y.shape)}")
    if not seeds:
        return natural.new_empty((0, c, h, w))
    cfg = dataclasses.replace(cfg, batch_size=len(seeds))
    y = natural_y[:, site : site + 1].float().cpu()
    ctx = ObjectiveContext.from_predictions([str(recorder.site_ids[site])], y, natural_images=natural)
    jobs = [Job(stimulus_id=f"twin{site}-{i}", objective="stretch", target_site=0, seed=int(s)) for i, s in enumerate(seeds)]
    res = synthesize(recorder.site_model(site), jobs, cfg, context=ctx, image_size=h, channels=c, device=device)
    return res.images_float().to(natural.dtype).cpu()


def twin_ceiling(
    recorder,
    natural: torch.Tensor,
    cfg,
    *,
    seeds_per_target: int = 3,
    seed: int = 0,
    sites: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    write: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Stretch on each twin with the recipe ``cfg``, scored by that twin without noise.

    The figures are those of report.json's ``noise_free.stretch`` for a perfect surrogate:
    per twin the best of ``seeds_per_target`` images against the twin's largest expected
    response to the natural images.

    Args:
        recorder: the session's calibrated ``TwinRecorder``.
        natural: ``(N, C, H, W)`` the session's natural images in [0, 1] at the display size.
        cfg: the experiment's ``synthesis`` section.
        seeds_per_target: images per twin; the best one counts.
        seed: drives every image's seed.
        sites: twin columns to test (default all).
        device: where to synthesize and score.
        write: called with one line per progress report and the result.

    Returns:
        ``fraction_above_natural_max``, ``median_gain`` (best / natural max - 1), ``n_sites``,
        ``seconds`` and per-site ``best`` / ``natural_max``.
    """
    from synth.progress import progress

    if seeds_per_target < 1:
        raise ValueError(f"seeds_per_target must be >= 1, got {seeds_per_target}")
    write = write or (lambda line: log.info("%s", line))
    natural_y = recorder.expected(natural).float().cpu()
    nat_max = natural_y.max(dim=0).values.numpy().astype(np.float64)
    sites = list(range(natural_y.shape[1])) if sites is None else [int(s) for s in sites]
    t0 = time.perf_counter()
    best = np.empty(len(sites))
    for k, site in enumerate(progress(sites, desc="ceiling", total=len(sites))):
        seeds = [derive_seed(seed, "ceiling", site, j) for j in range(seeds_per_target)]
        images = stretch_on_twin(recorder, site, seeds, cfg, natural=natural, natural_y=natural_y, device=device)
        best[k] = float(recorder.expected(images)[:, site].max())
    nm = nat_max[sites]
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(nm > 0, best / nm - 1.0, np.nan)
    out = {
        "fraction_above_natural_max": float(np.mean(best > nm)),
        "median_gain": float(np.nanmedian(gain)) if np.isfinite(gain).any() else float("nan"),
        "n_sites": len(sites),
        "seeds_per_target": int(seeds_per_target),
        "seconds": round(time.perf_counter() - t0, 1),
        "site_id": [str(recorder.site_ids[s]) for s in sites],
        "best": best.tolist(),
        "natural_max": nm.tolist(),
    }
    write(
        f"ceiling (stretch synthesized on each twin itself, best of {seeds_per_target}, no trial noise): "
        f"{int(np.sum(best > nm))} of {len(sites)} sites above their natural max, median gain {out['median_gain']:+.3f}, "
        f"{out['seconds']:.0f} s"
    )
    return out
