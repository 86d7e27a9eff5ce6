"""Image priors: penalties added to each image's loss, and gradient preconditioners.

``tv``         ``weight * mean(|dI/dx| + |dI/dy|)`` of the displayed image (smoothness)
``l2``         ``weight * mean((I - background) ** 2)`` (keeps images near grey; without a
               contrast constraint)
``blur_grad``  Gaussian-blurs the gradient that reaches the rendered image (sigma in
               pixels): each step changes smooth patterns rather than single pixels

Penalties are per image ``(B,)``: one image's penalty never depends on another's.
The Fourier parameterization is itself a preconditioner (``decay_power``).
"""

from __future__ import annotations

import torch
from kornia.filters import gaussian_blur2d

from synth.registry import Registry

#: name -> builder(**kwargs) -> Prior
PRIORS: Registry = Registry("prior")


class Prior:
    """A penalty on the displayed image and/or a gradient modifier on the rendered one."""

    def penalty(self, images: torch.Tensor, background: torch.Tensor) -> torch.Tensor | None:
        """Per-image penalty ``(B,)`` (added to the loss), or None.

        Shape:
            images: ``(B, C, H, W)`` displayed images; background: ``(B,)``.
        """
        return None

    def precondition(self, rendered: torch.Tensor) -> torch.Tensor:
        """Return ``rendered`` (possibly with a gradient hook attached)."""
        return rendered


class TotalVariation(Prior):
    """Anisotropic total variation (mean absolute difference of neighbouring pixels)."""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def penalty(self, images: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
        return self.weight * (dx + dy)


class L2(Prior):
    """Mean squared deviation from the background grey level."""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def penalty(self, images: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        d = images - background.to(images).view(-1, 1, 1, 1)
        return self.weight * d.pow(2).flatten(1).mean(1)


class BlurGrad(Prior):
    """Gaussian-blur the gradient w.r.t. the rendered image (sigma in pixels)."""

    def __init__(self, sigma: float) -> None:
        self.sigma = float(sigma)
        k = 2 * int(round(3 * self.sigma)) + 1
        self.kernel = max(k, 3)

    def _blur(self, g: torch.Tensor) -> torch.Tensor:
        return gaussian_blur2d(g, (self.kernel, self.kernel), (self.sigma, self.sigma), border_type="reflect")

    def precondition(self, rendered: torch.Tensor) -> torch.Tensor:
        if self.sigma > 0 and rendered.requires_grad:
            rendered.register_hook(self._blur)
        return rendered


@PRIORS.register("tv")
def tv(weight: float = 0.5) -> TotalVariation:
    """Total variation penalty."""
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    return TotalVariation(weight)


@PRIORS.register("l2")
def l2(weight: float = 1.0) -> L2:
    """L2 penalty towards the background."""
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    return L2(weight)


@PRIORS.register("blur_grad")
def blur_grad(sigma: float = 1.0) -> BlurGrad:
    """Gaussian blur of the image gradient (preconditioning)."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return BlurGrad(sigma)
