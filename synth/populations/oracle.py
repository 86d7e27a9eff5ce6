"""Synthesis against the digital twins themselves: the surrogate replaced by the "monkey".

Two uses, both only where a population is made of differentiable twins:

- the **ceiling** of a synthesis recipe (``synth bench ceiling``): stretch images
  synthesized on each twin of the evaluated session directly, scored by the same twin
  (noise-free); or one-hot images synthesized on all the session's twins together,
  scored by them. It says how far the recipe (parameterization, priors, transforms,
  display constraints, steps) could go with a perfect surrogate, which separates what
  the recipe loses from what the surrogate loses. A diagnostic only: the evaluated
  session's twins never synthesize its stimuli.
- **teacher stimuli** (``fit.core.distill_synth_images``): images synthesized on *other*
  sessions' twins that those twins then label for the core (``synth.surrogate.core``).

A stretch image maximizes one twin alone, so it costs one twin's forward and backward
pass per step (about 10 ms per image and step on 2 CPU cores at 112 px, in batches of 30);
a one-hot image needs every twin of the session at every step (S times that).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from synth.runtime import derive_seed
from synth.synthesis.starts import STARTS, View, rank_natural_starts, search_natural_starts

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
    start: str = "noise",
    views: Sequence[View] = (),
    candidates: int = 16,
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
        start: ``"noise"``, or ``"natural"``: the k-th image starts from the natural image
            the twin responds to k-th most (as ``stimuli.start: natural`` with a perfect
            surrogate).
        views: with natural starts, a view search (``stimuli.start_zooms`` /
            ``start_flips``): the k-th image starts from the best view, rated by the twin,
            of its k-th best natural image (:func:`~synth.synthesis.starts.search_natural_starts`).
        candidates: natural images per target whose views are rated.

    Returns:
        ``(len(seeds), C, H, W)`` images in [0, 1] at 8-bit levels (as saved), on the CPU.
    """
    import dataclasses

    from synth.synthesis import Job

    if natural_y.ndim != 2 or natural_y.shape[0] != natural.shape[0]:
        raise ValueError(f"natural_y must have shape ({natural.shape[0]}, S), got {tuple(natural_y.shape)}")
    jobs = [Job(stimulus_id=f"twin{site}-{i}", objective="stretch", target_site=0, seed=int(s)) for i, s in enumerate(seeds)]
    return _synthesize_on(recorder.site_model(site), [str(recorder.site_ids[site])], natural_y[:, site : site + 1], jobs,
                          dataclasses.replace(cfg, batch_size=max(1, len(seeds))), natural, device, start, views, candidates)


def _synthesize_on(model, site_ids, natural_y: torch.Tensor, jobs, cfg, natural: torch.Tensor, device, start: str = "noise",
                   views: Sequence[View] = (), candidates: int = 16) -> torch.Tensor:
    """``jobs`` synthesized on ``model`` (twins), z-scored by ``natural_y``; images in [0, 1] on the CPU.

    With ``start="natural"`` each job starts from the natural image its objective rates
    best by ``natural_y`` (k-th job of a target: k-th best; ``synth.synthesis.starts``),
    or with ``views`` from the best view of it that ``model`` rates best."""
    from synth.synthesis import ObjectiveContext, synthesize

    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if views and start != "natural":
        raise ValueError(f"a view search needs natural starts, got start {start!r}")
    _, c, h, w = natural.shape
    if h != w:
        raise ValueError(f"synthesis on twins expects square natural images, got {h} x {w}")
    if not jobs:
        return natural.new_empty((0, c, h, w))
    ctx = ObjectiveContext.from_predictions(site_ids, natural_y.float().cpu(), natural_images=natural)
    init = None
    if start == "natural" and views:
        dev = torch.device(device)
        model = model.to(dev)

        def rate(x: torch.Tensor) -> torch.Tensor:  # clipped at 0, as natural_y (the recorder's expected responses)
            with torch.no_grad():
                return model(x.to(dev)).float().clamp_min(0).cpu()

        _, _, init = search_natural_starts(jobs, natural_y.float().cpu(), rate, natural, site_ids=site_ids, views=views,
                                           candidates=candidates, aliases=cfg.objectives)
    elif start == "natural":
        init = natural[torch.as_tensor(rank_natural_starts(jobs, natural_y.float().cpu(), site_ids=site_ids, images=natural, aliases=cfg.objectives))]
    res = synthesize(model, jobs, cfg, context=ctx, image_size=h, channels=c, device=device, init_images=init)
    return res.images_float().to(natural.dtype).cpu()


def one_hot_on_twins(
    recorder,
    sites: Sequence[int],
    seeds: Sequence[int],
    cfg,
    *,
    natural: torch.Tensor,
    natural_y: torch.Tensor,
    device: torch.device | str = "cpu",
    start: str = "noise",
    views: Sequence[View] = (),
    candidates: int = 16,
) -> torch.Tensor:
    """One-hot images synthesized on all the recorder's twins (one image per site and seed).

    The objective is the config's ``one_hot`` objective over the calibrated twins, with
    z-scoring statistics from ``natural_y``, as in a run against a surrogate.

    Args:
        recorder: a calibrated ``TwinRecorder`` (its ``population_model()`` is the model).
        sites: target column of each image.
        seeds: seed of each image (same length as ``sites``).
        cfg: a :class:`~synth.synthesis.config.SynthesisConfig`.
        natural: ``(N, C, H, W)`` natural images in [0, 1].
        natural_y: ``(N, S)`` the recorder's expected responses to them.
        device: where to synthesize.
        start: ``"noise"``, or ``"natural"``: a site's k-th image starts from the natural
            image with its k-th best one-hot score by ``natural_y``.
        views, candidates: a view search of the natural starts, as for :func:`stretch_on_twin`.

    Returns:
        ``(len(sites), C, H, W)`` images in [0, 1] at 8-bit levels, on the CPU.
    """
    from synth.synthesis import Job

    if len(sites) != len(seeds):
        raise ValueError(f"{len(sites)} sites but {len(seeds)} seeds")
    if natural_y.ndim != 2 or natural_y.shape != (natural.shape[0], len(recorder.site_ids)):
        raise ValueError(f"natural_y must have shape ({natural.shape[0]}, {len(recorder.site_ids)}), got {tuple(natural_y.shape)}")
    jobs = [Job(stimulus_id=f"one_hot{t}-{i}", objective="one_hot", target_site=int(t), seed=int(s)) for i, (t, s) in enumerate(zip(sites, seeds))]
    return _synthesize_on(recorder.population_model(), [str(s) for s in recorder.site_ids], natural_y, jobs, cfg, natural, device, start,
                          views, candidates)


OBJECTIVES = ("stretch", "one_hot")


def twin_ceiling(
    recorder,
    natural: torch.Tensor,
    cfg,
    *,
    objective: str = "stretch",
    seeds_per_target: int = 3,
    seed: int = 0,
    sites: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    write: Callable[[str], None] | None = None,
    start: str = "noise",
    views: Sequence[View] = (),
    candidates: int = 16,
) -> dict[str, Any]:
    """Synthesis on the twins themselves with the recipe ``cfg``, scored by them without noise.

    The figures are those of report.json's ``noise_free`` block for a perfect surrogate,
    each site's best of ``seeds_per_target`` images counting:

    - ``stretch``: each twin's images synthesized on that twin alone, against the twin's
      largest expected response to the natural images;
    - ``one_hot``: images synthesized on all twins together (the one-hot objective for the
      target), scored as ``synth validate`` scores one-hot images (softmax over all sites
      of the natural-set z-scores; the ratio to the best natural image's score).

    Args:
        recorder: the session's calibrated ``TwinRecorder``.
        natural: ``(N, C, H, W)`` the session's natural images in [0, 1] at the display size.
        cfg: the experiment's ``synthesis`` section.
        objective: ``"stretch"`` or ``"one_hot"``.
        seeds_per_target: images per site; the best one counts.
        seed: drives every image's seed.
        sites: target columns (default all); one-hot scores are always over all sites.
        device: where to synthesize and score.
        write: called with one line per progress report and the result.
        start: ``"noise"`` or ``"natural"`` (each image starts from a natural image the
            twins rate best for its objective, as ``stimuli.start: natural`` would with a
            perfect surrogate).
        views: with natural starts, the views searched for each start (``stimuli.start_zooms``,
            ``start_flips``; :func:`~synth.synthesis.starts.start_views`), rated by the twins;
            empty: whole natural images.
        candidates: natural images per target whose views are rated (``stimuli.start_candidates``).

    Returns:
        ``n_sites``, ``seconds``, ``site_id``, and for stretch ``fraction_above_natural_max``,
        ``median_gain`` (best / natural max - 1), per-site ``best`` / ``natural_max``; for
        one-hot ``median_score_ratio``, ``fraction_beating_best_natural``, per-site
        ``score`` / ``natural_best_score`` / ``ratio``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if seeds_per_target < 1:
        raise ValueError(f"seeds_per_target must be >= 1, got {seeds_per_target}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    write = write or (lambda line: log.info("%s", line))
    natural_y = recorder.expected(natural).float().cpu()
    sites = list(range(natural_y.shape[1])) if sites is None else [int(s) for s in sites]
    t0 = time.perf_counter()
    run = _one_hot_ceiling if objective == "one_hot" else _stretch_ceiling
    on_twins = dict(device=device, start=start, views=tuple(views), candidates=int(candidates))
    out, summary = run(recorder, natural, natural_y, cfg, sites, seeds_per_target, seed, on_twins)
    out.update(objective=objective, start=start, n_views=len(views), n_sites=len(sites), seeds_per_target=int(seeds_per_target),
               seconds=round(time.perf_counter() - t0, 1), site_id=[str(recorder.site_ids[s]) for s in sites])
    on = f"one-hot synthesized on all {natural_y.shape[1]} twins" if objective == "one_hot" else "stretch synthesized on each twin itself"
    starts = f"natural starts, best of {len(views)} views" if views else f"{start} starts"
    write(f"ceiling ({on}, {starts}, best of {seeds_per_target}, no trial noise): {summary}, {out['seconds']:.0f} s")
    return out


def _stretch_ceiling(recorder, natural, natural_y, cfg, sites, seeds_per_target, seed, on_twins) -> tuple[dict[str, Any], str]:
    """Stretch images for ``sites``, each on its own twin, scored against the twin's natural maximum."""
    from synth.progress import progress

    nat_max = natural_y.max(dim=0).values.numpy().astype(np.float64)
    best = np.empty(len(sites))
    for k, site in enumerate(progress(sites, desc="ceiling", total=len(sites))):
        seeds = [derive_seed(seed, "ceiling", site, j) for j in range(seeds_per_target)]
        images = stretch_on_twin(recorder, site, seeds, cfg, natural=natural, natural_y=natural_y, **on_twins)
        best[k] = float(recorder.expected(images)[:, site].max())
    nm = nat_max[sites]
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(nm > 0, best / nm - 1.0, np.nan)
    out = {
        "fraction_above_natural_max": float(np.mean(best > nm)),
        "median_gain": float(np.nanmedian(gain)) if np.isfinite(gain).any() else float("nan"),
        "best": best.tolist(),
        "natural_max": nm.tolist(),
    }
    return out, f"{int(np.sum(best > nm))} of {len(sites)} sites above their natural max, median gain {out['median_gain']:+.3f}"


def _one_hot_ceiling(recorder, natural, natural_y, cfg, sites, seeds_per_target, seed, on_twins) -> tuple[dict[str, Any], str]:
    """One-hot images for ``sites`` on all twins (in chunks of ``cfg.batch_size`` sites' images), scored."""
    from synth.progress import progress
    from synth.validation.control import one_hot_scores

    per = max(1, (cfg.batch_size or len(sites) * seeds_per_target) // seeds_per_target)  # sites per call
    chunks = [sites[i : i + per] for i in range(0, len(sites), per)]
    images = []
    for chunk in progress(chunks, desc="ceiling", total=len(chunks)):
        targets = [t for t in chunk for _ in range(seeds_per_target)]
        seeds = [derive_seed(seed, "ceiling-one-hot", t, j) for t in chunk for j in range(seeds_per_target)]
        images.append(one_hot_on_twins(recorder, targets, seeds, cfg, natural=natural, natural_y=natural_y, **on_twins))
    syn = recorder.expected(torch.cat(images)).double().numpy()  # (len(sites) * k, S)
    soft_nat, soft_syn = one_hot_scores(natural_y.double().numpy().T, syn.T)
    rows = np.asarray(sites)
    score = soft_syn[rows[:, None], np.arange(len(sites) * seeds_per_target).reshape(len(sites), seeds_per_target)].max(axis=1)
    nat_best = soft_nat[rows].max(axis=1)
    ratio = score / nat_best
    out = {
        "median_score_ratio": float(np.median(ratio)),
        "fraction_beating_best_natural": float(np.mean(ratio > 1)),
        "score": score.tolist(),
        "natural_best_score": nat_best.tolist(),
        "ratio": ratio.tolist(),
    }
    return out, f"median score ratio {out['median_score_ratio']:.3f}, {int(np.sum(ratio > 1))} of {len(sites)} sites beat their best natural image"
