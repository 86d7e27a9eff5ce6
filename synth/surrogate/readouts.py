"""Per-site readouts: feature map ``(N, C, H, W)`` -> site responses ``(N, S)`` >= 0.

``factorized``  Klindt et al. 2017 / Bashivan et al. 2019: per site a spatial mask
                (H x W) times channel weights (C) plus a bias; L1 on masks and channel
                weights and a Laplacian smoothness penalty on the masks.
``gaussian``    a Gaussian readout (Lurz et al. 2021, neuralpredictors style): per site a
                learned position sampled with ``grid_sample`` (jittered by a learned
                spread during training), channel weights and a bias.

Outputs pass through ``softplus`` or ``elu1`` (ELU + 1), so predictions are >= 0.
Every readout has ``regularizer()`` (added to the fitting loss), ``init_bias(mean)``
(start at the sites' mean responses) and ``spatial_masks()`` ((S, H, W) in [0, 1]).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.registry import Registry

#: name -> builder(*, in_shape=(C, H, W), n_sites, **kwargs) -> Readout
READOUTS: Registry = Registry("readout")

NONLINEARITIES = ("softplus", "elu1")


def output_nonlinearity(z: torch.Tensor, kind: str) -> torch.Tensor:
    """softplus(z) or ELU(z) + 1 (both > 0, smooth, ~linear for large z)."""
    if kind == "softplus":
        return F.softplus(z)
    if kind == "elu1":
        return F.elu(z) + 1.0
    raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {kind!r}")


def inverse_nonlinearity(y: torch.Tensor, kind: str) -> torch.Tensor:
    """The pre-activation giving output ``y`` (``y`` clamped to > 0)."""
    y = y.clamp_min(1e-3)
    if kind == "softplus":
        return torch.where(y > 20, y, torch.log(torch.expm1(y)))
    if kind == "elu1":
        return torch.where(y >= 1, y - 1.0, torch.log(y))
    raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {kind!r}")


def _laplacian_penalty(m: torch.Tensor) -> torch.Tensor:
    """Per-map squared Laplacian / squared norm, mean over maps. ``m``: (S, H, W)."""
    k = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], device=m.device, dtype=m.dtype)
    lap = F.conv2d(m.unsqueeze(1), k.view(1, 1, 3, 3), padding=1)
    num = lap.pow(2).flatten(1).sum(1)
    den = m.pow(2).flatten(1).sum(1).clamp_min(1e-8)
    return (num / den).mean()


class Readout(nn.Module):
    """Base class: see module docstring."""

    nonlinearity: str

    def init_bias(self, mean: torch.Tensor) -> None:
        """Set the bias so that a zero drive predicts ``mean`` (S,) (normalized units)."""
        with torch.no_grad():
            self.bias.copy_(inverse_nonlinearity(mean.to(self.bias), self.nonlinearity))

    def regularizer(self) -> torch.Tensor:  # pragma: no cover - overridden
        return self.bias.new_zeros(())

    def spatial_masks(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError


class FactorizedReadout(Readout):
    """Spatial mask x channel weights per site (Klindt et al. 2017).

    ``out[n, s] = f(sum_{c,h,w} x[n,c,h,w] * mask[s,h,w] * weight[s,c] + bias[s])``

    Args:
        in_shape: feature shape ``(C, H, W)``.
        n_sites: S.
        positive_mask: constrain masks to be >= 0 (``|mask|``), as in Klindt et al.
        mask_l1: weight of the L1 penalty on the masks (mean over sites).
        channel_l1: weight of the L1 penalty on the channel weights (mean over sites).
        smooth: weight of the Laplacian smoothness penalty on the masks.
        nonlinearity: ``softplus`` or ``elu1``.
        init_scale: std of the initial channel weights, times 1/sqrt(C).

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: ``(N, S)`` >= 0
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        n_sites: int,
        *,
        positive_mask: bool = True,
        mask_l1: float = 0.003,
        channel_l1: float = 0.01,
        smooth: float = 0.02,
        nonlinearity: str = "softplus",
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        output_nonlinearity(torch.zeros(1), nonlinearity)  # validates the name
        self.in_shape = (c, h, w)
        self.n_sites = int(n_sites)
        self.positive_mask = bool(positive_mask)
        self.mask_l1 = float(mask_l1)
        self.channel_l1 = float(channel_l1)
        self.smooth = float(smooth)
        self.nonlinearity = nonlinearity
        self.init_scale = float(init_scale)
        # Masks start near-uniform (sum 1 over space) with a little noise to break symmetry.
        m = torch.full((self.n_sites, h, w), 1.0 / (h * w))
        m = m * (1.0 + 0.1 * torch.randn(self.n_sites, h, w))
        self.mask = nn.Parameter(m)
        self.weight = nn.Parameter(torch.randn(self.n_sites, c) * (self.init_scale / math.sqrt(c)))
        self.bias = nn.Parameter(torch.zeros(self.n_sites))

    def effective_mask(self) -> torch.Tensor:
        return self.mask.abs() if self.positive_mask else self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (c, h, w) != self.in_shape:
            raise ValueError(f"readout expects features {self.in_shape}, got {(c, h, w)}")
        m = self.effective_mask().reshape(self.n_sites, h * w)  # (S, HW)
        pooled = torch.matmul(x.reshape(n, c, h * w), m.t())  # (N, C, S)
        z = (pooled * self.weight.t().unsqueeze(0)).sum(dim=1) + self.bias  # (N, S)
        return output_nonlinearity(z, self.nonlinearity)

    def regularizer(self) -> torch.Tensor:
        reg = self.bias.new_zeros(())
        m = self.effective_mask()
        if self.mask_l1 > 0:
            reg = reg + self.mask_l1 * m.abs().flatten(1).sum(1).mean()
        if self.channel_l1 > 0:
            reg = reg + self.channel_l1 * self.weight.abs().sum(1).mean()
        if self.smooth > 0:
            reg = reg + self.smooth * _laplacian_penalty(m)
        return reg

    def spatial_masks(self) -> torch.Tensor:
        """|mask| per site scaled to max 1: ``(S, H, W)`` in [0, 1]."""
        m = self.mask.detach().abs()
        return m / m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)

    def config(self) -> dict[str, Any]:
        return {
            "name": "factorized",
            "positive_mask": self.positive_mask,
            "mask_l1": self.mask_l1,
            "channel_l1": self.channel_l1,
            "smooth": self.smooth,
            "nonlinearity": self.nonlinearity,
            "init_scale": self.init_scale,
        }


class GaussianReadout(Readout):
    """A learned position per site read with bilinear ``grid_sample`` (Lurz et al. 2021).

    During training the position is jittered by ``sigma * N(0, 1)`` (drawn from
    ``self.generator`` when set, for seeded fits), which spreads the gradient of the
    position; at evaluation the mean position is used.

    Args:
        in_shape: feature shape ``(C, H, W)``.
        n_sites: S.
        init_mu_range: initial positions uniform in ``[-r, r]`` (grid units, [-1, 1]).
        init_sigma: initial position jitter (grid units).
        channel_l1: weight of the L1 penalty on the channel weights.
        nonlinearity: ``softplus`` or ``elu1``.

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: ``(N, S)`` >= 0
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        n_sites: int,
        *,
        init_mu_range: float = 0.5,
        init_sigma: float = 0.5,
        channel_l1: float = 0.01,
        nonlinearity: str = "softplus",
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        output_nonlinearity(torch.zeros(1), nonlinearity)
        self.in_shape = (c, h, w)
        self.n_sites = int(n_sites)
        self.init_mu_range = float(init_mu_range)
        self.init_sigma = float(init_sigma)
        self.channel_l1 = float(channel_l1)
        self.nonlinearity = nonlinearity
        self.mu = nn.Parameter((torch.rand(self.n_sites, 2) * 2 - 1) * self.init_mu_range)
        self.sigma = nn.Parameter(torch.full((self.n_sites,), self.init_sigma))
        self.weight = nn.Parameter(torch.randn(self.n_sites, c) / math.sqrt(c))
        self.bias = nn.Parameter(torch.zeros(self.n_sites))
        self.generator: torch.Generator | None = None

    def _grid(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        mu = self.mu.clamp(-1, 1)
        if self.training:
            noise = torch.randn(n, self.n_sites, 2, generator=self.generator, device=self.generator.device if self.generator else None)
            noise = noise.to(device=device, dtype=dtype)
            grid = mu.unsqueeze(0) + self.sigma.view(1, -1, 1) * noise
        else:
            grid = mu.unsqueeze(0).expand(n, -1, -1)
        return grid.clamp(-1, 1).unsqueeze(2)  # (N, S, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (c, h, w) != self.in_shape:
            raise ValueError(f"readout expects features {self.in_shape}, got {(c, h, w)}")
        grid = self._grid(n, x.device, x.dtype)
        feats = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (N, C, S, 1)
        z = (feats.squeeze(-1) * self.weight.t().unsqueeze(0)).sum(dim=1) + self.bias
        return output_nonlinearity(z, self.nonlinearity)

    def regularizer(self) -> torch.Tensor:
        if self.channel_l1 <= 0:
            return self.bias.new_zeros(())
        return self.channel_l1 * self.weight.abs().sum(1).mean()

    def spatial_masks(self) -> torch.Tensor:
        """A Gaussian blob at each site's position (width: its jitter, >= 1 feature pixel)."""
        _, h, w = self.in_shape
        dev = self.mu.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w * 2 - 1
        mu = self.mu.detach().clamp(-1, 1).float()
        sig = self.sigma.detach().abs().float().clamp_min(2.0 / min(h, w)).view(-1, 1, 1)
        dy = ys.view(1, h, 1) - mu[:, 1].view(-1, 1, 1)
        dx = xs.view(1, 1, w) - mu[:, 0].view(-1, 1, 1)
        g = torch.exp(-(dx.pow(2) + dy.pow(2)) / (2 * sig.pow(2)))
        return g / g.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)

    def config(self) -> dict[str, Any]:
        return {
            "name": "gaussian",
            "init_mu_range": self.init_mu_range,
            "init_sigma": self.init_sigma,
            "channel_l1": self.channel_l1,
            "nonlinearity": self.nonlinearity,
        }


class CellReadout(Readout):
    """Channel weights over the mean of one fixed grid cell per site.

    The features are averaged over the cells of a ``grid`` x ``grid`` grid; site ``s``
    reads cell ``cells[s]`` (row-major) through its own channel weights:
    ``out[n, s] = f(sum_c cellmean[n, c, cells[s]] * weight[s, c] + bias[s])``. For
    targets whose place is known, such as a teacher's hidden channels averaged over the
    same cells (``fit.core.distill_features``): per batch it costs N x C x S instead of the
    factorized readout's N x C x H x W x S. Not in the ``READOUTS`` registry (the cells
    come from the targets, not from a config).

    Args:
        in_shape: feature shape ``(C, H, W)``.
        cells: ``(S,)`` cell index of each site, in ``[0, grid ** 2)``.
        grid: cells per side (``adaptive_avg_pool2d``).
        channel_l1: weight of the L1 penalty on the channel weights (mean over sites).
        nonlinearity: ``softplus`` or ``elu1``.

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: ``(N, S)`` >= 0
    """

    def __init__(self, in_shape: tuple[int, int, int], cells: torch.Tensor, grid: int, *, channel_l1: float = 0.01, nonlinearity: str = "softplus") -> None:
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        cells = torch.as_tensor(cells, dtype=torch.long).flatten()
        if grid < 1 or cells.numel() == 0 or int(cells.min()) < 0 or int(cells.max()) >= grid * grid:
            raise ValueError(f"cells must be indices in [0, {grid * grid}) of a {grid} x {grid} grid, got {cells.numel()} of them")
        output_nonlinearity(torch.zeros(1), nonlinearity)  # validates the name
        self.in_shape = (c, h, w)
        self.grid = int(grid)
        self.n_sites = int(cells.numel())
        self.channel_l1 = float(channel_l1)
        self.nonlinearity = nonlinearity
        self.register_buffer("cells", cells)
        self.weight = nn.Parameter(torch.randn(self.n_sites, c) / math.sqrt(c))
        self.bias = nn.Parameter(torch.zeros(self.n_sites))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (c, h, w) != self.in_shape:
            raise ValueError(f"readout expects features {self.in_shape}, got {(c, h, w)}")
        means = F.adaptive_avg_pool2d(x, self.grid).flatten(2)  # (N, C, G*G)
        z = (means[:, :, self.cells] * self.weight.t().unsqueeze(0)).sum(dim=1) + self.bias  # (N, S)
        return output_nonlinearity(z, self.nonlinearity)

    def regularizer(self) -> torch.Tensor:
        return self.channel_l1 * self.weight.abs().sum(1).mean() if self.channel_l1 > 0 else self.bias.new_zeros(())

    def spatial_masks(self) -> torch.Tensor:
        """Each site's cell as a 0/1 map ``(S, H, W)`` (the grid upsampled by nearest neighbour;
        exactly ``adaptive_avg_pool2d``'s cells where ``grid`` divides H and W)."""
        _, h, w = self.in_shape
        one = torch.eye(self.grid * self.grid, device=self.cells.device).view(-1, 1, self.grid, self.grid)
        maps = F.interpolate(one, size=(h, w), mode="nearest")[:, 0]  # (G*G, H, W)
        return maps[self.cells]

    def config(self) -> dict[str, Any]:
        return {"name": "cells", "grid": self.grid, "channel_l1": self.channel_l1, "nonlinearity": self.nonlinearity}


@READOUTS.register("factorized")
def factorized(
    *,
    in_shape: tuple[int, int, int],
    n_sites: int,
    positive_mask: bool = True,
    mask_l1: float = 0.003,
    channel_l1: float = 0.01,
    smooth: float = 0.02,
    nonlinearity: str = "softplus",
    init_scale: float = 1.0,
) -> FactorizedReadout:
    """Factorized (spatial mask x channel weights) readout; see :class:`FactorizedReadout`."""
    return FactorizedReadout(
        in_shape, n_sites, positive_mask=positive_mask, mask_l1=mask_l1, channel_l1=channel_l1,
        smooth=smooth, nonlinearity=nonlinearity, init_scale=init_scale,
    )


@READOUTS.register("gaussian")
def gaussian(
    *,
    in_shape: tuple[int, int, int],
    n_sites: int,
    init_mu_range: float = 0.5,
    init_sigma: float = 0.5,
    channel_l1: float = 0.01,
    nonlinearity: str = "softplus",
) -> GaussianReadout:
    """Gaussian (learned position) readout; see :class:`GaussianReadout`."""
    return GaussianReadout(
        in_shape, n_sites, init_mu_range=init_mu_range, init_sigma=init_sigma, channel_l1=channel_l1, nonlinearity=nonlinearity
    )


def build_readout(spec: Any, *, in_shape: tuple[int, int, int], n_sites: int, seed: int | None = None) -> Readout:
    """Build a readout from ``"name"`` or ``{"name": ..., **kwargs}`` (isolated seeded init)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        return READOUTS.build(spec, key="readout", in_shape=tuple(in_shape), n_sites=int(n_sites))
