import pytest
import torch

from synth.errors import ConfigError
from synth.runtime import torch_generator
from synth.synthesis import PARAMS
from synth.synthesis.params import color_matrix, fourier, fourier_scale


@pytest.mark.parametrize("name", ["pixel", "fourier"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("output", ["sigmoid", "clamp"])
def test_shape_range_and_gradient(name, channels, output):
    param = PARAMS.build({"name": name, "output": output, "init_sd": 0.5}, channels=channels, size=16)
    p = torch.stack([param.init(torch_generator(s)) for s in range(3)]).requires_grad_(True)
    x = param(p)
    assert x.shape == (3, channels, 16, 16)
    assert float(x.detach().min()) >= 0.0 and float(x.detach().max()) <= 1.0
    (x * torch.linspace(-1, 1, 16)).sum().backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["pixel", "fourier"])
def test_init_is_seeded(name):
    param = PARAMS.build(name, channels=3, size=12)
    a = param.init(torch_generator(7))
    b = param.init(torch_generator(7))
    c = param.init(torch_generator(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _radial_power(img: torch.Tensor) -> tuple[float, float]:
    spec = torch.fft.rfft2(img - img.mean()).abs() ** 2
    n = img.shape[-1]
    fy = torch.fft.fftfreq(n).view(-1, 1)
    fx = torch.fft.rfftfreq(n).view(1, -1)
    f = torch.sqrt(fx**2 + fy**2)
    return float(spec[..., (f > 0) & (f < 0.1)].mean()), float(spec[..., f > 0.3].mean())


def test_fourier_has_falling_spectrum_and_pixel_is_white():
    n = 32
    four = PARAMS.build({"name": "fourier", "output": "clamp", "init_sd": 0.05, "decay_power": 1.0}, channels=1, size=n)
    pix = PARAMS.build({"name": "pixel", "output": "clamp", "init_sd": 0.05}, channels=1, size=n)
    g = torch_generator(0)
    lo_f, hi_f = _radial_power(four(torch.stack([four.init(g) for _ in range(8)])))
    lo_p, hi_p = _radial_power(pix(torch.stack([pix.init(g) for _ in range(8)])))
    assert lo_f / hi_f > 20  # 1/f amplitude: power falls by (0.3/0.1)^2 at least
    assert 0.3 < lo_p / hi_p < 3  # white


def test_fourier_preconditions_gradient_steps_towards_low_frequencies():
    # the same unit step in parameter space moves low frequencies far more than high ones
    n = 32
    four = PARAMS.build({"name": "fourier", "output": "clamp", "init_sd": 0.0}, channels=1, size=n)
    p = torch.zeros(1, *four.param_shape)
    lo, hi = p.clone(), p.clone()
    lo[0, 0, 1, 0, 0] = 1.0  # 1 cycle / image
    hi[0, 0, 12, 10, 0] = 1.0  # ~0.5 cycles / pixel
    assert float((four(lo) - 0.5).abs().max()) > 5 * float((four(hi) - 0.5).abs().max())


def test_decorrelated_colour_mixes_channels():
    m = color_matrix()
    assert torch.allclose(m[:, 0].norm(), torch.tensor(1.0))
    assert torch.allclose(m[:, 0], m[0, 0].expand(3))  # first component is achromatic
    four = PARAMS.build({"name": "fourier", "output": "clamp", "init_sd": 0.0}, channels=3, size=8)
    p = torch.zeros(1, *four.param_shape)
    p[0, 0, 0, 0, 0] = 1.0  # DC of the luminance component only
    x = four(p)
    assert torch.allclose(x[0, 0], x[0, 1]) and torch.allclose(x[0, 1], x[0, 2])
    assert float((x - 0.5).abs().max()) > 0.01


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="decay"):
        PARAMS.build({"name": "fourier", "decay": 1.0}, channels=1, size=8)
    with pytest.raises(ConfigError, match="output"):
        PARAMS.build({"name": "pixel", "output": "tanh"}, channels=1, size=8)


def test_bad_values_fail_when_the_config_loads():
    """A bad value is caught by the config, not minutes later when synthesis builds the param."""
    from synth.configtools import from_dict
    from synth.synthesis import SynthesisConfig

    with pytest.raises(ConfigError, match=r"param: bad arguments for image parameterization 'fourier': chroma must be >= 0, got -0.5"):
        from_dict(SynthesisConfig, {"param": {"name": "fourier", "chroma": -0.5}})
    with pytest.raises(ConfigError, match=r"param: bad arguments for image parameterization 'fourier': decay_power must be >= 0"):
        from_dict(SynthesisConfig, {"param": {"name": "fourier", "decay_power": -1}})


@pytest.mark.parametrize("name", ["pixel", "fourier"])
def test_chroma_scales_the_colour_components(name):
    """chroma 0: grey images (R = G = B); 0.5: half the colour deviation of chroma 1."""
    imgs = {}
    for c in (0.0, 0.5, 1.0):
        param = PARAMS.build({"name": name, "output": "clamp", "decorrelate": True, "chroma": c}, channels=3, size=8)
        p = 0.05 * torch.randn(1, *param.param_shape, generator=torch.Generator().manual_seed(1))
        imgs[c] = param(p)
    dev = {c: x - x.mean(dim=1, keepdim=True) for c, x in imgs.items()}  # colour: deviation from the channels' mean
    assert float(dev[1.0].abs().max()) > 1e-3 and float(dev[0.0].abs().max()) < 1e-6
    assert torch.allclose(dev[0.5], 0.5 * dev[1.0], atol=1e-6)
    assert torch.allclose(imgs[0.0].mean(dim=1), imgs[1.0].mean(dim=1), atol=1e-6)  # luminance untouched


def test_chroma_zero_encodes_the_grey_part_of_an_image():
    param = PARAMS.build({"name": "fourier", "chroma": 0.0}, channels=3, size=12)
    grey = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    assert torch.allclose(param(param.encode(grey.expand(-1, 3, -1, -1))), grey.expand(-1, 3, -1, -1), atol=1e-5)


@pytest.mark.parametrize("name", ["pixel", "fourier"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("output,decorrelate", [("sigmoid", True), ("clamp", True), ("sigmoid", False)])
def test_encode_inverts_forward(name, channels, output, decorrelate):
    param = PARAMS.build({"name": name, "output": output, "decorrelate": decorrelate}, channels=channels, size=18)
    x = torch.rand(2, channels, 18, 18, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    p = param.encode(x)
    assert p.shape == (2, *param.param_shape)
    assert torch.allclose(param(p), x, atol=1e-5)


def test_encode_clips_to_keep_sigmoid_finite_and_checks_shape():
    param = PARAMS.build("fourier", channels=1, size=8)
    x = torch.zeros(1, 1, 8, 8)
    x[..., :4] = 1.0
    y = param(param.encode(x))
    assert torch.isfinite(y).all()
    assert torch.allclose(y, x.clamp(0.01, 0.99), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        param.encode(torch.rand(1, 3, 8, 8))


def test_fourier_scale_is_the_fourier_params_preconditioner():

    s = fourier_scale(16, 2.0)
    assert s.shape == (16, 9) and s.dtype == torch.float32
    assert abs(float(s.pow(2).mean().sqrt()) - 1.0) < 1e-5  # unit RMS
    assert float(s[0, 1]) > float(s[0, 4]) > float(s[0, 8])  # falls with frequency
    assert float(s[0, 0]) == float(s[0, 1])  # DC counted at the lowest frequency, not infinite
    assert torch.allclose(fourier_scale(16, 0.0), torch.ones(16, 9))
    p = fourier(decay_power=2.0, channels=1, size=16)
    assert torch.allclose(p.scale * 2**0.5, s)
    with pytest.raises(ValueError, match="decay_power"):
        fourier_scale(16, -1.0)
