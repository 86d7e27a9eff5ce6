"""Display constraints: pixel range, mean luminance, RMS contrast, aperture, RF mask.

The image a rig shows must have pixel values in [0, 1], often the mean luminance and
RMS contrast of the natural set (so that control images do not win by being brighter or
higher in contrast), and is often shown through a soft circular aperture on a grey
background. :class:`Display` turns the parameterization's output ``x`` (B, C, H, W) in
[0, 1] into a displayed image satisfying these constraints:

    y = b + w * u

with ``b`` the background grey, ``w`` (B, 1, H, W) the soft mask (aperture times
receptive-field mask; 1 everywhere without either) and ``u`` obtained from ``x - b`` by
a few rounds of projection: shift (mean luminance, exact), scale (RMS contrast, exact when
the background equals the luminance) and clip (pixel range, exact). The clip is last, so
the range always holds; luminance and contrast converge within a few rounds unless they
cannot be met (e.g. a high contrast inside a tiny aperture). Where ``w == 0`` the image
is exactly ``b``.

The projection is differentiable and applied at every optimization step, so the model
always sees (and the optimizer improves) images that satisfy the constraints; the saved
images get more rounds (``final_iters``). Luminance is the mean of all pixel values (all
channels), RMS contrast their population standard deviation, both measured on the whole
image (aperture and background included), like the natural images' values.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from synth.synthesis.config import ConstraintsConfig
from synth.synthesis.jobs import ObjectiveContext

log = logging.getLogger(__name__)


def image_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean luminance and RMS contrast (population std) per image.

    Shape:
        images: (B, C, H, W) in [0, 1]; returns two (B,) tensors.
    """
    flat = images.float().flatten(1)
    return flat.mean(1), flat.std(1, unbiased=False)


def aperture_mask(size: int, radius: float, edge: float, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Soft circular aperture ``(size, size)``: 1 inside, raised-cosine edge, exactly 0 outside.

    Args:
        size: image size in pixels.
        radius: radius of the 0.5 level, as a fraction of ``size``.
        edge: width of the edge, as a fraction of ``size`` (0: hard edge).
    """
    c = (size - 1) / 2.0
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    r = torch.sqrt((yy - c) ** 2 + (xx - c) ** 2) / size
    if edge <= 0:
        m = (r <= radius).double()
    else:
        t = ((r - (radius - edge / 2)) / edge).clamp(0, 1)
        m = 0.5 * (1 + torch.cos(math.pi * t))
        m = torch.where(r >= radius + edge / 2, torch.zeros_like(m), m)
    return m.float().to(device)


def rf_mask(rf: torch.Tensor, size: int, threshold: float, edge: float) -> torch.Tensor:
    """Soft masks from receptive fields: 1 where ``rf >= threshold``, a Gaussian edge outside.

    Shape:
        rf: (K, h, w) in [0, 1]; returns (K, size, size) in [0, 1], exactly 0 far from the RF.
    """
    rf = rf.float()
    if rf.shape[-2:] != (size, size):
        rf = F.interpolate(rf.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    peak = rf.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    binary = (rf / peak >= threshold).float().unsqueeze(1)
    sigma = edge * size
    if sigma <= 0:
        return binary.squeeze(1)
    k = 2 * int(math.ceil(3 * sigma)) + 1
    soft = gaussian_blur2d(binary, (k, k), (sigma, sigma), border_type="constant")
    return torch.maximum(binary, (2.0 * soft).clamp(0.0, 1.0)).squeeze(1)


class Display:
    """The display constraints of one synthesis run (see module docstring).

    Args:
        cfg: the constraints config.
        size: image size in pixels.
        context: natural-set statistics (luminance, contrast, receptive fields).
        device: where masks live.
    """

    def __init__(self, cfg: ConstraintsConfig, *, size: int, context: ObjectiveContext, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.size = int(size)
        self.device = torch.device(device)
        self.luminance = _resolve(cfg.luminance, context.luminance)
        self.contrast = _resolve(cfg.contrast, context.contrast)
        if cfg.background is not None:
            self.background = float(cfg.background)
        else:
            self.background = self.luminance if self.luminance is not None else 0.5
        self.aperture = None
        if cfg.aperture_radius is not None:
            self.aperture = aperture_mask(self.size, cfg.aperture_radius, cfg.aperture_edge, device=self.device)
        self._rf_source = context.rf_masks
        self._rf_cache: dict[int, torch.Tensor] = {}
        if cfg.rf_mask and context.rf_masks is None:
            log.warning("constraints.rf_mask is on but the surrogate has no receptive_fields(); no RF mask is applied")

    @property
    def active(self) -> bool:
        """Whether the display map changes anything at all."""
        return self.luminance is not None or self.contrast is not None or self.aperture is not None or self._use_rf

    @property
    def _use_rf(self) -> bool:
        return bool(self.cfg.rf_mask) and self._rf_source is not None

    def mask(self, sites: torch.Tensor) -> torch.Tensor | None:
        """Soft masks ``(B, 1, H, W)`` for images targeting ``sites`` (B,), or None (no mask)."""
        if self.aperture is None and not self._use_rf:
            return None
        b = sites.shape[0]
        m = torch.ones(b, 1, self.size, self.size, device=self.device)
        if self.aperture is not None:
            m = m * self.aperture
        if self._use_rf:
            missing = sorted({int(s) for s in sites.tolist()} - set(self._rf_cache))
            if missing:
                src = self._rf_source[missing]
                masks = rf_mask(src, self.size, self.cfg.rf_threshold, self.cfg.rf_edge).to(self.device)
                for s, mk in zip(missing, masks):
                    self._rf_cache[s] = mk
            m = m * torch.stack([self._rf_cache[int(s)] for s in sites.tolist()]).unsqueeze(1)
        return m

    def background_tensor(self, b: int, like: torch.Tensor) -> torch.Tensor:
        """``(B,)`` background grey levels."""
        return torch.full((b,), self.background, dtype=like.dtype, device=like.device)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, *, iters: int | None = None) -> torch.Tensor:
        """Project rendered images onto the constraint set.

        Shape:
            x: (B, C, H, W) in [0, 1]; mask: (B, 1, H, W) or None; returns (B, C, H, W) in [0, 1].
        """
        iters = self.cfg.project_iters if iters is None else int(iters)
        lum, con, b = self.luminance, self.contrast, self.background
        if lum is None and con is None:
            return x if mask is None else b + mask.to(x) * (x - b)
        w = torch.ones_like(x[:, :1]) if mask is None else mask.to(x)
        wmean = w.flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        lo = -b / w.clamp_min(1e-6)
        hi = (1.0 - b) / w.clamp_min(1e-6)
        u = x - b
        for _ in range(iters):
            v = w * u
            vmean = v.flatten(1).mean(1).view(-1, 1, 1, 1)
            delta = vmean if lum is None else torch.full_like(vmean, lum - b)
            u = u + (delta - vmean) / wmean
            if con is not None:
                v = w * u
                sd = v.flatten(1).std(1, unbiased=False).view(-1, 1, 1, 1)
                k = delta / wmean
                u = k + (u - k) * (con / sd.clamp_min(1e-8))
            u = torch.maximum(torch.minimum(u, hi), lo)
        return (b + w * u).clamp(0.0, 1.0)

    def check(self, luminance: torch.Tensor, contrast: torch.Tensor, ids: list[str]) -> None:
        """Log a warning for images whose achieved values miss the targets by more than the tolerance."""
        tol = self.cfg.tolerance
        for name, want, got in (("luminance", self.luminance, luminance), ("contrast", self.contrast, contrast)):
            if want is None:
                continue
            bad = (got - want).abs() > tol
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                log.warning(
                    "%d of %d images miss the %s %.4f by more than %.4f (e.g. %s: %.4f); "
                    "it may be unreachable within the aperture/RF mask and the [0, 1] range",
                    int(bad.sum()), len(ids), name, want, tol, ids[i], float(got[i]),
                )


def _resolve(value: float | str | None, natural: float) -> float | None:
    if value is None:
        return None
    if value == "natural":
        return float(natural)
    return float(value)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images (B, C, H, W) in [0, 1] -> uint8 (B, H, W, C), rounding to nearest."""
    return (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
