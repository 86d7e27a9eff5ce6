import numpy as np
import pytest
import torch

from synth.data.natural import generate_natural_images


@pytest.fixture(scope="module")
def gray():
    return generate_natural_images(48, size=96, grayscale=True, seed=11)


def test_shape_dtype_range(gray):
    assert gray.shape == (48, 1, 96, 96)
    assert gray.dtype == torch.float32
    assert gray.min() >= 0.0 and gray.max() <= 1.0
    assert torch.isfinite(gray).all()


def test_rgb_shape_and_colour():
    x = generate_natural_images(8, size=64, grayscale=False, seed=2)
    assert x.shape == (8, 3, 64, 64)
    assert x.min() >= 0.0 and x.max() <= 1.0
    # coloured leaves: channels differ
    assert (x[:, 0] - x[:, 1]).abs().mean() > 0.01
    assert (x[:, 2] - x[:, 1]).abs().mean() > 0.01


def test_grayscale_is_luminance_of_rgb():
    g = generate_natural_images(6, size=48, grayscale=True, seed=9)
    c = generate_natural_images(6, size=48, grayscale=False, seed=9)
    # same scenes: luminance of the RGB image ~ grayscale image (up to clipping)
    r = np.corrcoef(g.flatten().numpy(), c.mean(1).flatten().numpy())[0, 1]
    assert r > 0.95


def test_seeded_determinism_and_prefix():
    a = generate_natural_images(20, size=40, seed=5)
    b = generate_natural_images(20, size=40, seed=5, batch=1)
    c = generate_natural_images(7, size=40, seed=5)
    d = generate_natural_images(20, size=40, seed=6)
    assert torch.equal(a, b)  # batch size does not change the images
    assert torch.equal(a[:7], c)  # image i depends only on (seed, i)
    assert (a - d).abs().mean() > 0.05


def test_images_differ_from_each_other(gray):
    flat = gray.flatten(1)
    d = torch.cdist(flat, flat)
    off = d[~torch.eye(len(flat), dtype=torch.bool)]
    assert off.min() > 1.0


def test_mean_and_contrast_plausible(gray):
    mean = gray.mean(dim=(1, 2, 3))
    rms = gray.std(dim=(1, 2, 3))
    assert 0.3 < mean.mean() < 0.65
    assert (mean > 0.1).all() and (mean < 0.9).all()
    assert 0.08 < rms.median() < 0.3
    assert (rms > 0.02).all()  # no blank images
    # only a small fraction of pixels clipped
    assert ((gray == 0) | (gray == 1)).float().mean() < 0.1


def test_amplitude_spectrum_is_one_over_f(gray):
    x = gray[:, 0].double()
    x = x - x.mean(dim=(1, 2), keepdim=True)
    n = x.shape[-1]
    w = torch.hann_window(n, periodic=False, dtype=torch.float64)
    amp = torch.fft.fftshift(torch.fft.fft2(x * w[:, None] * w[None, :]).abs(), dim=(-2, -1)).mean(0).numpy()
    yy, xx = np.mgrid[-n // 2 : n // 2, -n // 2 : n // 2]
    f = np.sqrt(xx**2 + yy**2)
    m = (f >= 2) & (f <= n / 4)
    slope = np.polyfit(np.log(f[m]), np.log(amp[m]), 1)[0]
    assert -2.5 < slope < -0.5


def test_any_size_and_empty():
    assert generate_natural_images(2, size=17, seed=0).shape == (2, 1, 17, 17)
    assert generate_natural_images(0, size=32).shape == (0, 1, 32, 32)
    with pytest.raises(ValueError):
        generate_natural_images(2, size=4)
