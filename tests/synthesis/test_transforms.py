import pytest
import torch

from synth.errors import ConfigError
from synth.synthesis import TRANSFORMS, build_transforms
from synth.synthesis.transforms import TransformPipeline


def _img(b=2, c=1, n=20, seed=0):
    return torch.rand(b, c, n, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", [{"name": "jitter", "pixels": 3}, {"name": "scale", "min": 0.8, "max": 1.2}, {"name": "rotate", "degrees": 20}, {"name": "pad", "width": 4}])
def test_shape_gradient_and_seeded(spec):
    pipe = build_transforms([spec])
    x = _img().requires_grad_(True)
    u = torch.rand(2, pipe.n_random, generator=torch.Generator().manual_seed(1))
    fill = torch.full((2,), 0.5)
    y = pipe(x, u, fill)
    assert y.shape == x.shape  # pad crops back by default
    y2 = pipe(x, u.clone(), fill)
    assert torch.equal(y, y2)
    (y * torch.rand_like(y)).sum().backward()
    assert float(x.grad.abs().sum()) > 0


def test_jitter_integer_shift_moves_content_and_fills_background():
    pipe = build_transforms([{"name": "jitter", "pixels": 3}])
    x = _img(b=1)
    u = torch.tensor([[1.0 - 1e-7, 0.5]])  # dx = +3, dy = 0
    y = pipe(x, u, torch.tensor([0.25]))
    assert torch.allclose(y[..., :, 3:], x[..., :, :-3], atol=1e-5)
    assert torch.allclose(y[..., :, :3], torch.full_like(y[..., :, :3], 0.25), atol=1e-6)


def test_per_image_draws_are_independent_of_batch():
    pipe = build_transforms([{"name": "jitter", "pixels": 4}, {"name": "rotate", "degrees": 15}, {"name": "scale"}])
    x = _img(b=4)
    u = torch.rand(4, pipe.n_random, generator=torch.Generator().manual_seed(3))
    fill = torch.full((4,), 0.5)
    whole = pipe(x, u, fill)
    for i in range(4):
        assert torch.allclose(pipe(x[i : i + 1], u[i : i + 1], fill[:1]), whole[i : i + 1], atol=1e-6)
    assert not torch.allclose(whole[0], whole[1])


def test_fused_affine_equals_sequential_application():
    specs = [{"name": "rotate", "degrees": 10}, {"name": "scale", "min": 0.9, "max": 1.1}, {"name": "jitter", "pixels": 2, "integer": False}]
    fused = build_transforms(specs)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    x = (0.5 + 0.3 * torch.sin(xx / 5) * torch.cos(yy / 7)).expand(3, 1, 40, 40)  # smooth: little resampling error
    u = torch.rand(3, fused.n_random, generator=torch.Generator().manual_seed(0))
    fill = torch.full((3,), 0.5)
    y = fused(x, u, fill)
    seq, j = x, 0
    for s in specs:
        t = TRANSFORMS.build(s)
        seq = TransformPipeline([t])(seq, u[:, j : j + t.n_random], fill)
        j += t.n_random
    inner = (slice(None), slice(None), slice(8, 32), slice(8, 32))  # away from the borders
    assert (y[inner] - seq[inner]).abs().max() < 0.008


def test_zero_range_transforms_are_identity():
    pipe = build_transforms([{"name": "rotate", "degrees": 0}, {"name": "scale", "min": 1, "max": 1}, {"name": "jitter", "pixels": 0}])
    x = _img()
    assert torch.allclose(pipe(x, torch.rand(2, pipe.n_random), torch.full((2,), 0.5)), x, atol=1e-5)


def test_pad_without_crop_grows_and_fills():
    pipe = build_transforms([{"name": "pad", "width": 3, "crop": False, "fill": 0.1}])
    y = pipe(_img(), torch.zeros(2, 0), torch.full((2,), 0.5))
    assert y.shape[-1] == 26
    assert torch.allclose(y[..., :3, :], torch.full_like(y[..., :3, :], 0.1))


def test_bad_specs():
    with pytest.raises(ConfigError, match="pixel"):
        build_transforms([{"name": "jitter", "pixel": 3}])
    with pytest.raises(ConfigError, match="min"):
        build_transforms([{"name": "scale", "min": 1.2, "max": 1.0}])
    with pytest.raises(ConfigError, match="unknown transform 'rotat'"):
        build_transforms(["rotat"])
