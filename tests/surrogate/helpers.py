"""Small synthetic recordings for the surrogate tests (a fixed random 'brain' + Poisson noise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def toy_images(n: int, size: int = 32, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Smooth random images in [0, 1]: blurred noise with random contrast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :]) / 256.0
    x = F.conv2d(x.reshape(-1, 1, size, size), k.view(1, 1, 5, 5), padding=2).reshape(n, channels, size, size)
    x = x / x.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    return (0.5 + 0.2 * x).clamp(0, 1)


def toy_brain_responses(x: torch.Tensor, n_sites: int = 6, seed: int = 1, n_repeats: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses of a fixed random 'brain' (oriented filters, rectification, local RFs).

    Returns:
        (repeat-mean Poisson responses, expected rates), both (N, S).
    """
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    filt = torch.randn(8, c, 5, 5, generator=g)
    f = F.relu(F.conv2d(x - 0.5, filt, padding=2)) ** 2  # (N, 8, h, w)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    pos = torch.rand(n_sites, 2, generator=g) - 0.5
    rf = torch.exp(-((xx - pos[:, 0, None, None]) ** 2 + (yy - pos[:, 1, None, None]) ** 2) / (2 * 0.25**2))
    rf = rf / rf.flatten(1).sum(1).view(-1, 1, 1)
    wch = torch.rand(n_sites, 8, generator=g) * (torch.rand(n_sites, 8, generator=g) < 0.5)
    drive = torch.einsum("nchw,shw,sc->ns", f, rf, wch)
    drive = (drive - drive.mean(0)) / drive.std(0).clamp_min(1e-6)
    rate = 3.0 * F.softplus(1.5 * drive)
    noisy = torch.poisson(rate.unsqueeze(-1).expand(-1, -1, n_repeats).contiguous(), generator=g).mean(-1)
    return noisy, rate


def toy_recording(n_train: int = 160, n_val: int = 48, size: int = 32, n_sites: int = 6, channels: int = 1):
    x = toy_images(n_train + n_val, size=size, channels=channels)
    y, rate = toy_brain_responses(x, n_sites=n_sites)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), rate


#: a tiny, fast small_cnn fit for tests
TINY_FIT = {
    "backbone": "small_cnn",
    "backbone_kwargs": {"channels": 8, "n_layers": 2, "first_kernel": 5},
    "input_size": 0,
    "epochs": 15,
    "batch_size": 32,
    "lr": 0.01,
    "patience": 10,
}
