"""Per-site agreement between predictions and recorded responses, with noise ceilings.

All functions are NumPy-only and NaN-aware: a missing repeat is NaN in the repeat axis,
a missing prediction is NaN; undefined results (constant inputs, too few images) are NaN,
never an exception.

Shapes used throughout: ``predicted`` (S, N) (sites x images), ``responses`` (S, N, R)
(sites x images x repeat slots, NaN-padded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Collection

import numpy as np

from synth.data.recordings import Recording
from synth.errors import DataError
from synth.validation.io import Predictions

log = logging.getLogger(__name__)

#: seeds of the random procedures (split halves, bootstrap, held-out-repeats bootstrap) are derived as default_rng([seed, TAG])
SPLIT_HALF_TAG = 1
BOOTSTRAP_TAG = 2
HELD_OUT_BOOTSTRAP_TAG = 3

_REL_TOL = 1e-12  # a vector whose spread is below this fraction of its magnitude is constant


def rng_for(seed: int, tag: int) -> np.random.Generator:
    """The explicit generator of one procedure (split halves, bootstrap) for ``seed``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(tag)])


def compact_repeats(responses: np.ndarray) -> np.ndarray:
    """Move each (site, image)'s present repeats to the front (keeping their order) and drop
    repeat slots that are empty everywhere.

    Results of :func:`split_half_reliability` and the bootstrap depend only on the present
    repeats and their order, so a recording read from CSV (no holes) and the same recording
    as a NaN-padded npz give identical numbers.

    Shape:
        responses: (S, N, R) -> (S, N, R') with R' = the largest repeat count.
    """
    resp = np.asarray(responses, dtype=np.float64)
    if resp.ndim != 3:
        raise ValueError(f"responses must be (sites, images, repeats), got shape {resp.shape}")
    present = ~np.isnan(resp)
    order = np.argsort(~present, axis=2, kind="stable")
    out = np.take_along_axis(resp, order, axis=2)
    r_max = int(present.sum(axis=2).max()) if resp.size else 0
    return out[:, :, :r_max]


def _counts(responses: np.ndarray) -> np.ndarray:
    return np.sum(~np.isnan(responses), axis=2)


def repeat_mean(responses: np.ndarray) -> np.ndarray:
    """Mean over present repeats; NaN where an image has none. (S, N, R) -> (S, N)."""
    k = _counts(responses)
    s = np.where(np.isnan(responses), 0.0, responses).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, s / np.maximum(k, 1), np.nan)


def _is_constant(centered_ss: np.ndarray, values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """True where a sum of squared deviations is zero up to rounding of ``values``."""
    if values.shape[-1] == 0:
        return np.ones(values.shape[:-1], dtype=bool)
    scale = np.max(np.abs(np.where(np.isfinite(values), values, 0.0)), axis=-1)
    return centered_ss <= count * (_REL_TOL * scale) ** 2


def pearson_per_site(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``x`` with the same row of ``y``.

    Only columns where both are finite count. NaN where fewer than 2 columns remain or
    either row is constant there.

    Shape:
        x, y: (S, N) -> (S,)

    Example:
        >>> pearson_per_site(np.array([[1., 2., 3.]]), np.array([[2., 4., 7.]])).round(4)
        array([0.9934])
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    mask = np.isfinite(x) & np.isfinite(y)
    cnt = mask.sum(axis=1)
    xz = np.where(mask, x, 0.0)
    yz = np.where(mask, y, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = np.where(mask, x - (xz.sum(1) / np.maximum(cnt, 1))[:, None], 0.0)
        yc = np.where(mask, y - (yz.sum(1) / np.maximum(cnt, 1))[:, None], 0.0)
        sxx = (xc * xc).sum(1)
        syy = (yc * yc).sum(1)
        sxy = (xc * yc).sum(1)
        r = sxy / np.sqrt(sxx * syy)
    bad = (cnt < 2) | _is_constant(sxx, np.where(mask, x, np.nan), cnt) | _is_constant(syy, np.where(mask, y, np.nan), cnt)
    r = np.where(bad, np.nan, np.clip(r, -1.0, 1.0))
    return r


def r2_er(predicted: np.ndarray, responses: np.ndarray) -> np.ndarray:
    r"""Noise-corrected fraction of explainable variance explained, :math:`\hat r^2_{ER}`.

    The approximately unbiased estimator of Pospisil & Bair (2021), "The unbiased
    estimation of the fraction of variance explained by a model", PLoS Comput Biol 17(8)
    e1009212 (reference code ``r2er_n2m`` in github.com/deanpospisil/er_est). Per site,
    over the m images with a finite prediction and at least one repeat:

    .. math::

        x_i &= \text{prediction} - \text{mean}, \quad
        y_i = \bar r_i - \text{mean} \quad (\bar r_i = \text{repeat mean of image } i)\\
        \hat\sigma^2 &= \operatorname{mean}_i \operatorname{var}_{ddof=1}(\text{repeats of } i)
            \quad (\text{images with} \ge 2 \text{ repeats})\\
        n &= \operatorname{median}_i (\text{repeat count of } i)\\
        \hat r^2_{ER} &= \frac{(\sum_i x_i y_i)^2 - \frac{\hat\sigma^2}{n} \sum_i x_i^2}
                           {\sum_i x_i^2 \sum_i y_i^2 - (m-1) \frac{\hat\sigma^2}{n} \sum_i x_i^2}

    Numerator and denominator are each unbiased for the noise-free quantities, so the
    ratio is approximately unbiased (it is not clipped to [0, 1]: with few images or
    noisy sites it can fall outside).

    Args:
        predicted: model predictions, (S, N); NaN = no prediction.
        responses: recorded responses, (S, N, R), NaN-padded repeats.

    Returns:
        (S,) estimates; NaN where m < 2, no image has 2 repeats, the prediction is
        constant, or the denominator is 0.
    """
    x = np.atleast_2d(np.asarray(predicted, dtype=np.float64))
    resp = np.asarray(responses, dtype=np.float64)
    if resp.shape[:2] != x.shape:
        raise ValueError(f"responses {resp.shape} do not match predicted {x.shape}")
    k = _counts(resp)
    ybar = repeat_mean(resp)
    valid = np.isfinite(x) & (k >= 1)
    m = valid.sum(axis=1)
    # unbiased across-repeat variance per image
    dev = np.where(np.isnan(resp), 0.0, resp - np.where(k > 0, ybar, 0.0)[:, :, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        var_i = (dev * dev).sum(axis=2) / (k - 1)
    has_var = valid & (k >= 2)
    n_var = has_var.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sig2 = np.where(has_var, var_i, 0.0).sum(axis=1) / n_var
    n_rep = np.array([np.median(k[s][valid[s]]) if m[s] else np.nan for s in range(x.shape[0])])
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = np.where(valid, x, 0.0).sum(1) / m
        ym = np.where(valid, ybar, 0.0).sum(1) / m
        xc = np.where(valid, x - xm[:, None], 0.0)
        yc = np.where(valid, ybar - ym[:, None], 0.0)
        xy2 = (xc * yc).sum(1) ** 2
        x2 = (xc * xc).sum(1)
        y2 = (yc * yc).sum(1)
        noise = sig2 / n_rep
        num = xy2 - noise * x2
        den = x2 * y2 - (m - 1) * noise * x2
        out = num / den
    bad = (m < 2) | (n_var < 1) | _is_constant(x2, np.where(valid, x, np.nan), m) | (den == 0) | ~np.isfinite(out)
    return np.where(bad, np.nan, out)


def spearman_brown(r: np.ndarray | float) -> np.ndarray:
    """Split-half to full-length reliability, 2r / (1 + r); NaN where r <= -1."""
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > -1.0, 2.0 * r / (1.0 + r), np.nan)


def half_means(responses: np.ndarray, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Repeat means of two halves of each image's present repeats, ``k // 2`` and
    ``k - k // 2`` of them.

    Without ``keys`` the first half is the first ``k // 2`` present repeats; with ``keys``
    (one random number per image and repeat slot) the present repeats are first ordered by
    their keys, the same order for every site (trials are shared).

    Args:
        responses: (S, N, R) with present repeats first (:func:`compact_repeats`).
        keys: (N, R) sort keys of a random split, or None.

    Returns:
        (S, N), (S, N): NaN in the first where an image has one repeat, in both where none.
    """
    k = _counts(responses)
    slots = np.arange(responses.shape[2])
    inside = slots[None, None, :] < k[:, :, None]
    if keys is None:
        rank = np.broadcast_to(slots, responses.shape)
    else:
        ordered = np.where(inside, np.asarray(keys)[None, :, :], np.inf)
        rank = np.argsort(np.argsort(ordered, axis=2, kind="stable"), axis=2, kind="stable")
    a = inside & (rank < (k // 2)[:, :, None])
    b = inside & ~a
    vals = np.where(inside, responses, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (vals * a).sum(2) / a.sum(2), (vals * b).sum(2) / b.sum(2)


def split_half_reliability(responses: np.ndarray, *, n_splits: int = 20, seed: int = 0) -> np.ndarray:
    """Spearman-Brown corrected split-half reliability of each site's repeat means.

    For each of ``n_splits`` seeded splits, every image's present repeats are put in a
    random order (the same order for all sites, as trials are shared) and cut in two
    halves of ``k // 2`` and ``k - k // 2`` repeats; the Pearson r across images (those
    with >= 2 repeats) of the two half means is corrected to full length with
    ``2r / (1 + r)``. Returns the mean over splits of the corrected values.

    Args:
        responses: (S, N, R) NaN-padded repeats.
        n_splits: number of random splits (>= 1; 20 by default).
        seed: seed of the split generator.

    Returns:
        (S,) reliabilities; NaN where a site has < 2 images with 2 repeats or constant halves.
    """
    if n_splits < 1:
        raise ValueError("n_splits must be >= 1")
    resp = compact_repeats(responses)
    S, N, R = resp.shape
    rng = rng_for(seed, SPLIT_HALF_TAG)
    usable = _counts(resp) >= 2
    out = np.zeros((n_splits, S))
    for j in range(n_splits):
        ma, mb = half_means(resp, rng.random((N, R)))
        ma = np.where(usable, ma, np.nan)
        mb = np.where(usable, mb, np.nan)
        out[j] = spearman_brown(pearson_per_site(ma, mb))
    finite = np.isfinite(out)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, out, 0.0).sum(0) / finite.sum(0)
    return np.where(finite.any(0), mean, np.nan)


@dataclass(frozen=True)
class Joined:
    """Predictions and recordings matched on ids, in a canonical (sorted-id) order.

    Attributes:
        stimulus_id: (M,) sorted common stimulus ids.
        site_id: (S,) sorted common site ids.
        predicted: (S, M).
        responses: (S, M, R) with present repeats first (see :func:`compact_repeats`).
        counts: matching summary (for the report).
    """

    stimulus_id: np.ndarray
    site_id: np.ndarray
    predicted: np.ndarray
    responses: np.ndarray
    counts: dict = field(default_factory=dict)


def join(
    pred: Predictions,
    rec: Recording,
    *,
    pred_name: str = "predictions",
    rec_name: str = "recordings",
    unpredicted_ok: Collection[str] = (),
) -> Joined:
    """Match predictions and recordings on ``stimulus_id`` and ``site_id`` (never position).

    Args:
        pred, rec: what to match.
        pred_name, rec_name: names used in messages (e.g. the file paths).
        unpredicted_ok: recorded stimulus ids that are expected to have no prediction
            (e.g. the natural images of a closed-loop follow-up, which ``stimuli.npz``
            does not hold); they do not trigger the partial-match warning.

    Raises:
        DataError: when no stimulus or no site matches.

    A partial match (beyond ``unpredicted_ok``) is logged as a warning with the counts
    and an example id of each kind of mismatch; the counts are in ``Joined.counts``.
    """
    ps, rs = set(pred.stimulus_id.tolist()), set(rec.stimulus_id.tolist())
    pt, rt = set(pred.site_id.tolist()), set(rec.site_id.tolist())
    stim = sorted(ps & rs)
    sites = sorted(pt & rt)
    if not stim:
        raise DataError(
            f"{pred_name} and {rec_name} share no stimulus_id ({len(ps)} predicted, e.g. {pred.stimulus_id[0]!r}; "
            f"{len(rs)} recorded, e.g. {rec.stimulus_id[0]!r})"
        )
    if not sites:
        raise DataError(
            f"{pred_name} and {rec_name} share no site_id ({len(pt)} predicted, e.g. {pred.site_id[0]!r}; "
            f"{len(rt)} recorded, e.g. {rec.site_id[0]!r})"
        )
    ok = set(str(s) for s in unpredicted_ok)
    rec_only = sorted(rs - ps)
    rec_only_unexpected = [s for s in rec_only if s not in ok]
    pred_only = sorted(ps - rs)
    if rec_only_unexpected or pred_only or len(sites) < max(len(pt), len(rt)):
        def eg(ids: list[str]) -> str:
            return f" (e.g. {ids[0]!r})" if ids else ""

        site_only = sorted((pt | rt) - (pt & rt))
        log.warning(
            "partial match of %s and %s: %d stimuli in common; %d recorded without a prediction%s, "
            "%d predicted but not recorded%s; %d sites in common (%d predicted, %d recorded)%s",
            pred_name, rec_name, len(stim), len(rec_only), eg(rec_only), len(pred_only), eg(pred_only),
            len(sites), len(pt), len(rt), eg(site_only),
        )
    elif rec_only:
        log.info("%d recorded stimuli without a prediction (expected, e.g. the natural images) are not scored; "
                 "%d stimuli in common", len(rec_only), len(stim))
    p_st = {s: i for i, s in enumerate(pred.stimulus_id)}
    p_si = {s: i for i, s in enumerate(pred.site_id)}
    r_st = {s: i for i, s in enumerate(rec.stimulus_id)}
    r_si = {s: i for i, s in enumerate(rec.site_id)}
    predicted = pred.predicted[np.ix_([p_st[s] for s in stim], [p_si[s] for s in sites])].T
    responses = compact_repeats(rec.responses[np.ix_([r_si[s] for s in sites], [r_st[s] for s in stim])])
    counts = {
        "stimuli_matched": len(stim),
        "stimuli_predicted": len(ps),
        "stimuli_recorded": len(rs),
        "stimuli_recorded_not_predicted": len(rec_only),
        "stimuli_predicted_not_recorded": len(pred_only),
        "sites_matched": len(sites),
        "sites_predicted": len(pt),
        "sites_recorded": len(rt),
    }
    return Joined(np.asarray(stim, dtype=str), np.asarray(sites, dtype=str), predicted, responses, counts)


def site_metrics(predicted: np.ndarray, responses: np.ndarray, *, n_splits: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """All per-site figures of the report.

    Args:
        predicted: (S, N) predictions.
        responses: (S, N, R) NaN-padded repeats.
        n_splits: random splits for the split-half reliability.
        seed: seed of the splits.

    Returns:
        dict of (S,) arrays: ``pearson_r`` (prediction vs repeat mean), ``r2_er``,
        ``split_half_reliability``, ``n_images`` (finite prediction and >= 1 repeat),
        ``median_repeats``.
    """
    predicted = np.atleast_2d(np.asarray(predicted, dtype=np.float64))
    responses = compact_repeats(responses)  # identical numbers wherever the NaN holes were
    k = _counts(responses)
    valid = np.isfinite(predicted) & (k >= 1)
    med = np.array([np.median(k[s][valid[s]]) if valid[s].any() else np.nan for s in range(predicted.shape[0])])
    return {
        "pearson_r": pearson_per_site(predicted, repeat_mean(responses)),
        "r2_er": r2_er(predicted, responses),
        "split_half_reliability": split_half_reliability(responses, n_splits=n_splits, seed=seed),
        "n_images": valid.sum(axis=1),
        "median_repeats": med,
    }
