"""Tiny surrogates and contexts for the synthesis tests (the surrogate contract, nothing more)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synth.configtools import from_dict
from synth.synthesis import ObjectiveContext, SynthesisConfig


class TinySurrogate(nn.Module):
    """Conv + pooled factorized readout; ``(B, C, H, W) in [0, 1] -> (B, S)``, frozen, eval mode."""

    def __init__(self, n_sites: int = 5, channels: int = 1, size: int = 24, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 5, 2, 2)
        self.conv2 = nn.Conv2d(8, 12, 3, 1, 1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan))
                conv.bias.zero_()
        grid = 6
        yy, xx = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
        c = torch.rand(n_sites, 2, generator=g) * (grid - 2) + 1
        m = torch.exp(-((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2) / 2.0)
        self.register_buffer("mask", m / m.flatten(1).amax(1).view(-1, 1, 1))
        self.register_buffer("w", torch.randn(n_sites, 12, generator=g) / math.sqrt(12))
        self.size = size
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.conv2(F.relu(self.conv1((x - 0.5) / 0.25))))
        f = F.adaptive_avg_pool2d(f, self.mask.shape[-1])
        return F.softplus(torch.einsum("nchw,shw,sc->ns", f, self.mask, self.w))

    def receptive_fields(self) -> torch.Tensor:
        m = F.interpolate(self.mask.unsqueeze(1), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (m.squeeze(1) / m.flatten(1).amax(1).view(-1, 1, 1)).clamp(0, 1)


def natural_like(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (natural-image stand-ins)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size // 4, size // 4, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (0.45 + 0.15 * x).clamp(0, 1)


def context_for(model: nn.Module, channels: int, size: int, n: int = 40, rf: bool = False) -> ObjectiveContext:
    nat = natural_like(n, channels, size)
    with torch.no_grad():
        pred = model(nat)
    s = pred.shape[1]
    return ObjectiveContext.from_predictions([f"site{i}" for i in range(s)], pred, nat, rf_masks=model.receptive_fields() if rf else None)


def small_cfg(**over) -> SynthesisConfig:
    """A fast config for tests: few steps, tiny chunks, fixed stopping unless overridden."""
    base = {"steps": 12, "batch_size": 3, "stopping": {"rule": "fixed"}, "lr": 0.1}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return from_dict(SynthesisConfig, base)


def assert_images_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a, b), f"images differ in {int((a != b).sum())} values"
