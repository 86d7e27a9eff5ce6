"""The built-in "virtual monkey": a simulated V4/IT population with a hidden ground truth.

It lets the whole closed loop (record -> fit -> synthesize -> follow-up -> validate) run
with no download, no GPU and no recordings. The ground truth is deliberately *not* the
surrogate's architecture (a CNN + factorized linear readout):

1. **V1** (:class:`V1Stage`): quadrature Gabor pairs (8 orientations x 3 spatial
   frequencies, 2.8 / 1.4 / 0.7 cycles/deg for a 112-px image spanning 8 deg) giving
   rectified simple-cell (even/odd, ON/OFF) and complex-cell (energy) responses, each
   divisively normalized by the local energy pooled over orientations; plus low-pass
   luminance and, for RGB images, colour-opponent (R-G, B-Y) channels.
2. **V4 sites**: each has a Gaussian receptive field (centres within ~2.3 deg of the image
   centre, sigma 0.7-1.3 deg) and three private subunits, each a sparse signed weighting
   of V1 channels (an orientation x spatial-frequency x phase-invariance preference with
   tuning to neighbouring orientations and cross-orientation suppression). Two excitatory
   subunits of different orientations at nearby positions combine by an AND-like
   geometric mean (a corner / curvature conjunction) plus their sum; the third subtracts.
   The subunit map is pooled over the RF by an L-q norm (q in [1.5, 3]: some position
   tolerance) and divided by the contrast energy in a surround.
3. **IT sites**: larger RFs near the centre (sigma 1.4-2.6 deg) pooling (L-q, q in [2, 4])
   a rectified signed mixture of 3-5 V4-like feature maps (recorded and hidden V4 units).
4. **Output**: ``rate = base + A * softplus(k (z - t)) / k`` spikes per 100-ms bin, where
   ``z`` is the standardized drive; mean rates over natural images are spread
   log-uniformly in ``[rate_min, rate_max]``. A soft ceiling ``c tanh(rate / c)`` sits at
   ``ceiling`` (default 3) times the site's maximum over the calibration natural images,
   so images better than any natural image can still drive a site well beyond its
   natural maximum, but not without bound.
5. **Trial noise**: ``Poisson(rate * g)`` with a log-normal trial gain ``g`` (mean 1,
   sd of log ``gain_noise``), a fraction ``shared_noise`` of whose variance is shared by
   all sites in a trial (correlated noise), as in real array recordings.

The image always spans the same visual angle: inputs of any size are resampled to the
model's 112-px grid. Hidden parameters depend only on ``seed`` (the population's
identity); a calibration pass on generated natural images sets each site's operating
point. Recording noise depends only on ``(record seed, stimulus_id)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.configtools import from_dict
from synth.data.natural import generate_natural_images
from synth.data.recordings import Recording
from synth.errors import ConfigError
from synth.populations.base import TARGETS, NaturalData
from synth.runtime import derive_seed

log = logging.getLogger(__name__)

#: the model's internal image size: every input is resampled to this (the image spans ~8 deg)
MODEL_SIZE = 112
#: V1 output grid (4 px per cell at MODEL_SIZE)
GRID = 28
N_ORI = 8
N_SF = 3
#: per orientation and spatial frequency: complex energy, even ON, even OFF, odd ON, odd OFF
N_TYPES = 5
N_GABOR_CH = N_ORI * N_SF * N_TYPES
#: luminance ON/OFF (2) + colour R-G ON/OFF, B-Y ON/OFF at 2 scales (8)
N_CH = N_GABOR_CH + 2 + 8
#: V4-like feature maps that IT sites pool from, beyond the recorded V4 sites
N_HIDDEN_V4 = 24
#: images generated (from the population seed) to calibrate the sites' operating points
N_CALIBRATION = 128


def gabor_channel(sf: int, ori: int, kind: int) -> int:
    """Index of a Gabor channel in the V1 feature map (kind: 0 energy, 1..4 even+/even-/odd+/odd-)."""
    return (sf * N_ORI + ori % N_ORI) * N_TYPES + kind


_ENERGY_CHANNELS = [gabor_channel(s, o, 0) for s in range(N_SF) for o in range(N_ORI)]


@dataclass(frozen=True, kw_only=True)
class VirtualParams:
    """``params:`` of a ``kind: virtual`` targets file."""

    name: str = field(default="virtual_v4", metadata={"help": "population name (run folders, reports)"})
    n_v4: int = field(default=40, metadata={"min": 0, "max": 2000, "help": "number of V4 sites"})
    n_it: int = field(default=6, metadata={"min": 0, "max": 2000, "help": "number of IT sites"})
    n_images: int = field(default=2400, metadata={"min": 1, "max": 200000, "help": "natural images shown in the recording session"})
    n_repeats: int = field(default=4, metadata={"min": 1, "max": 1000, "help": "repeats of each natural image"})
    seed: int = field(default=1234, metadata={"min": 0, "max": 2**31 - 1, "help": "population identity: RFs, tuning, rates"})
    rate_min: float = field(default=2.0, metadata={"min": 0.01, "help": "lowest site mean rate over natural images (spikes/bin)"})
    rate_max: float = field(default=20.0, metadata={"min": 0.01, "help": "highest site mean rate over natural images (spikes/bin)"})
    gain_noise: float = field(default=0.2, metadata={"min": 0.0, "max": 2.0, "help": "sd of the log trial gain (extra-Poisson variability)"})
    shared_noise: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0, "help": "fraction of the gain variance shared by all sites in a trial"})
    poisson: bool = field(default=True, metadata={"help": "Poisson spike-count noise (false: the gain noise only)"})
    ceiling: float = field(default=3.0, metadata={"min": 0.0, "help": "soft rate ceiling (tanh) as a multiple of a site's max over calibration natural images; 0 = none"})

    def __post_init__(self) -> None:
        if self.n_v4 + self.n_it < 1:
            raise ConfigError(f"expected at least one site, got n_v4={self.n_v4}, n_it={self.n_it}", key="n_v4")
        if self.rate_min > self.rate_max:
            raise ConfigError(f"expected rate_min <= rate_max, got {self.rate_min} > {self.rate_max}", key="rate_min")


# --------------------------------------------------------------------------------------
# V1 stage


def _gabor_bank(wavelength: float = 5.0, sigma: float = 2.2, size: int = 13) -> torch.Tensor:
    """Quadrature Gabor pairs, zero mean, unit L2 norm: (2 * N_ORI, 1, size, size), even then odd per orientation."""
    r = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size) - r, torch.arange(size) - r, indexing="ij")
    env = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    ks = []
    for o in range(N_ORI):
        th = math.pi * o / N_ORI
        xp = x * math.cos(th) + y * math.sin(th)
        for fn in (torch.cos, torch.sin):
            g = env * fn(2 * math.pi * xp / wavelength)
            g = g - env * (g.sum() / env.sum())  # remove the DC response
            ks.append(g / g.norm())
    return torch.stack(ks).unsqueeze(1).float()


def _gauss_kernel1d(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with replicate padding."""
    c = x.shape[1]
    r = k1d.numel() // 2
    kx = k1d.view(1, 1, 1, -1).expand(c, 1, 1, -1).to(x)
    ky = k1d.view(1, 1, -1, 1).expand(c, 1, -1, 1).to(x)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky, groups=c)


class V1Stage(nn.Module):
    """Gabor energy/simple-cell bank with divisive normalization, on a GRID x GRID map.

    Shape:
        - Input: (N, C, H, W) in [0, 1], C = 1 or 3 (resampled to MODEL_SIZE).
        - Output: (N, N_CH, GRID, GRID) >= 0, channels as :func:`gabor_channel`, then
          luminance ON/OFF, then colour (R-G ON/OFF, B-Y ON/OFF) at two scales.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gabor", _gabor_bank())
        self.register_buffer("norm_k", _gauss_kernel1d(1.5))
        self.register_buffer("lum_k", _gauss_kernel1d(2.0))
        self.register_buffer("col_k1", _gauss_kernel1d(1.0))
        self.register_buffer("col_k2", _gauss_kernel1d(2.5))
        # semi-saturation constants (per SF) and channel scales: set by calibrate()
        self.register_buffer("semisat", torch.full((N_SF,), 0.05))
        self.register_buffer("scale", torch.ones(N_CH))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """V1 responses before the per-channel scaling (used by calibration)."""
        if x.shape[-2:] != (MODEL_SIZE, MODEL_SIZE):
            x = F.interpolate(x, size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", antialias=True, align_corners=False)
        if x.shape[1] == 3:
            lum = x.mean(1, keepdim=True)
            rg = x[:, :1] - x[:, 1:2]
            by = x[:, 2:3] - 0.5 * (x[:, :1] + x[:, 1:2])
        else:
            lum, rg, by = x[:, :1], None, None
        n = x.shape[0]
        img = lum - 0.5
        feats = []
        for sf in range(N_SF):
            if sf > 0:
                img = F.avg_pool2d(img, 2)
            stride = 2 if sf == 0 else 1
            resp = F.conv2d(img, self.gabor, stride=stride, padding=self.gabor.shape[-1] // 2)
            resp = resp.view(n, N_ORI, 2, *resp.shape[-2:])
            even, odd = resp[:, :, 0], resp[:, :, 1]
            e2 = even**2 + odd**2
            pool = _blur(e2.mean(1, keepdim=True), self.norm_k)
            den = torch.sqrt(self.semisat[sf] ** 2 + pool)
            energy = torch.sqrt(e2 + 1e-8)
            out = torch.stack([energy, F.relu(even), F.relu(-even), F.relu(odd), F.relu(-odd)], dim=2) / den.unsqueeze(2)
            out = out.reshape(n, N_ORI * N_TYPES, *out.shape[-2:])
            if out.shape[-1] != GRID:
                out = F.avg_pool2d(out, out.shape[-1] // GRID)
            feats.append(out)
        lum_lp = _blur(F.avg_pool2d(lum, MODEL_SIZE // GRID), self.lum_k) - 0.5
        feats.append(torch.cat([F.relu(lum_lp), F.relu(-lum_lp)], 1))
        if rg is None:
            feats.append(torch.zeros(n, 8, GRID, GRID, device=x.device, dtype=x.dtype))
        else:
            col = F.avg_pool2d(torch.cat([rg, by], 1), MODEL_SIZE // GRID)
            for k in (self.col_k1, self.col_k2):
                c = _blur(col, k)
                feats.append(torch.cat([F.relu(c[:, :1]), F.relu(-c[:, :1]), F.relu(c[:, 1:]), F.relu(-c[:, 1:])], 1))
        return torch.cat(feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x) / self.scale.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------
# V4 / IT sites


def _grid_coords() -> torch.Tensor:
    """Centres of the GRID cells in image fractions [0, 1]: (2, GRID, GRID) (x, y)."""
    t = (torch.arange(GRID, dtype=torch.float32) + 0.5) / GRID
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([x, y])


def _gaussians(cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray) -> torch.Tensor:
    """Normalized Gaussian weight maps (K, GRID, GRID) from centres/sigmas in image fractions."""
    g = _grid_coords()
    cx_, cy_, s_ = (torch.as_tensor(a, dtype=torch.float32).view(-1, 1, 1) for a in (cx, cy, sigma))
    w = torch.exp(-((g[0] - cx_) ** 2 + (g[1] - cy_) ** 2) / (2 * s_**2))
    return w / w.sum(dim=(1, 2), keepdim=True)


def _subunit_weights(rng: np.random.Generator, *, sf: int, ori: int, simple_p: float = 0.3, color: bool = False) -> np.ndarray:
    """A sparse signed V1 weighting: one orientation x SF x phase preference."""
    w = np.zeros(N_CH)
    kind = 0 if rng.random() > simple_p else int(rng.integers(1, N_TYPES))
    w[gabor_channel(sf, ori, kind)] = 1.0
    side = rng.uniform(0.2, 0.5)
    w[gabor_channel(sf, ori - 1, kind)] += side
    w[gabor_channel(sf, ori + 1, kind)] += side
    if rng.random() < 0.5:  # neighbouring spatial frequency
        sf2 = min(N_SF - 1, max(0, sf + int(rng.choice([-1, 1]))))
        if sf2 != sf:
            w[gabor_channel(sf2, ori, 0)] += rng.uniform(0.2, 0.5)
    w[gabor_channel(sf, ori + N_ORI // 2, 0)] -= rng.uniform(0.0, 0.5)  # cross-orientation suppression
    if rng.random() < 0.25:  # luminance preference
        w[N_GABOR_CH + int(rng.integers(0, 2))] += rng.uniform(0.2, 0.6)
    if color:
        w[N_GABOR_CH + 2 + int(rng.integers(0, 8))] += rng.uniform(0.4, 1.0) * rng.choice([-1.0, 1.0], p=[0.3, 0.7])
    return w


@dataclass
class _Units:
    """Hidden parameters of V4-like units (recorded V4 sites first, then hidden units)."""

    w: np.ndarray  # (U, 3, N_CH) subunits a, b (excitatory), c (subtracted)
    shift_a: np.ndarray  # (U, 2) int grid offsets (dx, dy) of subunit a
    shift_b: np.ndarray  # (U, 2)
    thresh: np.ndarray  # (U, 3) subunit thresholds (in calibrated sd units)
    alpha: np.ndarray  # (U,) weight of the conjunction vs. the sum
    inh: np.ndarray  # (U,) weight of the subtracted subunit
    cx: np.ndarray
    cy: np.ndarray
    sigma: np.ndarray  # RF sigma (image fractions)
    q: np.ndarray  # L-q pooling exponent
    gamma: np.ndarray  # surround suppression strength


def _draw_v4_units(rngs: Sequence[np.random.Generator]) -> _Units:
    """One V4-like unit per generator (so a unit's identity does not depend on the others)."""
    n = len(rngs)
    w = np.zeros((n, 3, N_CH))
    shift_a = np.zeros((n, 2), dtype=np.int64)
    shift_b = np.zeros((n, 2), dtype=np.int64)
    scal = np.zeros((n, 11))
    for i, rng in enumerate(rngs):
        sf = int(rng.choice(N_SF, p=[0.4, 0.4, 0.2]))
        ori_a = int(rng.integers(0, N_ORI))
        ori_b = ori_a + int(rng.choice([-3, -2, -1, 1, 2, 3, 0], p=[0.12, 0.16, 0.16, 0.16, 0.16, 0.12, 0.12]))
        sf_b = min(N_SF - 1, max(0, sf + int(rng.choice([-1, 0, 0, 1]))))
        color = rng.random() < 0.3
        w[i, 0] = _subunit_weights(rng, sf=sf, ori=ori_a, color=color)
        w[i, 1] = _subunit_weights(rng, sf=sf_b, ori=ori_b)
        w[i, 2] = _subunit_weights(rng, sf=int(rng.integers(0, N_SF)), ori=int(rng.integers(0, N_ORI)))
        d = rng.uniform(0.5, 2.5)
        ang = rng.uniform(0, 2 * np.pi)
        off = np.array([np.cos(ang), np.sin(ang)]) * d
        shift_a[i] = np.round(-off / 2).astype(np.int64)
        shift_b[i] = np.round(off / 2).astype(np.int64)
        rad, ang = 0.29 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        scal[i] = [
            0.5 + rad * np.cos(ang), 0.5 + rad * np.sin(ang), rng.uniform(0.085, 0.16),  # RF
            rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2), rng.uniform(0.5, 1.5),  # thresholds
            rng.uniform(0.4, 0.9), rng.uniform(0.0, 0.6), rng.uniform(1.5, 3.0), rng.uniform(0.0, 0.6), 0.0,
        ]
    return _Units(
        w=w,
        shift_a=shift_a,
        shift_b=shift_b,
        thresh=scal[:, 3:6],
        alpha=scal[:, 6],
        inh=scal[:, 7],
        cx=scal[:, 0],
        cy=scal[:, 1],
        sigma=scal[:, 2],
        q=scal[:, 8],
        gamma=scal[:, 9],
    )


class VirtualPopulationModel(nn.Module):
    """The hidden ground truth: images -> noise-free rates (spikes per 100-ms bin).

    Built from a seed (see module docstring) and calibrated on generated natural images.
    Differentiable end to end (for headroom checks by gradient ascent).

    Args:
        n_v4, n_it: numbers of recorded V4 and IT sites.
        seed: population identity.
        rate_min, rate_max: range of the sites' mean rates over natural images.
        ceiling: soft ceiling ``c * tanh(rate / c)`` with ``c = ceiling`` times the site's
            maximum over the calibration images (0: no ceiling).

    Shape:
        - Input: (N, C, H, W) in [0, 1], C = 1 or 3, any H = W.
        - Output: (N, n_v4 + n_it) > 0.
    """

    def __init__(self, *, n_v4: int, n_it: int, seed: int, rate_min: float = 2.0, rate_max: float = 20.0, ceiling: float = 3.0) -> None:
        super().__init__()
        self.n_v4, self.n_it = int(n_v4), int(n_it)

        def rng(*names: object) -> np.random.Generator:
            return np.random.default_rng(derive_seed(seed, "virtual", *names))

        self.v1 = V1Stage()
        n_hidden = N_HIDDEN_V4 if self.n_it else 0
        u = _draw_v4_units([rng("v4", i) for i in range(self.n_v4)] + [rng("hidden-v4", j) for j in range(n_hidden)])
        n_units = self.n_v4 + n_hidden
        self.n_units = n_units
        # subunit weights as one 1x1 conv: (3U, N_CH)
        self.register_buffer("w_sub", torch.as_tensor(u.w.reshape(-1, N_CH), dtype=torch.float32))
        self.register_buffer("sub_mu", torch.zeros(3 * n_units))
        self.register_buffer("sub_sd", torch.ones(3 * n_units))
        self.register_buffer("thresh", torch.as_tensor(u.thresh, dtype=torch.float32))
        self.register_buffer("alpha", torch.as_tensor(u.alpha, dtype=torch.float32))
        self.register_buffer("inh", torch.as_tensor(u.inh, dtype=torch.float32))
        self.register_buffer("q", torch.as_tensor(u.q, dtype=torch.float32))
        self.register_buffer("gamma", torch.as_tensor(u.gamma, dtype=torch.float32))
        self.register_buffer("rf", _gaussians(u.cx, u.cy, u.sigma))
        self.register_buffer("surround", _gaussians(u.cx, u.cy, 2.0 * u.sigma))
        self.register_buffer("idx_a", self._shift_index(u.shift_a))
        self.register_buffer("idx_b", self._shift_index(u.shift_b))
        self.register_buffer("energy_mu", torch.ones(()))
        self.register_buffer("unit_sd", torch.ones(n_units))
        self.rf_centre = np.stack([u.cx, u.cy], 1)[: self.n_v4]
        self.rf_sigma = u.sigma[: self.n_v4]
        # IT sites: signed mixtures of 3-5 hidden V4-like units over large RFs
        n_it = self.n_it
        mix = np.zeros((n_it, n_units))
        it = np.zeros((n_it, 5))
        for i in range(n_it):
            g = rng("it", i)
            m = int(g.integers(3, 6))
            pick = self.n_v4 + g.choice(n_hidden, m, replace=False)
            sign = np.where(np.arange(m) < max(2, m - 2), 1.0, -0.6)
            mix[i, pick] = sign * g.uniform(0.5, 1.0, m)
            rad, ang = 0.12 * np.sqrt(g.random()), g.uniform(0, 2 * np.pi)
            it[i] = [0.5 + rad * np.cos(ang), 0.5 + rad * np.sin(ang), g.uniform(0.18, 0.33), g.uniform(0.0, 0.8), g.uniform(2.0, 4.0)]
        self.register_buffer("it_mix", torch.as_tensor(mix, dtype=torch.float32))
        self.register_buffer("it_thresh", torch.as_tensor(it[:, 3], dtype=torch.float32))
        self.register_buffer("it_q", torch.as_tensor(it[:, 4], dtype=torch.float32))
        self.register_buffer("it_rf", _gaussians(it[:, 0], it[:, 1], it[:, 2]))
        self.it_rf_centre = it[:, :2]
        self.it_rf_sigma = it[:, 2]
        # output nonlinearity (operating point set by calibration)
        s = self.n_v4 + n_it
        names = [("v4", i) for i in range(self.n_v4)] + [("it", i) for i in range(n_it)]
        out = np.array([[g.random(), g.uniform(0.1, 0.4), g.uniform(-2.0, 0.0), g.uniform(1.0, 2.0)] for g in (rng("output", *nm) for nm in names)]).reshape(s, 4)
        rates = np.exp(np.log(rate_min) + out[:, 0] * (np.log(rate_max) - np.log(rate_min)))
        self.register_buffer("target_rate", torch.as_tensor(rates, dtype=torch.float32))
        self.register_buffer("base_frac", torch.as_tensor(out[:, 1], dtype=torch.float32))
        self.register_buffer("out_thresh", torch.as_tensor(out[:, 2], dtype=torch.float32))
        self.register_buffer("out_slope", torch.as_tensor(out[:, 3], dtype=torch.float32))
        self.register_buffer("drive_mu", torch.zeros(s))
        self.register_buffer("drive_sd", torch.ones(s))
        self.register_buffer("gain", torch.ones(s))
        self.ceiling_factor = float(ceiling)
        self._calibrated = False
        self.register_buffer("ceiling", torch.zeros(s))

    @staticmethod
    def _shift_index(shift: np.ndarray) -> torch.Tensor:
        """Flat indices into a GRID x GRID map sampling it at p + shift (clamped at the border)."""
        g = torch.arange(GRID)
        y, x = torch.meshgrid(g, g, indexing="ij")
        sx = torch.as_tensor(shift[:, 0]).view(-1, 1, 1)
        sy = torch.as_tensor(shift[:, 1]).view(-1, 1, 1)
        return ((y + sy).clamp(0, GRID - 1) * GRID + (x + sx).clamp(0, GRID - 1)).view(len(shift), -1).long()

    # -- stages ------------------------------------------------------------------------
    def subunits_raw(self, v1: torch.Tensor) -> torch.Tensor:
        """Subunit linear responses (N, 3U, GRID*GRID) before standardization."""
        return torch.matmul(self.w_sub, v1.flatten(2))

    def unit_maps(self, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V4-like feature maps f (N, U, GRID*GRID) >= 0 and the subtracted subunit maps."""
        # standardize (calibrated mean/sd) and threshold, folded into the weights
        w = self.w_sub / self.sub_sd.view(-1, 1)
        b = -(self.sub_mu / self.sub_sd + self.thresh.flatten())
        u = F.relu(torch.baddbmm(b.view(1, -1, 1).expand(v1.shape[0], -1, 1), w.unsqueeze(0).expand(v1.shape[0], -1, -1), v1.flatten(2)))
        n = u.shape[0]
        u = u.view(n, self.n_units, 3, GRID * GRID)
        ua = torch.gather(u[:, :, 0], 2, self.idx_a.unsqueeze(0).expand(n, -1, -1))
        ub = torch.gather(u[:, :, 1], 2, self.idx_b.unsqueeze(0).expand(n, -1, -1))
        a = self.alpha.view(1, -1, 1)
        conj = torch.sqrt(ua * ub + 1e-6)
        f = torch.addcmul((1 - a) * 0.5 * (u[:, :, 0] + u[:, :, 1]), a, conj - 1e-3)
        return f, u[:, :, 2]

    def drives(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-nonlinearity drives (N, S) (V4 sites, then IT sites)."""
        v1 = self.v1(x)
        f, inh = self.unit_maps(v1)
        energy = v1[:, _ENERGY_CHANNELS].mean(1).flatten(1) / self.energy_mu  # (N, P)
        rf = self.rf.flatten(1)  # (U, P)
        q = self.q.view(1, -1)
        pooled = (torch.einsum("nup,up->nu", (f + 1e-4) ** q.unsqueeze(-1), rf)) ** (1.0 / q)
        pooled = pooled - self.inh.view(1, -1) * torch.einsum("nup,up->nu", inh, rf)
        sur = energy @ self.surround.flatten(1).T  # (N, U)
        d_v4 = pooled / (1.0 + self.gamma.view(1, -1) * sur)
        out = [d_v4[:, : self.n_v4]]
        if self.n_it:
            fs = f / self.unit_sd.view(1, -1, 1)
            h = torch.einsum("nup,iu->nip", fs, self.it_mix)
            h = F.softplus(4.0 * (h - self.it_thresh.view(1, -1, 1))) / 4.0
            qi = self.it_q.view(1, -1)
            d_it = (torch.einsum("nip,ip->ni", (h + 1e-4) ** qi.unsqueeze(-1), self.it_rf.flatten(1))) ** (1.0 / qi)
            out.append(d_it)
        return torch.cat(out, 1)

    def rates_from_drives(self, d: torch.Tensor) -> torch.Tensor:
        z = (d - self.drive_mu) / self.drive_sd
        k = self.out_slope
        sp = F.softplus(k * (z - self.out_thresh)) / k
        r = self.target_rate * self.base_frac + self.gain * sp
        if self.ceiling_factor > 0 and self._calibrated:
            r = self.ceiling * torch.tanh(r / self.ceiling)
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rates_from_drives(self.drives(x))

    # -- calibration -------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, images_rgb: torch.Tensor, images_gray: torch.Tensor, batch: int = 80) -> None:
        """Set normalization constants and operating points from natural images.

        V1 constants use RGB images (so colour channels are scaled); site operating points
        use the grayscale versions (the default display mode), so that grayscale natural
        images give each site its target mean rate.
        """

        def cat(fn, x):
            return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])

        # 1) semi-saturation: median local energy per SF (one pass with semisat ~ 0)
        self.v1.semisat.fill_(1e-3)
        self.v1.scale.fill_(1.0)
        lum = images_gray - 0.5
        meds = []
        img = lum
        for sf in range(N_SF):
            if sf > 0:
                img = F.avg_pool2d(img, 2)
            r = F.conv2d(img, self.v1.gabor, stride=2 if sf == 0 else 1, padding=self.v1.gabor.shape[-1] // 2)
            meds.append(torch.sqrt((r**2).view(r.shape[0], N_ORI, 2, -1).sum(2).mean(1)).median())
        self.v1.semisat.copy_(torch.stack(meds))
        # 2) channel scales (rms over RGB natural images)
        raw = cat(self.v1.raw, images_rgb)
        self.v1.scale.copy_(torch.sqrt((raw**2).mean(dim=(0, 2, 3))).clamp_min(1e-6))
        v1 = cat(self.v1, images_gray)
        # 3) subunit standardization and the energy mean
        z = torch.cat([self.subunits_raw(v1[i : i + batch]) for i in range(0, v1.shape[0], batch)])
        zz = z.transpose(0, 1).reshape(self.n_units * 3, -1)
        self.sub_mu.copy_(zz.mean(1))
        self.sub_sd.copy_(zz.std(1).clamp_min(1e-6))
        energy = v1[:, _ENERGY_CHANNELS].mean(1)
        self.energy_mu.copy_(energy.mean())
        f = torch.cat([self.unit_maps(v1[i : i + batch])[0] for i in range(0, v1.shape[0], batch)])
        self.unit_sd.copy_(f.std(dim=(0, 2)).clamp_min(1e-6))
        # 4) drives -> standardized; gain so the mean rate over natural images is the target
        d = cat(self.drives, images_gray)
        self.drive_mu.copy_(d.mean(0))
        self.drive_sd.copy_(d.std(0).clamp_min(1e-8))
        self.gain.fill_(1.0)
        self._calibrated = False
        base = self.target_rate * self.base_frac
        sp = self.rates_from_drives(d) - base
        self.gain.copy_((self.target_rate - base) / sp.mean(0).clamp_min(1e-6))
        if self.ceiling_factor > 0:
            self.ceiling.copy_(self.ceiling_factor * self.rates_from_drives(d).max(0).values)
        self._calibrated = True


# --------------------------------------------------------------------------------------
# Target and recorder


def _as_model_input(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {shape}")
    return images.float()


class _SiteColumn(nn.Module):
    """One column of the population model: ``(N, C, H, W) -> (N, 1)``."""

    def __init__(self, model: VirtualPopulationModel, site: int) -> None:
        super().__init__()
        self.model, self.site = model, site

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_as_model_input(images))[:, self.site : self.site + 1]


class VirtualRecorder:
    """The simulated rig of a :class:`VirtualPopulation`: noise-free rates and noisy trials."""

    def __init__(self, model: VirtualPopulationModel, site_ids: np.ndarray, areas: np.ndarray, params: VirtualParams, batch: int = 128) -> None:
        self.model = model
        self.site_ids = site_ids
        self.areas = areas
        self.params = params
        self.batch = batch
        self.device: torch.device | None = None  # None: compute where the images are

    def to(self, device: torch.device | str | None) -> "VirtualRecorder":
        """Compute on ``device`` (None: wherever the images are)."""
        self.device = None if device is None else torch.device(device)
        return self

    def site_model(self, site: int) -> nn.Module:
        """A differentiable model of one site: images -> its noise-free rate ``(N, 1)``.

        The whole population is computed and one column kept (for diagnostics such as
        ``synth bench gradients``; not a fast path).

        Args:
            site: the site's column (0 .. S-1).
        """
        if not 0 <= int(site) < len(self.site_ids):
            raise IndexError(f"site {site} out of range for {len(self.site_ids)} sites")
        if self.device is not None:
            self.model.to(self.device)
        return _SiteColumn(self.model, int(site))

    @torch.no_grad()
    def expected(self, images: torch.Tensor) -> torch.Tensor:
        """Noise-free mean responses (spikes per 100-ms bin).

        Shape:
            images: (N, C, H, W) in [0, 1], C = 1 or 3; returns (N, S) float32 on the images' device.
        """
        x = _as_model_input(images.to(self.device or images.device))
        self.model.to(x.device)
        if x.shape[0] == 0:
            return torch.zeros(0, len(self.site_ids), device=images.device)
        return torch.cat([self.model(x[i : i + self.batch]) for i in range(0, x.shape[0], self.batch)]).to(images.device)

    def record(
        self, images: torch.Tensor, stimulus_ids: Sequence[str], *, n_repeats: int, seed: int, expected: torch.Tensor | None = None
    ) -> Recording:
        """Trials with noise: Poisson(rate * gain), gain log-normal with a shared part.

        The noise of a stimulus depends only on ``(seed, stimulus_id)``, not on the other
        images recorded with it. ``expected``: ``self.expected(images)`` if already computed.

        Returns:
            Recording of (S, N, n_repeats) spike counts.
        """
        ids = np.asarray(list(stimulus_ids)).astype(str)
        if ids.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {ids.shape[0]} stimulus ids")
        if n_repeats < 1:
            raise ValueError(f"expected n_repeats >= 1, got {n_repeats}")
        lam = (self.expected(images) if expected is None else expected).double().cpu().numpy()  # (N, S)
        if lam.shape != (ids.shape[0], len(self.site_ids)):
            raise ValueError(f"expected responses have shape {lam.shape}, want ({ids.shape[0]}, {len(self.site_ids)})")
        p = self.params
        s2 = p.gain_noise**2
        sd_shared, sd_private = math.sqrt(s2 * p.shared_noise), math.sqrt(s2 * (1 - p.shared_noise))
        out = np.empty((len(self.site_ids), ids.shape[0], n_repeats))
        for i, sid in enumerate(ids):
            rng = np.random.default_rng(derive_seed(seed, "virtual-trial", sid))
            logg = sd_shared * rng.standard_normal((n_repeats, 1)) + sd_private * rng.standard_normal((n_repeats, lam.shape[1]))
            rate = lam[i][None, :] * np.exp(logg - s2 / 2)
            out[:, i, :] = (rng.poisson(rate) if p.poisson else rate).T
        return Recording(stimulus_id=ids, site_id=self.site_ids, responses=out, areas=self.areas)


class VirtualPopulation:
    """A simulated V4/IT population (the ``virtual`` target kind); see the module docstring.

    Args:
        params: validated :class:`VirtualParams`.
    """

    def __init__(self, params: VirtualParams) -> None:
        self.params = params
        self.name = params.name
        self.site_ids = np.array([f"v4_{i:03d}" for i in range(params.n_v4)] + [f"it_{i:03d}" for i in range(params.n_it)])
        self.areas = np.array(["V4"] * params.n_v4 + ["IT"] * params.n_it)
        self.model = VirtualPopulationModel(
            n_v4=params.n_v4, n_it=params.n_it, seed=params.seed, rate_min=params.rate_min, rate_max=params.rate_max, ceiling=params.ceiling
        )
        cal_seed = derive_seed(params.seed, "virtual-calibration")
        rgb = generate_natural_images(N_CALIBRATION, size=MODEL_SIZE, grayscale=False, seed=cal_seed)
        gray = rgb.mean(1, keepdim=True)  # the luminance the grayscale images show
        self.model.calibrate(rgb, gray)
        self.model.eval().requires_grad_(False)
        self._recorder = VirtualRecorder(self.model, self.site_ids, self.areas, params)

    def rf(self, site: str) -> tuple[float, float, float]:
        """A site's RF centre (x, y) and Gaussian sigma, in image fractions (0..1, y down)."""
        i = int(np.flatnonzero(self.site_ids == site)[0])
        if i < self.params.n_v4:
            (cx, cy), s = self.model.rf_centre[i], self.model.rf_sigma[i]
        else:
            j = i - self.params.n_v4
            (cx, cy), s = self.model.it_rf_centre[j], self.model.it_rf_sigma[j]
        return float(cx), float(cy), float(s)

    def natural(self, *, image_size: int, grayscale: bool, seed: int) -> NaturalData:
        """Generate ``n_images`` naturalistic images and record them ``n_repeats`` times.

        Images are quantized to 8 bits (as displayed). Stimulus ids are ``nat_00000``...
        """
        p = self.params
        x = generate_natural_images(p.n_images, size=image_size, grayscale=grayscale, seed=seed)
        x = torch.round(x * 255.0) / 255.0
        ids = np.array([f"nat_{i:05d}" for i in range(p.n_images)])
        rec = self._recorder.record(x, ids, n_repeats=p.n_repeats, seed=derive_seed(seed, "virtual-natural-recording"))
        info: dict[str, Any] = {
            "generator": "synth.data.natural.generate_natural_images (textured dead leaves)",
            "n_images": p.n_images,
            "image_size": image_size,
            "grayscale": grayscale,
            "seed": seed,
            "target": "virtual",
            "params": asdict(p),
        }
        return NaturalData(images=x, recording=rec, stimulus_id=ids, info=info)

    def recorder(self, device: torch.device | str | None = None) -> VirtualRecorder:
        """The simulated rig, computing on ``device`` (None: where it already computes; at first where the images are)."""
        return self._recorder if device is None else self._recorder.to(device)


@TARGETS.register("virtual")
def build_virtual_target(*, root: str | None = None, session: str | None = None, **params: Any) -> VirtualPopulation:
    """Builder for ``kind: virtual`` (``root`` and ``session`` are accepted and ignored).

    Raises:
        ConfigError: an unknown key or a bad value in ``params``.
    """
    if root is not None or session is not None:
        log.debug("virtual target ignores root=%s session=%s", root, session)
    return VirtualPopulation(from_dict(VirtualParams, params, key="params"))
