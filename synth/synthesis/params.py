"""Image parameterizations: what the optimizer changes, and how it becomes an image.

A parameterization is a small stateless module. The engine keeps the parameters of all
images in one tensor ``(N, *param_shape)`` and renders any subset of rows::

    param = PARAMS.build({"name": "fourier"}, channels=1, size=64)
    p = torch.stack([param.init(torch_generator(seed)) for seed in seeds])  # (N, ...)
    images = param(p)                                                      # (N, 1, 64, 64)

``pixel``
    One free value per pixel and channel.
``fourier``
    The image's 2-D real Fourier spectrum, with every frequency's coefficient scaled by
    ``1 / f ** decay_power`` (natural images have a ~1/f amplitude spectrum). Gradient
    steps on these coefficients are steps preconditioned towards natural image
    statistics: low frequencies move fast, pixel noise slowly (the idea of Olah et al.
    2017, "Feature visualization"; implemented here from scratch).

For RGB images both can decorrelate colour: the three parameter channels are
independent opponent components (luminance, red-green, blue-yellow) mixed into RGB with
amplitudes 1 : 0.3 : 0.15, roughly the relative spread of these components in natural
photographs; ``chroma`` scales the two colour components (0: grey images in RGB).
Values are mapped into [0, 1] by ``output``: ``sigmoid`` (smooth, default) or ``clamp``
(``x + 0.5`` clipped).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from synth.registry import Registry

#: name -> builder(**kwargs, channels=C, size=H) -> ImageParam
PARAMS: Registry = Registry("image parameterization")

_OUTPUTS = ("sigmoid", "clamp")

#: opponent colour basis (columns: luminance, red-green, blue-yellow), orthonormal
_OPPONENT = torch.tensor(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(2), 1 / math.sqrt(6)],
        [1 / math.sqrt(3), -1 / math.sqrt(2), 1 / math.sqrt(6)],
        [1 / math.sqrt(3), 0.0, -2 / math.sqrt(6)],
    ]
)
#: relative amplitudes of the opponent components in natural images
_OPPONENT_AMPLITUDE = torch.tensor([1.0, 0.3, 0.15])


def color_matrix(chroma: float = 1.0) -> torch.Tensor:
    """The (3, 3) matrix mixing decorrelated components into RGB (luminance column has norm 1).

    Args:
        chroma: scale of the two colour-opponent columns (1: natural amplitudes, 0: grey).
    """
    return _OPPONENT * (_OPPONENT_AMPLITUDE * torch.tensor([1.0, chroma, chroma])).view(1, 3)


def fourier_scale(size: int, decay_power: float) -> torch.Tensor:
    """Per-frequency scale ``1 / max(f, 1/size) ** decay_power`` of a ``size x size`` real
    spectrum (``torch.fft.rfft2`` layout), normalized to unit RMS.

    The ``fourier`` parameterization's preconditioner; a gradient in pixel space maps to
    its space as ``rfft2(g, norm="ortho") * scale`` (up to a constant).

    Returns:
        float32 tensor of shape ``(size, size // 2 + 1)``.
    """
    if size < 1 or not decay_power >= 0:
        raise ValueError(f"fourier_scale needs size >= 1 and decay_power >= 0, got {size} and {decay_power}")
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    f = torch.sqrt(fy * fy + fx * fx).clamp_min(1.0 / size)
    scale = f.pow(-float(decay_power))
    return (scale / scale.pow(2).mean().sqrt()).float()


class ImageParam(nn.Module):
    """Base class: ``init`` one image's parameters, ``forward`` parameters -> images.

    Args:
        channels: 1 (grayscale) or 3 (RGB).
        size: image height = width in pixels.
        output: ``sigmoid`` or ``clamp`` (how values are mapped into [0, 1]).
        decorrelate: mix opponent colour components into RGB (ignored for C = 1).
        init_sd: standard deviation of the random initial parameters.
        chroma: with ``decorrelate``, scale of the colour-opponent components (1: their
            natural amplitudes; 0: grey images in RGB).
    """

    def __init__(self, *, channels: int, size: int, output: str, decorrelate: bool, init_sd: float, chroma: float = 1.0) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(_OUTPUTS)}, got {output!r}")
        if init_sd < 0:
            raise ValueError(f"init_sd must be >= 0, got {init_sd}")
        if not chroma >= 0:
            raise ValueError(f"chroma must be >= 0, got {chroma}")
        self.channels = int(channels)
        self.size = int(size)
        self.output = output
        self.decorrelate = bool(decorrelate) and channels == 3
        self.init_sd = float(init_sd)
        self.chroma = float(chroma)
        self.register_buffer("color", color_matrix(self.chroma), persistent=False)

    @property
    def param_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def init(self, generator: torch.Generator) -> torch.Tensor:
        """One image's initial parameters (on the generator's device), drawn only from ``generator``."""
        return torch.randn(self.param_shape, generator=generator, device=generator.device) * self.init_sd

    def _from_unit(self, x: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
        """Inverse of ``_to_unit`` (values clipped to [eps, 1 - eps] first, so sigmoid's
        inverse stays finite)."""
        x = x.float().clamp(eps, 1.0 - eps)
        z = torch.logit(x) if self.output == "sigmoid" else x - 0.5
        if self.decorrelate:
            z = torch.einsum("rc,nrhw->nchw", torch.linalg.pinv(self.color.to(z)).T, z)  # chroma 0: colour dropped
        return z

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Parameters that render (approximately) ``images``: the inverse of ``forward``.

        Used to start synthesis from given images (e.g. natural images) instead of noise.
        Exact up to the [0.01, 0.99] clipping that keeps the sigmoid's inverse finite.

        Shape:
            - images: ``(B, C, size, size)`` in [0, 1]
            - returns: ``(B, *param_shape)``
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(
                f"encode expects images of shape (B, {self.channels}, {self.size}, {self.size}), got {tuple(images.shape)}"
            )
        return self._encode(self._from_unit(images))

    def _encode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _to_unit(self, z: torch.Tensor) -> torch.Tensor:
        if self.decorrelate:
            z = torch.einsum("rc,nchw->nrhw", self.color.to(z), z)
        if self.output == "sigmoid":
            return torch.sigmoid(z)
        return (z + 0.5).clamp(0.0, 1.0)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """Render images.

        Shape:
            - p: ``(B, *param_shape)``
            - returns: ``(B, C, size, size)`` in [0, 1]
        """
        raise NotImplementedError


class PixelParam(ImageParam):
    """One parameter per pixel and channel (see module docstring)."""

    @property
    def param_shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self._to_unit(p)

    def _encode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class FourierParam(ImageParam):
    """Real 2-D spectrum scaled by ``1 / max(f, 1/size) ** decay_power`` (see module docstring).

    The scale is normalized to unit RMS over frequencies, so ``init_sd`` and the learning
    rate mean roughly the same for any image size.
    """

    def __init__(self, *, decay_power: float, **kw) -> None:
        super().__init__(**kw)
        if decay_power < 0:
            raise ValueError(f"decay_power must be >= 0, got {decay_power}")
        self.decay_power = float(decay_power)
        # ortho irfft2 of unit-variance coefficients gives pixel std ~ sqrt(2) * rms(scale)
        self.register_buffer("scale", fourier_scale(self.size, self.decay_power) / math.sqrt(2.0), persistent=False)

    @property
    def param_shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size // 2 + 1, 2)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        spec = torch.view_as_complex(p.float().contiguous()) * self.scale.to(p.device)
        z = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        return self._to_unit(z)

    def _encode(self, z: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft2(z, norm="ortho") / self.scale.to(z.device)
        return torch.view_as_real(spec).contiguous()


@PARAMS.register("pixel")
def pixel(*, output: str = "sigmoid", decorrelate: bool = False, init_sd: float = 0.01, chroma: float = 1.0, channels: int, size: int) -> PixelParam:
    """Pixel parameterization (``output``: sigmoid or clamp; ``chroma`` as for ``fourier``)."""
    return PixelParam(channels=channels, size=size, output=output, decorrelate=decorrelate, init_sd=init_sd, chroma=chroma)


@PARAMS.register("fourier")
def fourier(
    *,
    decay_power: float = 1.0,
    output: str = "sigmoid",
    decorrelate: bool = True,
    init_sd: float = 0.01,
    chroma: float = 1.0,
    channels: int,
    size: int,
) -> FourierParam:
    """Fourier parameterization with 1/f scaling and (RGB) decorrelated colour.

    ``chroma`` scales the colour-opponent components (RGB with ``decorrelate``): 1 keeps
    their natural amplitudes, 0 synthesizes grey images (R = G = B) for an RGB model.
    """
    return FourierParam(
        channels=channels, size=size, output=output, decorrelate=decorrelate, init_sd=init_sd, decay_power=decay_power, chroma=chroma
    )
