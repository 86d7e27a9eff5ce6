import pytest
import torch

from synth.errors import ConfigError
from synth.surrogate.readouts import (
    READOUTS,
    CellReadout,
    FactorizedReadout,
    GaussianReadout,
    build_readout,
    inverse_nonlinearity,
    output_nonlinearity,
)


@pytest.mark.parametrize("name", ["factorized", "gaussian"])
@pytest.mark.parametrize("nl", ["softplus", "elu1"])
def test_shapes_nonnegative(name, nl):
    r = build_readout({"name": name, "nonlinearity": nl}, in_shape=(5, 7, 9), n_sites=4, seed=0)
    y = r(torch.randn(3, 5, 7, 9) * 10)
    assert y.shape == (3, 4)
    assert (y >= 0).all()
    m = r.spatial_masks()
    assert m.shape == (4, 7, 9) and m.min() >= 0 and m.max() <= 1 + 1e-6
    assert torch.allclose(m.flatten(1).amax(1), torch.ones(4))


def test_factorized_matches_einsum():
    r = FactorizedReadout((3, 4, 5), 2, nonlinearity="softplus")
    x = torch.randn(6, 3, 4, 5)
    z = torch.einsum("nchw,shw,sc->ns", x, r.mask.abs(), r.weight) + r.bias
    assert torch.allclose(r(x), torch.nn.functional.softplus(z), atol=1e-5)


def test_cell_readout_reads_each_sites_cell_mean_through_its_channel_weights():
    r = CellReadout((3, 6, 6), torch.tensor([0, 3, 8, 3]), 3, nonlinearity="softplus")
    x = torch.randn(5, 3, 6, 6)
    # by hand: cell k covers rows 2*(k // 3) .. +2, columns 2*(k % 3) .. +2
    cell = lambda k: x[:, :, 2 * (k // 3) : 2 * (k // 3) + 2, 2 * (k % 3) : 2 * (k % 3) + 2].mean(dim=(2, 3))  # noqa: E731
    z = torch.stack([(cell(k) * r.weight[s]).sum(1) for s, k in enumerate([0, 3, 8, 3])], dim=1) + r.bias
    torch.testing.assert_close(r(x), torch.nn.functional.softplus(z))
    m = r.spatial_masks()
    assert m.shape == (4, 6, 6) and float(m[2, 4:, 4:].min()) == 1.0 and float(m[2].sum()) == 4.0
    assert float(r.regularizer().detach()) == pytest.approx(0.01 * float(r.weight.detach().abs().sum(1).mean()))
    with pytest.raises(ValueError, match=r"cells must be indices in \[0, 9\)"):
        CellReadout((3, 6, 6), torch.tensor([9]), 3)
    with pytest.raises(ValueError, match="readout expects features"):
        r(torch.randn(1, 3, 5, 6))


def test_init_bias_predicts_mean():
    for nl in ("softplus", "elu1"):
        r = build_readout({"name": "factorized", "nonlinearity": nl}, in_shape=(2, 3, 3), n_sites=3)
        target = torch.tensor([0.2, 1.0, 7.0])
        r.init_bias(target)
        assert torch.allclose(r(torch.zeros(1, 2, 3, 3))[0], target, atol=1e-3)
        assert torch.allclose(output_nonlinearity(inverse_nonlinearity(target, nl), nl), target, atol=1e-4)


def test_smoothness_penalty_prefers_smooth_masks():
    r = FactorizedReadout((1, 16, 16), 1, mask_l1=0, channel_l1=0, smooth=1.0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    with torch.no_grad():
        r.mask.copy_(torch.exp(-(xx**2 + yy**2) / 0.3)[None])
    smooth = r.regularizer().item()
    with torch.no_grad():
        r.mask.copy_(torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0)))
    rough = r.regularizer().item()
    assert 0 < smooth < rough / 5


def test_l1_penalties_scale():
    r = FactorizedReadout((4, 3, 3), 2, mask_l1=1.0, channel_l1=0.0, smooth=0.0)
    with torch.no_grad():
        r.mask.fill_(0.5)
    assert r.regularizer().item() == pytest.approx(0.5 * 9)


def test_gaussian_position_moves_mask_and_training_noise_is_seeded():
    r = GaussianReadout((2, 10, 10), 1)
    with torch.no_grad():
        r.mu.copy_(torch.tensor([[0.8, -0.8]]))  # x right, y up
    m = r.spatial_masks()[0]
    iy, ix = divmod(int(m.argmax()), 10)
    assert ix >= 8 and iy <= 1
    x = torch.randn(4, 2, 10, 10)
    r.train()
    r.generator = torch.Generator().manual_seed(1)
    a = r(x)
    r.generator = torch.Generator().manual_seed(1)
    assert torch.equal(a, r(x))
    r.eval()
    assert torch.equal(r(x), r(x))


def test_unknown_readout_and_argument():
    assert READOUTS.names() == ["factorized", "gaussian"]
    with pytest.raises(ConfigError, match="did you mean 'factorized'"):
        build_readout({"name": "factorised"}, in_shape=(1, 2, 2), n_sites=1)
    with pytest.raises(ConfigError, match="mask_l1"):
        build_readout({"name": "factorized", "mask_l2": 1}, in_shape=(1, 2, 2), n_sites=1)
    with pytest.raises(ConfigError, match="nonlinearity"):
        build_readout({"name": "factorized", "nonlinearity": "relu"}, in_shape=(1, 2, 2), n_sites=1)
