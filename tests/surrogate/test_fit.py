import numpy as np
import pytest
import torch

from synth.configtools import from_dict
from synth.errors import ConfigError, DataError
from synth.surrogate.fit import FitConfig, SplitConfig, fit_surrogate, pearson_columns, predict, random_shift
from synth.surrogate.model import Surrogate

from .helpers import TINY_FIT, toy_recording

SITES = [f"s{i}" for i in range(6)]


@pytest.fixture(scope="module")
def toy():
    return toy_recording()


@pytest.fixture(scope="module")
def tiny_fit(toy):
    train, val, _ = toy
    cfg = from_dict(FitConfig, TINY_FIT)
    return fit_surrogate(cfg, train, val, site_ids=SITES, device="cpu", seed=0)


def test_fit_report_and_model(tiny_fit, toy):
    model, rep = tiny_fit
    assert isinstance(model, Surrogate)
    assert list(model.site_ids) == SITES
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert rep["chosen_layer"] == "out" and rep["layers"] == ["out"]
    assert set(rep["per_site_val_r"]) == set(SITES)
    assert rep["epochs_run"]["out"] == len(rep["history"]["out"]) == TINY_FIT["epochs"]
    assert rep["train_seconds"] > 0 and rep["train_backbone"] is True
    _, val, _ = toy
    r = pearson_columns(predict(model, val[0]), val[1].numpy())
    assert np.nanmedian(r) == pytest.approx(rep["val_median_r"], abs=1e-6)
    # best epoch restored: the reported val r is the best of the history
    assert rep["val_median_r"] == pytest.approx(max(rep["history"]["out"]), abs=1e-6)


def test_fit_improves_val_r(tiny_fit):
    _, rep = tiny_fit
    h = rep["history"]["out"]
    assert max(h) > h[0] + 0.1
    assert max(h) > 0.5


def test_predictions_in_response_units(tiny_fit, toy):
    model, _ = tiny_fit
    train, _, _ = toy
    p = predict(model, train[0])
    ratio = p.mean(0) / train[1].numpy().mean(0)
    assert np.all((ratio > 0.5) & (ratio < 2.0))


def test_seeded_fit_repeats_exactly(toy):
    train, val, _ = toy
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 2, "augment_shift": 2})
    m1, r1 = fit_surrogate(cfg, train, val, site_ids=SITES, seed=5)
    m2, r2 = fit_surrogate(cfg, train, val, site_ids=SITES, seed=5)
    m3, _ = fit_surrogate(cfg, train, val, site_ids=SITES, seed=6)
    x = val[0]
    assert np.array_equal(predict(m1, x), predict(m2, x))
    assert r1["history"] == r2["history"]
    assert not np.array_equal(predict(m1, x), predict(m3, x))


def test_several_layers_choose_best_by_val(toy):
    train, val, _ = toy
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 3, "layers": ["conv1", "out"], "readout": {"name": "gaussian"}})
    model, rep = fit_surrogate(cfg, train, val, site_ids=SITES, seed=0)
    per = rep["val_median_r_per_layer"]
    assert set(per) == {"conv1", "out"}
    assert rep["chosen_layer"] == max(per, key=per.get)
    assert model.backbone.layer == rep["chosen_layer"]


def test_frozen_backbone_from_checkpoint(toy, tmp_path):
    """Frozen path (features computed once): backbone weights must not change."""
    from synth.surrogate.backbones import build_backbone

    bb = build_backbone("small_cnn", in_channels=1, input_size=0, kwargs={"channels": 8, "n_layers": 2, "first_kernel": 5}, seed=1)
    ck = tmp_path / "core.pt"
    torch.save(bb.body.state_dict(), ck)
    train, val, _ = toy
    cfg = from_dict(FitConfig, {**TINY_FIT, "weights": str(ck), "epochs": 3})
    assert cfg.trains_backbone is False
    model, rep = fit_surrogate(cfg, train, val, site_ids=SITES, seed=0)
    assert rep["train_backbone"] is False
    for k, v in bb.body.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[k], v), k


def test_mse_loss_runs(toy):
    train, val, _ = toy
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 2, "loss": "mse"})
    _, rep = fit_surrogate(cfg, train, val, site_ids=SITES, seed=0)
    assert np.isfinite(rep["val_median_r"])


def test_config_errors():
    for bad in ({"backbone": "alexnet"}, {"backbone": "alexnet", "weights": "none", "train_backbone": False},
                {"backbone": "small_cnn", "train_backbone": False}):
        with pytest.raises(ConfigError, match="random") as err:
            from_dict(FitConfig, bad)
        assert err.value.key == "weights"
    assert from_dict(FitConfig, {}).trains_backbone is True
    assert from_dict(FitConfig, {"weights": "core.pt"}).trains_backbone is False
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        from_dict(FitConfig, {"backbone": "resnet19"})
    with pytest.raises(ConfigError, match="conv2"):
        from_dict(FitConfig, {"layers": ["conv9"], "backbone_kwargs": {"n_layers": 2}})
    with pytest.raises(ConfigError, match="did you mean 'gaussian'"):
        from_dict(FitConfig, {"readout": {"name": "gausian"}})
    with pytest.raises(ConfigError, match="add up to 1"):
        from_dict(FitConfig, {"split": {"train": 0.5, "val": 0.1, "test": 0.1}})
    with pytest.raises(ConfigError, match="poisson"):
        from_dict(FitConfig, {"loss": "l1"})
    assert from_dict(FitConfig, {"backbone": "alexnet", "weights": "IMAGENET1K_V1"}).trains_backbone is False
    assert from_dict(FitConfig, {"backbone": "alexnet", "train_backbone": True}).trains_backbone is True
    assert from_dict(SplitConfig, None).train == pytest.approx(0.7)
    assert from_dict(FitConfig, {"readout": "gaussian"}).readout == {"name": "gaussian"}


def test_unknown_torchvision_layer_in_fit(toy):
    train, val, _ = toy
    cfg = from_dict(FitConfig, {"backbone": "alexnet", "train_backbone": True, "layers": ["conv33"], "input_size": 64})
    with pytest.raises(ConfigError, match="conv3"):
        fit_surrogate(cfg, train, val, site_ids=SITES)


def test_data_errors(toy):
    train, val, _ = toy
    cfg = from_dict(FitConfig, TINY_FIT)
    with pytest.raises(DataError, match="site ids"):
        fit_surrogate(cfg, train, val, site_ids=SITES[:3])
    y = train[1].clone()
    y[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fit_surrogate(cfg, (train[0], y), val, site_ids=SITES)
    with pytest.raises(DataError, match="negative"):
        fit_surrogate(cfg, (train[0], train[1] - 10), val, site_ids=SITES)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        fit_surrogate(cfg, (train[0] * 300, train[1]), val, site_ids=SITES)


def test_random_shift_is_seeded_translation():
    x = torch.rand(5, 1, 12, 12)
    a = random_shift(x, 2, torch.Generator().manual_seed(0))
    b = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
    # each output is a translated copy: its centre 8x8 block appears in the input
    for i in range(5):
        found = any(torch.equal(a[i, :, 2:10, 2:10], x[i, :, 2 + dy : 10 + dy, 2 + dx : 10 + dx]) for dy in range(-2, 3) for dx in range(-2, 3))
        assert found


def test_pearson_columns_known_values():
    a = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    b = np.array([[2.0, 0.0], [4.0, 1.0], [6.5, 2.0]])
    r = pearson_columns(a, b)
    assert r[0] == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1])
    assert np.isnan(r[1])  # constant prediction


def test_ensemble_members_merge_over_the_main_recipe():
    cfg = from_dict(
        FitConfig,
        {
            "backbone": "pretrained_core",
            "weights": "auto",
            "readout": {"name": "factorized", "mask_l1": 0.5},
            "core": {"input_size": 96, "epochs": 36, "distill_twins": "auto"},
            "ensemble": [
                {"core": {"input_size": 64, "distill_twins": "none"}},
                {"readout": {"mask_l1": 0.1}, "lr": 0.5},
                {"readout": {"name": "gaussian", "init_sigma": 0.3}},
            ],
        },
        key="fit",
    )
    main, m1, m2, m3 = cfg.members()
    assert main.ensemble == () and main.core == cfg.core and main.lr == cfg.lr
    # nested sections merge key by key: only the overridden keys change
    assert (m1.core.input_size, m1.core.epochs, m1.core.distill_twins) == (64, 36, "none")
    assert m1.readout == cfg.readout
    assert m2.readout == {"name": "factorized", "mask_l1": 0.1} and m2.lr == 0.5 and m2.core == cfg.core
    # another component's spec replaces the base's (a gaussian readout has no mask_l1)
    assert m3.readout == {"name": "gaussian", "init_sigma": 0.3}
    assert from_dict(FitConfig, {}).members() == (from_dict(FitConfig, {}),)


@pytest.mark.parametrize(
    "member,match",
    [
        ({"lrr": 1}, r"fit\.ensemble\[0\]: unknown key 'lrr'"),
        ({"core": {"input_size": -3}}, r"fit\.ensemble\[0\]\.core\.input_size"),
        ({"split": {"train": 0.5, "val": 0.2, "test": 0.3}}, r"fit\.ensemble\[0\]\.split: every ensemble member"),
        ({"refit": "all"}, r"fit\.ensemble\[0\]\.refit: every ensemble member"),
        ({"ensemble": []}, r"fit\.ensemble\[0\]\.ensemble: .*ensembles of their own"),
    ],
)
def test_ensemble_member_errors_name_the_member(member, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "ensemble": [member]}, key="fit")
