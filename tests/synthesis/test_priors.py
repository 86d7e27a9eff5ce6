import pytest
import torch

from synth.errors import ConfigError
from synth.synthesis import PRIORS


def _smooth_and_noisy(n=24):
    yy, xx = torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="ij")
    smooth = (0.5 + 0.2 * torch.sin(xx / 4)).view(1, 1, n, n)
    noisy = (0.5 + 0.2 * torch.sign(torch.randn(1, 1, n, n, generator=torch.Generator().manual_seed(0))))
    return torch.cat([smooth, noisy])


def test_tv_prefers_smooth_images_and_is_per_image():
    tv = PRIORS.build({"name": "tv", "weight": 2.0})
    x = _smooth_and_noisy()
    bg = torch.full((2,), 0.5)
    pen = tv.penalty(x, bg)
    assert pen.shape == (2,)
    assert float(pen[0]) < 0.2 * float(pen[1])
    assert torch.allclose(tv.penalty(x[1:], bg[1:]), pen[1:])
    assert float(tv.penalty(torch.full((1, 1, 8, 8), 0.3), bg[:1])) == 0.0
    x = x.clone().requires_grad_(True)
    tv.penalty(x, bg).sum().backward()
    assert float(x.grad.abs().sum()) > 0


def test_l2_measures_distance_to_background():
    l2 = PRIORS.build({"name": "l2", "weight": 1.0})
    x = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 0.7)])
    assert torch.allclose(l2.penalty(x, torch.full((2,), 0.5)), torch.tensor([0.0, 0.04]))


def test_blur_grad_smooths_the_gradient():
    prior = PRIORS.build({"name": "blur_grad", "sigma": 1.5})
    assert prior.penalty(torch.zeros(1, 1, 4, 4), torch.zeros(1)) is None
    x = torch.zeros(1, 1, 16, 16, requires_grad=True)
    y = prior.precondition(x)
    spike = torch.zeros(1, 1, 16, 16)
    spike[0, 0, 8, 8] = 1.0
    (y * spike).sum().backward()
    g = x.grad[0, 0]
    assert float(g[8, 8]) < 0.2  # spread out
    assert abs(float(g.sum()) - 1.0) < 1e-4  # mass preserved
    assert float(g[8, 10]) > 0.01


def test_bad_prior_args():
    with pytest.raises(ConfigError, match="weight"):
        PRIORS.build({"name": "tv", "weight": -1})
    with pytest.raises(ConfigError, match="unknown prior"):
        PRIORS.build("smoothness")
