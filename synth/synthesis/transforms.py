"""Robustness transforms: random pad / jitter / scale / rotate, batched, per-image random.

Each optimization step shows the model a randomly transformed copy of every image, so
the synthesized image must drive the target from slightly different positions, sizes and
angles (Olah et al. 2017); this suppresses high-frequency adversarial patterns.

Randomness is explicit: a transform consumes ``n_random`` uniform numbers in [0, 1) per
image per step, given by the caller (the engine draws them from each image's own seeded
generator, so an image's transforms do not depend on the other images in its batch).
Consecutive geometric transforms are fused into one affine warp
(``kornia.geometry.transform.warp_affine``), so a pipeline costs one resampling.

Example:
    >>> pipe = TransformPipeline([TRANSFORMS.build({"name": "jitter", "pixels": 4}),
    ...                           TRANSFORMS.build({"name": "rotate", "degrees": 10})])
    >>> u = torch.rand(2, pipe.n_random)
    >>> pipe(torch.rand(2, 1, 32, 32), u, fill=torch.full((2,), 0.5)).shape
    torch.Size([2, 1, 32, 32])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine

from synth.registry import Registry

#: name -> builder(**kwargs) -> Transform
TRANSFORMS: Registry = Registry("transform")


class Transform:
    """A random image transform using ``n_random`` uniforms per image."""

    n_random: int = 0

    def __call__(self, x: torch.Tensor, u: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Apply to a batch.

        Shape:
            - x: ``(B, C, H, W)``; u: ``(B, n_random)`` in [0, 1); fill: ``(B,)`` grey level
              used for pixels coming from outside the image.
            - returns: ``(B, C, H', W')``
        """
        raise NotImplementedError


class AffineTransform(Transform):
    """A geometric transform given by a per-image 3x3 pixel-coordinate matrix."""

    def matrix(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, 3, 3)`` matrices mapping source to destination pixel coordinates."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, u: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return _warp(x, self.matrix(u, x.shape[-2], x.shape[-1]), fill)


def _eye(b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=like.dtype, device=like.device).expand(b, 3, 3).clone()


def _about_center(m: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Conjugate a linear map so that it acts about the image centre."""
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    t = _eye(m.shape[0], m)
    t[:, 0, 2], t[:, 1, 2] = cx, cy
    ti = _eye(m.shape[0], m)
    ti[:, 0, 2], ti[:, 1, 2] = -cx, -cy
    return t @ m @ ti


def _warp(x: torch.Tensor, m: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    f = fill.to(x).view(-1, 1, 1, 1)
    out = warp_affine(x - f, m[:, :2, :].to(x), dsize=(x.shape[-2], x.shape[-1]), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out + f


class Pad(Transform):
    """Pad by ``width`` pixels on every side with the fill grey level (``constant``) or by reflection."""

    def __init__(self, width: int, mode: str, fill: float | None, crop: bool) -> None:
        self.width, self.mode, self.fill, self.crop = int(width), mode, fill, bool(crop)

    def __call__(self, x: torch.Tensor, u: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        w = self.width
        if self.mode == "reflect":
            return F.pad(x, [w] * 4, mode="reflect")
        f = (fill if self.fill is None else torch.full_like(fill, self.fill)).to(x).view(-1, 1, 1, 1)
        return F.pad(x - f, [w] * 4) + f


class Jitter(AffineTransform):
    """Translate by up to ``pixels`` in x and y (uniform; rounded to whole pixels if ``integer``)."""

    n_random = 2

    def __init__(self, pixels: float, integer: bool) -> None:
        self.pixels, self.integer = float(pixels), bool(integer)

    def matrix(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        d = (2.0 * u[:, :2] - 1.0) * self.pixels
        if self.integer:
            d = torch.round(d)
        m = _eye(u.shape[0], u)
        m[:, 0, 2], m[:, 1, 2] = d[:, 0], d[:, 1]
        return m


class Scale(AffineTransform):
    """Zoom about the centre by a factor drawn uniformly from [min, max]."""

    n_random = 1

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = float(lo), float(hi)

    def matrix(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        s = self.lo + (self.hi - self.lo) * u[:, 0]
        m = _eye(u.shape[0], u)
        m[:, 0, 0], m[:, 1, 1] = s, s
        return _about_center(m, height, width)


class Rotate(AffineTransform):
    """Rotate about the centre by an angle drawn uniformly from [-degrees, degrees]."""

    n_random = 1

    def __init__(self, degrees: float) -> None:
        self.degrees = float(degrees)

    def matrix(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        a = (2.0 * u[:, 0] - 1.0) * (self.degrees * math.pi / 180.0)
        c, s = torch.cos(a), torch.sin(a)
        m = _eye(u.shape[0], u)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
        return _about_center(m, height, width)


class TransformPipeline:
    """Apply transforms in order, fusing runs of geometric ones into one warp.

    Padding with ``crop: true`` is undone at the end (centre crop back to the input
    size), so the model sees images of the display size.

    Args:
        transforms: the transforms, in order.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)
        self.n_random = sum(t.n_random for t in self.transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, x: torch.Tensor, u: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Shape: x ``(B, C, H, W)``, u ``(B, n_random)``, fill ``(B,)`` -> ``(B, C, H', W')``."""
        if u.shape[-1] != self.n_random:
            raise ValueError(f"expected {self.n_random} random numbers per image, got {u.shape[-1]}")
        h0, w0 = x.shape[-2:]
        crop = 0
        pending: torch.Tensor | None = None
        j = 0
        for t in self.transforms:
            ut = u[:, j : j + t.n_random]
            j += t.n_random
            if isinstance(t, AffineTransform):
                m = t.matrix(ut, x.shape[-2], x.shape[-1])
                pending = m if pending is None else m @ pending
                continue
            if pending is not None:
                x, pending = _warp(x, pending, fill), None
            x = t(x, ut, fill)
            if isinstance(t, Pad) and t.crop:
                crop += t.width
        if pending is not None:
            x = _warp(x, pending, fill)
        if crop:
            x = x[..., crop : crop + h0, crop : crop + w0]
        return x


def build_transforms(specs: Sequence[str | dict]) -> TransformPipeline:
    """Build a pipeline from registry specs (``[{"name": "jitter", "pixels": 4}, ...]``)."""
    return TransformPipeline([TRANSFORMS.build(s, key=f"transforms[{i}]") for i, s in enumerate(specs)])


@TRANSFORMS.register("pad")
def pad(width: int = 8, mode: str = "constant", fill: float | None = None, crop: bool = True) -> Pad:
    """Pad ``width`` pixels (``fill``: grey level, default the background); ``crop``: crop back at the end."""
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    if mode not in ("constant", "reflect"):
        raise ValueError(f"mode must be constant or reflect, got {mode!r}")
    return Pad(width, mode, fill, crop)


@TRANSFORMS.register("jitter")
def jitter(pixels: float = 4, integer: bool = True) -> Jitter:
    """Random translation of up to ``pixels`` in each direction."""
    if pixels < 0:
        raise ValueError(f"pixels must be >= 0, got {pixels}")
    return Jitter(pixels, integer)


@TRANSFORMS.register("scale")
def scale(min: float = 0.95, max: float = 1.05) -> Scale:  # noqa: A002 - YAML-facing names
    """Random zoom by a factor in [min, max]."""
    if not 0 < min <= max:
        raise ValueError(f"expected 0 < min <= max, got min={min}, max={max}")
    return Scale(min, max)


@TRANSFORMS.register("rotate")
def rotate(degrees: float = 5.0) -> Rotate:
    """Random rotation by up to ``degrees`` either way."""
    if degrees < 0:
        raise ValueError(f"degrees must be >= 0, got {degrees}")
    return Rotate(degrees)
