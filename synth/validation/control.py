"""Control outcomes of a closed-loop experiment: did the synthesized images drive the sites?

Definitions (responses are repeat means in the recorder's units; medians and fractions are
over target sites):

- **stretch**: for target site t, ``response`` = its largest response over its own stretch
  images (one per seed), ``natural_max`` = its largest response over the natural set.
  ``fraction_above_natural_max`` = fraction of targets with response > natural_max;
  ``median_gain`` = median of ``response / natural_max - 1`` (undefined where
  natural_max <= 0).
- **one-hot**: the one-hot score of an image for t is ``softmax(z)[t]`` over all sites,
  ``z_i = (r_i - mean_i) / std_i`` with each site's mean and std (ddof=0) over the natural
  set (z = 0 for a site with std 0 or a missing response). ``ratio`` = best score among
  t's one-hot images / best score any natural image reaches for t.
  ``median_score_ratio`` = median ratio; ``fraction_beating_best_natural`` = fraction with
  ratio > 1.
- **synthetic_prediction**: per site, Pearson r between predicted and recorded responses
  across all synthesized images of the manifest (any objective); ``median_site_r`` is the
  median over sites.

95% confidence intervals come from a seeded bootstrap that resamples, in every
iteration, the target sites (with their images), the repeats within every image (the
same trial draw for all sites, as trials are shared), and the natural images (with
their repeats) from which natural maxima, means and stds are recomputed; the interval
is the 2.5th-97.5th percentile of the resampled figures. Resampled repeat means are
noisier than the observed ones, which inflates the natural maximum (and the best natural
one-hot score) inside the bootstrap, so the resampled figures sit mostly below the point
estimate and the interval leans low: it is conservative for "control worked" claims (in
simulations with a known truth it covered the fixed-target truth in all of 60 replicates).
The same figures computed from the model's predictions stand beside them under
``"predicted"``.

Picking the best of many noisy repeat means favours images whose trials happened to run
high, and the natural set (often a thousand images or more) gains more from that than a
target's few synthesized images, so the headline figures lean against control (and rise
with more images per target, from trial noise alone as well). ``"held_out_repeats"`` gives the same
figures with picking and scoring on different trials: the first half of every image's
repeats picks each site's natural maximum, each target's best stretch / one-hot image
and the best natural one-hot image, the second half scores them (z-scores from its own
natural means), then the halves swap, and the two figures are averaged. It leans the
other way: an image picked among many on noise falls back more on fresh trials, so the
natural set's pick loses more than a target's; and fewer trials score each image. Neither
is the truth: on the Cowley 2023 twins the two bracketed the figures on the twins'
expected (noise-free) responses (docs/cowley2023.md), which a real recording does not have. It needs
two repeats per image (None otherwise). Its 95% CI (``held_out_repeats["ci95"]``) resamples
the targets (the same draws as above) and splits every image's trials into halves anew at
random (the same split for all sites; its own seeded stream, so the other intervals are
unchanged); the natural set is kept whole. Resampling natural images (a resample holds
about 63% distinct ones, whose maximum is lower) or trials with replacement (noisier
halves) spoils the natural set's pick more than a target's and pushes the interval up: on
201025's shipped run the held-out median gain (0.19) sat at the bottom of the interval
with natural images resampled ([0.18, 0.37]) and below it with trials resampled as well
([0.22, 0.48]); re-split trials give [0.13, 0.33].

NumPy-only. Undefined values are ``None`` in the returned (JSON-ready) dict.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from synth.data.recordings import Recording
from synth.errors import DataError
from synth.progress import progress
from synth.validation.io import Predictions, jsonable, normalize_objective
from synth.validation.metrics import (
    BOOTSTRAP_TAG, HELD_OUT_BOOTSTRAP_TAG, compact_repeats, half_means, pearson_per_site, repeat_mean, rng_for,
)

log = logging.getLogger(__name__)

OBJECTIVES = ("stretch", "one_hot")


@dataclass(frozen=True)
class _Groups:
    """Targets of one objective: target site row and the synthesized-image columns."""

    targets: list[str]
    rows: np.ndarray  # (T,) site row index per target
    cols: list[np.ndarray]  # per target, columns into the synthesized set
    ids: list[list[str]]  # per target, the stimulus ids

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(T, G) columns (0 where absent) and a mask of present ones."""
        g = max((c.size for c in self.cols), default=0)
        pad = np.zeros((len(self.cols), g), dtype=np.int64)
        mask = np.zeros((len(self.cols), g), dtype=bool)
        for i, c in enumerate(self.cols):
            pad[i, : c.size] = c
            mask[i, : c.size] = True
        return pad, mask


def _nanmax_arg(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(max, argmax) ignoring NaN; NaN / -1 where all are NaN. No warnings."""
    filled = np.where(np.isnan(a), -np.inf, a)
    idx = np.argmax(filled, axis=axis)
    val = np.take_along_axis(filled, np.expand_dims(idx, axis), axis).squeeze(axis)
    allnan = np.isnan(a).all(axis=axis)
    return np.where(allnan, np.nan, val), np.where(allnan, -1, idx)


def _nanmedian(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def _fraction(flags: np.ndarray) -> float:
    """Fraction of finite entries that are > 0.5 (flags are 0/1/NaN)."""
    f = np.asarray(flags, dtype=np.float64)
    f = f[np.isfinite(f)]
    return float(f.mean()) if f.size else float("nan")


def _softmax_sites(z: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 (sites). (S, N) -> (S, N)."""
    z = z - z.max(axis=0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


def _zscore(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (x - mu[:, None]) / sd[:, None]
    return np.where(np.isfinite(z), z, 0.0)


def _group_max(values: np.ndarray, present: np.ndarray, groups: _Groups) -> tuple[np.ndarray, np.ndarray]:
    """Per target t: max over its images of ``values[t, image]`` (images where ``present``
    is finite), and the column of the best image (-1 if none).

    Shape:
        values, present: (S, Ns) -> (T,), (T,)
    """
    pad, mask = groups.padded()
    T = len(groups.targets)
    if pad.shape[1] == 0:
        return np.full(T, np.nan), np.full(T, -1)
    rows = groups.rows[:, None]
    ok = mask & np.isfinite(present[rows, pad])
    val, arg = _nanmax_arg(np.where(ok, values[rows, pad], np.nan), axis=1)
    col = np.take_along_axis(pad, np.maximum(arg, 0)[:, None], axis=1)[:, 0]
    return val, np.where(arg >= 0, col, -1)


def _take(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``values[rows, cols]`` with NaN where ``cols`` is -1 (no image)."""
    if rows.size == 0:
        return np.zeros(0)
    got = values[rows, np.maximum(cols, 0)]
    return np.where(cols >= 0, got, np.nan)


def _natural_stats(nat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-site mean and std (ddof=0) over the finite natural responses. (S, Nn) -> (S,), (S,)"""
    finite = np.isfinite(nat)
    cnt = finite.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(finite, nat, 0.0).sum(1) / cnt
        sd = np.sqrt(np.where(finite, (nat - mu[:, None]) ** 2, 0.0).sum(1) / cnt)
    return mu, sd


def one_hot_scores(nat: np.ndarray, syn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-hot scores (module docstring) of natural and synthesized images.

    Args:
        nat: ``(S, Nn)`` responses to the natural images (z-scoring statistics).
        syn: ``(S, Ns)`` responses to the synthesized images.

    Returns:
        softmax over sites of the z-scores, ``(S, Nn)`` and ``(S, Ns)``: entry ``[t, i]``
        is image i's score for target t.
    """
    mu, sd = _natural_stats(nat)
    soft_nat = _softmax_sites(_zscore(nat, mu, sd))
    soft_syn = _softmax_sites(_zscore(syn, mu, sd)) if syn.shape[1] else syn
    return soft_nat, soft_syn


def _stats(
    nat: np.ndarray, syn: np.ndarray, stretch: _Groups, one_hot: _Groups,
    select: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-target control figures from natural (S, Nn) and synthesized (S, Ns) mean responses.

    ``select`` (natural, synthesized means of other trials, same shapes) picks the best
    images (a site's natural maximum, a target's best stretch / one-hot image, the best
    natural one-hot image) whose responses in ``nat`` / ``syn`` are then scored; by default
    the same responses pick and score.
    """
    sel_nat, sel_syn = (nat, syn) if select is None else select
    _, nat_arg = _nanmax_arg(sel_nat, axis=1)
    out: dict[str, np.ndarray] = {}
    # stretch
    _, best = _group_max(sel_syn, sel_syn, stretch)
    resp = _take(syn, stretch.rows, best)
    s_arg = nat_arg[stretch.rows] if len(stretch.targets) else np.zeros(0, int)
    nmax = _take(nat, stretch.rows, s_arg)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.where(nmax > 0, resp / nmax - 1.0, np.nan)
        above = np.where(np.isfinite(resp) & np.isfinite(nmax), (resp > nmax).astype(float), np.nan)
    out.update(stretch_response=resp, stretch_best=best, stretch_natural_max=nmax, stretch_gain=gain, stretch_above=above,
               stretch_natural_arg=s_arg)
    # one-hot
    soft_nat, soft_syn = one_hot_scores(nat, syn)
    sel_soft_nat, sel_soft_syn = (soft_nat, soft_syn) if select is None else one_hot_scores(sel_nat, sel_syn)
    _, nat_best_arg = _nanmax_arg(sel_soft_nat, axis=1)
    _, sbest = _group_max(sel_soft_syn, sel_syn, one_hot)  # a missing target response gives no score
    score = _take(soft_syn, one_hot.rows, sbest)
    o_arg = nat_best_arg[one_hot.rows] if len(one_hot.targets) else np.zeros(0, int)
    bn = _take(soft_nat, one_hot.rows, o_arg)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = score / bn
    out.update(one_hot_score=score, one_hot_best=sbest, one_hot_natural_best=bn, one_hot_ratio=ratio,
               one_hot_beats=np.where(np.isfinite(ratio), (ratio > 1).astype(float), np.nan),
               one_hot_natural_arg=o_arg)
    return out


def _held_out_folds(nat: tuple[np.ndarray, np.ndarray], syn: tuple[np.ndarray, np.ndarray], stretch: _Groups,
                    one_hot: _Groups, st_idx: np.ndarray | None = None, oh_idx: np.ndarray | None = None) -> dict[str, float]:
    """The headline figures with selection and scoring on different trials, from the
    (first half, second half) repeat means of the natural and the synthesized images: one
    half picks the best images (natural and synthesized alike), the other scores them, and
    back; the two folds' figures are averaged (optionally over a resample of targets)."""
    (na, nb), (sa, sb) = nat, syn
    folds = [_summary(_stats(nb, sb, stretch, one_hot, select=(na, sa)), st_idx, oh_idx),
             _summary(_stats(na, sa, stretch, one_hot, select=(nb, sb)), st_idx, oh_idx)]
    return {k: float(np.nanmean([f[k] for f in folds])) if any(np.isfinite(f[k]) for f in folds) else float("nan")
            for k in folds[0]}


def _summary(st: dict[str, np.ndarray], st_idx: np.ndarray | None = None, oh_idx: np.ndarray | None = None) -> dict[str, float]:
    """The four headline figures (optionally over a resample of targets)."""
    pick = (lambda a, i: a if i is None else a[i])
    return {
        "stretch.fraction_above_natural_max": _fraction(pick(st["stretch_above"], st_idx)),
        "stretch.median_gain": _nanmedian(pick(st["stretch_gain"], st_idx)),
        "one_hot.median_score_ratio": _nanmedian(pick(st["one_hot_ratio"], oh_idx)),
        "one_hot.fraction_beating_best_natural": _fraction(pick(st["one_hot_beats"], oh_idx)),
    }


def _percentile_ci(boot: Mapping[str, np.ndarray]) -> dict[str, list[float] | None]:
    """2.5th-97.5th percentiles of each figure's finite bootstrap values (None if none)."""
    out: dict[str, list[float] | None] = {}
    for k, v in boot.items():
        v = v[np.isfinite(v)]
        out[k] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else None
    return out


def _resample_means(resp: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Repeat means after resampling each image's present repeats with replacement.

    ``resp`` has present repeats first; the same uniform draws serve every site so that
    sites recorded on the same trials keep their trial-to-trial covariation.

    Shape:
        resp: (S, N, R), k: (S, N) -> (S, N)
    """
    S, N, R = resp.shape
    if R == 0:
        return np.full((S, N), np.nan)
    u = rng.random((N, R))
    idx = np.minimum((u[None] * k[:, :, None]).astype(np.int64), np.maximum(k - 1, 0)[:, :, None])
    vals = np.take_along_axis(resp, idx, axis=2)
    inside = np.arange(R)[None, None, :] < k[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, np.where(inside, vals, 0.0).sum(2) / k, np.nan)


def _as_predictions(predicted: Predictions | Mapping[str, np.ndarray] | None, recording: Recording) -> Predictions | None:
    if predicted is None or isinstance(predicted, Predictions):
        return predicted
    ids = list(predicted.keys())
    if not ids:
        return None
    mat = np.stack([np.asarray(predicted[s], dtype=np.float64).reshape(-1) for s in ids])
    if mat.shape[1] != recording.n_sites:
        raise DataError(
            f"predicted vectors have {mat.shape[1]} values but the recording has {recording.n_sites} sites; "
            "a dict of predictions must follow recording.site_id order (or pass a Predictions)"
        )
    return Predictions(stimulus_id=np.asarray(ids, dtype=str), site_id=recording.site_id, predicted=mat)


def _groups(manifest: Sequence[Mapping[str, str]], site_pos: Mapping[str, int], syn_pos: Mapping[str, int]) -> dict[str, _Groups]:
    by: dict[str, dict[str, list[str]]] = {o: defaultdict(list) for o in OBJECTIVES}
    skipped_site: set[str] = set()
    other: set[str] = set()
    for row in manifest:
        obj = normalize_objective(str(row["objective"]))
        sid, tgt = str(row["stimulus_id"]), str(row["target_site"])
        if obj not in by:
            other.add(obj)
            continue
        if tgt not in site_pos:
            skipped_site.add(tgt)
            continue
        if sid in syn_pos:
            by[obj][tgt].append(sid)
    if other:
        log.warning("manifest objectives other than stretch/one_hot are not scored: %s", ", ".join(sorted(other)))
    if skipped_site:
        log.warning("%d target site(s) of the manifest are not among the recorded sites and are skipped, e.g. %r",
                    len(skipped_site), sorted(skipped_site)[0])
    out = {}
    for obj in OBJECTIVES:
        targets = sorted(by[obj])
        ids = [sorted(by[obj][t]) for t in targets]
        out[obj] = _Groups(
            targets=targets,
            rows=np.array([site_pos[t] for t in targets], dtype=np.int64),
            cols=[np.array([syn_pos[s] for s in i], dtype=np.int64) for i in ids],
            ids=ids,
        )
    return out


def closed_loop_metrics(
    recording: Recording,
    predicted: Predictions | Mapping[str, np.ndarray] | None,
    manifest: Sequence[Mapping[str, str]],
    natural_ids: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Stretch, one-hot and synthetic-prediction outcomes (see the module docstring).

    Args:
        recording: the follow-up recording holding the natural images AND the
            synthesized ones (matched by ``stimulus_id``).
        predicted: the model's predictions for natural and synthesized images, either a
            :class:`~synth.validation.io.Predictions` (joined on ``site_id``; e.g.
            ``Predictions.concat([natural, stimuli])``) or a dict ``stimulus_id -> (S,)``
            in ``recording.site_id`` order; None to skip the ``"predicted"`` figures.
        manifest: rows with at least ``stimulus_id``, ``objective`` (``stretch`` /
            ``one_hot``), ``target_site`` (a site_id), e.g. from
            :func:`~synth.validation.io.read_manifest`.
        natural_ids: stimulus ids of the natural set.
        n_bootstrap: bootstrap iterations for the 95% CIs (0: no CIs).
        seed: bootstrap seed.

    Returns:
        JSON-ready dict ``{"stretch": {...}, "one_hot": {...}, "synthetic_prediction":
        {...}, "natural": {...}, "bootstrap": {...}}``; e.g.
        ``out["stretch"]["fraction_above_natural_max"]``, ``out["stretch"]["ci95"]
        ["median_gain"]`` (``[lo, hi]``), ``out["one_hot"]["predicted"]
        ["median_score_ratio"]``, ``out["synthetic_prediction"]["median_site_r"]``.

    Raises:
        DataError: fewer than 2 natural images or no manifest image in the recording.
    """
    pred = _as_predictions(predicted, recording)
    if pred is not None:
        sites = sorted(set(recording.site_id.tolist()) & set(pred.site_id.tolist()))
        if not sites:
            raise DataError("predictions and follow-up recording share no site_id")
        if len(sites) < recording.n_sites:
            log.warning("control outcomes use the %d sites both predicted and recorded (%d recorded)", len(sites), recording.n_sites)
    else:
        sites = sorted(recording.site_id.tolist())
    rec_ids = set(recording.stimulus_id.tolist())
    nat_all = list(dict.fromkeys(str(s) for s in natural_ids))
    nat = sorted(s for s in nat_all if s in rec_ids)
    if len(nat) < len(nat_all):
        log.warning("%d of %d natural images are not in the follow-up recording; natural statistics use %d",
                    len(nat_all) - len(nat), len(nat_all), len(nat))
    if len(nat) < 2:
        raise DataError(
            f"the follow-up recording holds {len(nat)} of the {len(nat_all)} natural images; control outcomes "
            "(natural maxima, z-scores) need the natural set: record it in the follow-up, or add its original recording "
            "with a second --recordings"
        )
    nat_set = set(nat_all)
    man_ids = [str(r["stimulus_id"]) for r in manifest]
    syn = sorted(s for s in set(man_ids) if s in rec_ids and s not in nat_set)
    if len(syn) < len(set(man_ids)):
        log.warning("%d of %d manifest stimuli are not in the follow-up recording", len(set(man_ids)) - len(syn), len(set(man_ids)))
    if not syn:
        raise DataError(f"none of the {len(set(man_ids))} synthesized stimuli of the manifest is in the follow-up recording")
    site_pos = {s: i for i, s in enumerate(sites)}
    syn_pos = {s: i for i, s in enumerate(syn)}
    groups = _groups(manifest, site_pos, syn_pos)

    r_si = {s: i for i, s in enumerate(recording.site_id)}
    r_st = {s: i for i, s in enumerate(recording.stimulus_id)}
    rows = [r_si[s] for s in sites]
    R_nat = compact_repeats(recording.responses[np.ix_(rows, [r_st[s] for s in nat])])
    R_syn = compact_repeats(recording.responses[np.ix_(rows, [r_st[s] for s in syn])])
    k_nat = np.sum(~np.isnan(R_nat), axis=2)
    k_syn = np.sum(~np.isnan(R_syn), axis=2)
    nat_mean, syn_mean = repeat_mean(R_nat), repeat_mean(R_syn)
    point = _stats(nat_mean, syn_mean, groups["stretch"], groups["one_hot"])
    head = _summary(point)
    # held-out repeats: None unless some natural and some synthesized image have two repeats
    held: dict[str, float] | None = None
    if (k_nat >= 2).any() and (k_syn >= 2).any():
        held = _held_out_folds(half_means(R_nat), half_means(R_syn), groups["stretch"], groups["one_hot"])

    # predictions
    p_head: dict[str, float] | None = None
    p_point: dict[str, np.ndarray] | None = None
    P_syn = None
    if pred is not None:
        p_st = {s: i for i, s in enumerate(pred.stimulus_id)}
        p_si = [int(np.flatnonzero(pred.site_id == s)[0]) for s in sites]
        p_nat_ids = sorted(s for s in nat_all if s in p_st)
        P_nat = pred.predicted[np.ix_([p_st[s] for s in p_nat_ids], p_si)].T if p_nat_ids else np.full((len(sites), 0), np.nan)
        P_syn = np.full((len(sites), len(syn)), np.nan)
        have = [j for j, s in enumerate(syn) if s in p_st]
        if have:
            P_syn[:, have] = pred.predicted[np.ix_([p_st[syn[j]] for j in have], p_si)].T
        if len(have) < len(syn):
            log.warning("%d of %d recorded synthesized stimuli have no prediction", len(syn) - len(have), len(syn))
        if P_nat.shape[1] >= 2:
            p_point = _stats(P_nat, P_syn, groups["stretch"], groups["one_hot"])
            p_head = _summary(p_point)
        else:
            log.warning("no predictions for the natural images; predicted control outcomes are left out")

    # bootstrap
    ci: dict[str, list[float] | None] = {k: None for k in head}
    held_ci: dict[str, list[float] | None] = {k: None for k in head}
    if n_bootstrap > 0:
        rng = rng_for(seed, BOOTSTRAP_TAG)
        rng_held = rng_for(seed, HELD_OUT_BOOTSTRAP_TAG)  # its own stream: the figures above do not change with it
        T_s, T_o = len(groups["stretch"].targets), len(groups["one_hot"].targets)
        boot = {k: np.full(n_bootstrap, np.nan) for k in head}
        boot_held = {k: np.full(n_bootstrap, np.nan) for k in head}
        for b in progress(range(n_bootstrap), desc="bootstrap", total=n_bootstrap):
            ni = rng.integers(0, len(nat), len(nat))
            nm = _resample_means(R_nat[:, ni], k_nat[:, ni], rng)
            sm = _resample_means(R_syn, k_syn, rng)
            st_idx = rng.integers(0, T_s, T_s) if T_s else np.zeros(0, int)
            oh_idx = rng.integers(0, T_o, T_o) if T_o else np.zeros(0, int)
            vals = _summary(_stats(nm, sm, groups["stretch"], groups["one_hot"]), st_idx, oh_idx)
            for k, v in vals.items():
                boot[k][b] = v
            if held is not None:  # the same targets, the whole natural set; every image's trials split anew
                hn = half_means(R_nat, rng_held.random(R_nat.shape[1:]))
                hs = half_means(R_syn, rng_held.random(R_syn.shape[1:]))
                for k, v in _held_out_folds(hn, hs, groups["stretch"], groups["one_hot"], st_idx, oh_idx).items():
                    boot_held[k][b] = v
        ci = _percentile_ci(boot)
        if held is not None:
            held_ci = _percentile_ci(boot_held)

    def pv(arr: str, g: int) -> float:
        return float(p_point[arr][g]) if p_point is not None else float("nan")

    st_g, oh_g = groups["stretch"], groups["one_hot"]
    stretch_rows = []
    for g, t in enumerate(st_g.targets):
        b = int(point["stretch_best"][g])
        a = int(point["stretch_natural_arg"][g])
        stretch_rows.append({
            "target_site": t,
            "stimulus_ids": st_g.ids[g],
            "stimulus_id": syn[b] if b >= 0 else None,
            "response": point["stretch_response"][g],
            "natural_max": point["stretch_natural_max"][g],
            "natural_max_stimulus_id": nat[a] if a >= 0 else None,
            "gain": point["stretch_gain"][g],
            "above_natural_max": None if np.isnan(point["stretch_above"][g]) else bool(point["stretch_above"][g]),
            "predicted_response": pv("stretch_response", g),
            "predicted_natural_max": pv("stretch_natural_max", g),
            "predicted_gain": pv("stretch_gain", g),
        })
    one_hot_rows = []
    for g, t in enumerate(oh_g.targets):
        b = int(point["one_hot_best"][g])
        a = int(point["one_hot_natural_arg"][g])
        one_hot_rows.append({
            "target_site": t,
            "stimulus_ids": oh_g.ids[g],
            "stimulus_id": syn[b] if b >= 0 else None,
            "score": point["one_hot_score"][g],
            "best_natural_score": point["one_hot_natural_best"][g],
            "best_natural_stimulus_id": nat[a] if a >= 0 else None,
            "ratio": point["one_hot_ratio"][g],
            "beats_best_natural": None if np.isnan(point["one_hot_beats"][g]) else bool(point["one_hot_beats"][g]),
            "predicted_score": pv("one_hot_score", g),
            "predicted_best_natural_score": pv("one_hot_natural_best", g),
            "predicted_ratio": pv("one_hot_ratio", g),
        })

    sp: dict[str, Any] = {"median_site_r": None, "n_images": len(syn), "per_site": []}
    if P_syn is not None:
        r = pearson_per_site(P_syn, syn_mean)
        n_img = (np.isfinite(P_syn) & np.isfinite(syn_mean)).sum(1)
        sp = {
            "median_site_r": _nanmedian(r),
            "n_images": len(syn),
            "per_site": [{"site_id": s, "r": r[i], "n_images": int(n_img[i])} for i, s in enumerate(sites)],
        }

    def block(prefix: str, names: tuple[str, str], rows: list, n: int) -> dict[str, Any]:
        keys = [f"{prefix}.{k}" for k in names]
        return {
            "n_targets": n,
            names[0]: head[keys[0]],
            names[1]: head[keys[1]],
            "ci95": {k: ci[f"{prefix}.{k}"] for k in names},
            "held_out_repeats": None if held is None else {
                **{k: held[f"{prefix}.{k}"] for k in names}, "ci95": {k: held_ci[f"{prefix}.{k}"] for k in names}},
            "predicted": None if p_head is None else {k: p_head[f"{prefix}.{k}"] for k in names},
            "per_target": rows,
        }

    out = {
        "stretch": block("stretch", ("fraction_above_natural_max", "median_gain"), stretch_rows, len(st_g.targets)),
        "one_hot": block("one_hot", ("median_score_ratio", "fraction_beating_best_natural"), one_hot_rows, len(oh_g.targets)),
        "synthetic_prediction": sp,
        "natural": {"n_images": len(nat), "n_missing_from_recording": len(nat_all) - len(nat)},
        "n_sites": len(sites),
        "bootstrap": {
            "n": int(n_bootstrap),
            "seed": int(seed),
            "confidence": 0.95,
            "resampled": "target sites (with their images); repeats within every image; natural images (with their repeats)",
            "held_out_resampled": "target sites (the same draws); every image's trials split into halves anew; natural set whole",
        },
    }
    if not st_g.targets:
        log.warning("no stretch images of recorded target sites in the manifest")
    if not oh_g.targets:
        log.warning("no one-hot images of recorded target sites in the manifest")
    return jsonable(out)
