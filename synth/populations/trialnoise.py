"""Trial noise of a simulated recording: spike counts drawn around an expected rate.

A simulated follow-up recorder (the digital twins) knows each site's expected spike count
for an image; a recording holds single trials. Two models of the trial-to-trial spread:

- **poisson**: variance = mean (Fano factor 1), the textbook assumption;
- **measured**: the variance-to-mean relation measured on recorded single trials, as a
  Fano factor per mean-count bin (``measure_fano``), interpolated between bin centres and
  held flat beyond them. Counts are drawn from the integer distribution with that mean
  and variance: binomial where the Fano factor is below 1, Poisson at 1, negative
  binomial above 1.

Multi-unit V4 counts in 100 ms bins (Cowley et al. 2023, session 210325: 50 sites, 640
images, 6-10 repeats) are under-dispersed, the more so the higher the rate: Fano factor
about 0.98 below 1 spike, 0.81 at 3 and 0.54 at 12 spikes. Poisson noise therefore
overstates the trial noise where it matters most, at the largest responses.

Example:
    >>> table = measure_fano(raw)                                    # doctest: +SKIP
    >>> counts = draw_counts(rates, 10, np.random.default_rng(0), table)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: mean-count bin edges for ``measure_fano`` (spikes per trial)
EDGES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, np.inf)


@dataclass(frozen=True)
class FanoTable:
    """Fano factor (variance / mean of single-trial counts) as a function of the mean count.

    Attributes:
        mean: ``(B,)`` increasing bin centres (the median mean count of each bin).
        fano: ``(B,)`` pooled variance / mean in each bin (> 0).
        n: ``(B,)`` (site, image) pairs in each bin.
        source: where it was measured (for provenance).
    """

    mean: tuple[float, ...]
    fano: tuple[float, ...]
    n: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not (len(self.mean) == len(self.fano) == len(self.n) >= 1):
            raise ValueError(f"expected equal, non-empty mean / fano / n, got {len(self.mean)}, {len(self.fano)}, {len(self.n)}")
        if any(b <= a for a, b in zip(self.mean, self.mean[1:])):
            raise ValueError(f"bin centres must increase, got {self.mean}")
        if not all(np.isfinite(f) and f > 0 for f in self.fano):
            raise ValueError(f"Fano factors must be finite and > 0, got {self.fano}")

    def at(self, mean: np.ndarray) -> np.ndarray:
        """Fano factor at each expected count (linear between centres, flat beyond)."""
        return np.interp(np.asarray(mean, dtype=np.float64), self.mean, self.fano)

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "fano": list(self.fano), "n": list(self.n), "source": self.source}


def measure_fano(raw: np.ndarray | Sequence[np.ndarray], *, min_pairs: int = 50, source: str = "") -> FanoTable:
    """Fano factor by mean count from single trials.

    Args:
        raw: ``(S, N, R)`` single-trial counts, NaN-padded where a (site, image) pair has
            fewer than R trials; or a list of such arrays (recordings pooled).
        min_pairs: bins with fewer (site, image) pairs are dropped.
        source: provenance string kept in the table.

    Returns:
        :class:`FanoTable` over the bins of ``EDGES`` holding at least ``min_pairs`` pairs
        with a positive mean and at least two trials; each bin's Fano factor is the sum of
        the pairs' unbiased (ddof=1) variances over the sum of their means.

    Raises:
        ValueError: an array is not 3-D, or no bin has ``min_pairs`` usable pairs.

    Shape:
        raw: ``(S, N, R)``.
    """
    arrays = [raw] if isinstance(raw, np.ndarray) else list(raw)
    means, variances = [], []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 3:
            raise ValueError(f"expected single trials of shape (sites, images, repeats), got {a.shape}")
        a = a.reshape(-1, a.shape[2])
        a = a[np.sum(~np.isnan(a), axis=1) >= 2]
        if a.size:
            mu = np.nanmean(a, axis=1)
            keep = mu > 0
            means.append(mu[keep])
            variances.append(np.nanvar(a[keep], axis=1, ddof=1))
    m = np.concatenate(means) if means else np.zeros(0)
    v = np.concatenate(variances) if variances else np.zeros(0)
    centres, fanos, counts = [], [], []
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        sel = (m >= lo) & (m < hi)
        if sel.sum() >= min_pairs and v[sel].sum() > 0:
            centres.append(float(np.median(m[sel])))
            fanos.append(float(v[sel].sum() / m[sel].sum()))
            counts.append(int(sel.sum()))
    if not centres:
        raise ValueError(f"no mean-count bin has {min_pairs} (site, image) pairs with a positive mean and >= 2 trials")
    return FanoTable(mean=tuple(centres), fano=tuple(fanos), n=tuple(counts), source=source)


def draw_counts(mean: np.ndarray, n_repeats: int, rng: np.random.Generator, table: FanoTable | None = None) -> np.ndarray:
    """Integer spike counts with the given expected values and trial spread.

    Args:
        mean: expected counts (any shape, >= 0).
        n_repeats: trials per entry.
        rng: the generator to draw from.
        table: the variance-to-mean relation; None: Poisson.

    Returns:
        ``mean.shape + (n_repeats,)`` float counts whose expectation is ``mean`` and whose
        variance is ``table.at(mean) * mean`` (binomial below Fano 1, whose variance comes
        as near as an integer number of draws allows; negative binomial above).
    """
    mean = np.asarray(mean, dtype=np.float64)
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    if (mean < 0).any() or not np.isfinite(mean).all():
        raise ValueError("expected counts must be finite and >= 0")
    shape = mean.shape + (n_repeats,)
    if table is None:
        return rng.poisson(mean[..., None], size=shape).astype(np.float64)
    fano = table.at(mean)
    out = np.empty(shape)
    under, over = fano < 1.0, fano > 1.0
    exact = ~(under | over)
    if exact.any():
        out[exact] = rng.poisson(mean[exact][:, None], size=(int(exact.sum()), n_repeats))
    if under.any():
        mu = mean[under]
        trials = np.maximum(np.ceil(mu), np.round(mu / (1.0 - fano[under]))).astype(np.int64)
        trials = np.maximum(trials, 1)
        out[under] = rng.binomial(trials[:, None], (mu / trials)[:, None], size=(int(under.sum()), n_repeats))
    if over.any():
        mu = mean[over]
        shape_r = mu / (fano[over] - 1.0)  # NB(r, p): mean r(1-p)/p = mu, variance mu / p = fano * mu
        p = 1.0 / fano[over]
        pos = mu > 0
        vals = np.zeros((int(over.sum()), n_repeats))
        if pos.any():
            vals[pos] = rng.negative_binomial(shape_r[pos][:, None], p[pos][:, None], size=(int(pos.sum()), n_repeats))
        out[over] = vals
    return out
