import numpy as np
import pytest
import torch

from synth.errors import DataError
from synth.surrogate.backbones import build_backbone
from synth.surrogate.fit import predict
from synth.surrogate.model import Surrogate
from synth.surrogate.readouts import build_readout


def make_model(readout="factorized", size=24, channels=1, seed=0):
    bb = build_backbone("small_cnn", in_channels=channels, input_size=0, kwargs={"channels": 6, "n_layers": 2, "first_kernel": 5}, seed=seed)
    ro = build_readout({"name": readout}, in_shape=bb.out_shape(size, channels), n_sites=5, seed=seed)
    with torch.no_grad():
        ro.weight.normal_(generator=torch.Generator().manual_seed(seed))
    m = Surrogate(bb, ro, site_ids=[f"site{i}" for i in range(5)], image_size=size, in_channels=channels,
                  output_scale=torch.linspace(1, 3, 5))
    # Non-trivial BatchNorm statistics, so a save/load round trip has to carry them.
    m.train()
    with torch.no_grad():
        m(torch.rand(16, channels, size, size, generator=torch.Generator().manual_seed(seed + 1)))
    return m.freeze()


def test_forward_shapes_and_attributes():
    m = make_model()
    y = m(torch.rand(3, 1, 24, 24))
    assert y.shape == (3, 5) and (y >= 0).all()
    assert m.site_ids.dtype.kind == "U" and list(m.site_ids[:2]) == ["site0", "site1"]
    assert m.in_channels == 1 and m.image_size == 24 and m.n_sites == 5
    with pytest.raises(ValueError, match="24x24"):
        m(torch.rand(1, 1, 20, 20))


def test_frozen_but_gradients_reach_input():
    m = make_model()
    assert not m.training
    assert all(not p.requires_grad for p in m.parameters())
    x = torch.rand(2, 1, 24, 24, requires_grad=True)
    m(x)[:, 2].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("readout", ["factorized", "gaussian"])
def test_receptive_fields(readout):
    m = make_model(readout)
    rf = m.receptive_fields()
    assert rf.shape == (5, 24, 24)
    assert rf.min() >= 0 and rf.max() <= 1
    assert torch.allclose(rf.flatten(1).amax(1), torch.ones(5))


def test_receptive_field_follows_mask():
    m = make_model()
    with torch.no_grad():
        m.readout.mask.zero_()
        m.readout.mask[0, 0, -1] = 1.0  # top-right feature pixel
    rf = m.receptive_fields()[0]
    iy, ix = divmod(int(rf.argmax()), 24)
    assert iy < 4 and ix > 19


@pytest.mark.parametrize("readout", ["factorized", "gaussian"])
def test_save_load_roundtrip(tmp_path, readout):
    m = make_model(readout, channels=3)
    x = torch.rand(4, 3, 24, 24)
    p = tmp_path / "s.pt"
    m.save(p)
    m2 = Surrogate.load(p, device="cpu")
    assert np.array_equal(predict(m, x), predict(m2, x))
    assert list(m2.site_ids) == list(m.site_ids)
    assert (m2.image_size, m2.in_channels) == (24, 3)
    assert not m2.training and all(not q.requires_grad for q in m2.parameters())
    assert torch.equal(m2.output_scale, m.output_scale)
    spec = torch.load(p, weights_only=True)["spec"]
    assert spec["backbone"]["name"] == "small_cnn" and spec["readout"]["name"] == readout


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="missing.pt"):
        Surrogate.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    with pytest.raises(DataError, match="bad.pt"):
        Surrogate.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(DataError, match="not a synth surrogate"):
        Surrogate.load(other)


def test_predict_batches_equal_single_pass():
    m = make_model()
    x = torch.rand(7, 1, 24, 24)
    a = predict(m, x, batch_size=3)
    with torch.no_grad():
        b = m(x).double().numpy()
    assert a.shape == (7, 5) and np.allclose(a, b, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_load_and_predict(tmp_path):
    m = make_model()
    p = tmp_path / "s.pt"
    m.save(p)
    m2 = Surrogate.load(p, device="cuda")
    x = torch.rand(3, 1, 24, 24)
    assert np.allclose(predict(m, x), predict(m2, x), atol=1e-4)
    assert m2.receptive_fields().device.type == "cuda"


def test_save_load_torchvision_backbone(tmp_path):
    """A truncated torchvision net is rebuilt from the spec (no weights download) + state_dict."""
    bb = build_backbone("alexnet", layer="conv2", in_channels=1, input_size=64, seed=0)
    with torch.no_grad():
        bb.mean.fill_(0.4)  # preprocessing travels in the spec
    ro = build_readout({"name": "factorized"}, in_shape=bb.out_shape(32, 1), n_sites=3, seed=0)
    m = Surrogate(bb, ro, site_ids=["a", "b", "c"], image_size=32, in_channels=1).freeze()
    p = tmp_path / "tv.pt"
    m.save(p)
    m2 = Surrogate.load(p)
    x = torch.rand(2, 1, 32, 32)
    assert np.array_equal(predict(m, x), predict(m2, x))
    assert m2.backbone.name == "alexnet" and m2.backbone.layer == "conv2"
    assert m2.backbone.preprocessing["mean"] == pytest.approx([0.4, 0.4, 0.4])


def test_ensemble_predicts_members_mean_and_checks_them():
    from synth.surrogate.model import SurrogateEnsemble

    a, b = make_model(seed=0), make_model(seed=1)
    ens = SurrogateEnsemble([a, b])
    x = torch.rand(4, 1, 24, 24)
    with torch.no_grad():
        assert torch.allclose(ens(x), (a(x) + b(x)) / 2)
    assert ens.n_sites == 5 and list(ens.site_ids) == list(a.site_ids) and ens.image_size == 24
    assert np.allclose(predict(ens, x), (predict(a, x) + predict(b, x)) / 2, atol=1e-6)
    rf = ens.receptive_fields()
    assert rf.shape == (5, 24, 24) and torch.allclose(rf.flatten(1).amax(1), torch.ones(5))
    assert not torch.allclose(rf, a.receptive_fields())
    # gradients reach the input through every member
    xg = x.clone().requires_grad_(True)
    ens(xg)[:, 0].sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in ens.parameters())
    other = make_model(seed=2)
    other.site_ids = np.array([f"x{i}" for i in range(5)])
    with pytest.raises(ValueError, match="member 1 predicts other sites"):
        SurrogateEnsemble([a, other])
    with pytest.raises(ValueError, match="member 1 was fitted on 20 px"):
        SurrogateEnsemble([a, make_model(size=20)])
