import numpy as np
import pytest
import torch

from synth.configtools import from_dict
from synth.errors import ConfigError, DataError
from synth.surrogate.fit import FitConfig, fit_core, fit_surrogate, l2_adversarial, predict, save_core
from synth.surrogate.model import Surrogate

from .helpers import TINY_FIT, toy_brain_responses, toy_images


def sessions():
    out = []
    for k, n_sites in enumerate((5, 7)):
        x = toy_images(120, seed=10 + k)
        y, _ = toy_brain_responses(x, n_sites=n_sites, seed=20 + k)
        out.append((x, y))
    return out


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 8})
    core, rep = fit_core(sessions(), cfg, seed=0, names=["a", "b"])
    path = tmp_path_factory.mktemp("core") / "core.pt"
    save_core(core, str(path))
    return core, rep, path


def test_fit_core_report(core):
    _, rep, _ = core
    assert rep["sessions"] == ["a", "b"]
    assert set(rep["val_median_r"]) == {"a", "b"}
    assert rep["n_val"]["a"] == 15 and rep["n_train"]["a"] == 105  # 0.7 : 0.1 of 120
    first = np.mean(list(rep["history"][0].values()))
    assert rep["mean_val_median_r"] > first


def test_pretrained_core_new_session_frozen(core, tmp_path):
    c, _, path = core
    x = toy_images(100, seed=30)
    y, _ = toy_brain_responses(x, n_sites=4, seed=31)
    cfg = from_dict(FitConfig, {**TINY_FIT, "backbone": "pretrained_core", "weights": str(path), "backbone_kwargs": {}, "epochs": 4})
    assert cfg.trains_backbone is False
    model, rep = fit_surrogate(cfg, (x[:80], y[:80]), (x[80:], y[80:]), site_ids=list("abcd"), seed=0)
    for k, v in c["state_dict"].items():
        assert torch.equal(model.backbone.body.state_dict()[k], v), k
    p = tmp_path / "s.pt"
    model.save(p)
    again = Surrogate.load(p)
    assert np.array_equal(predict(model, x[80:]), predict(again, x[80:]))


def test_pretrained_core_errors(tmp_path):
    with pytest.raises(ConfigError, match="core"):
        from_dict(FitConfig, {"backbone": "pretrained_core"})
    other = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(2)}, other)
    cfg = from_dict(FitConfig, {**TINY_FIT, "backbone": "pretrained_core", "weights": str(other), "backbone_kwargs": {}})
    x = toy_images(10)
    with pytest.raises(DataError, match="x.pt"):
        fit_surrogate(cfg, (x, torch.rand(10, 2)), (x, torch.rand(10, 2)), site_ids=["a", "b"])


def test_fit_core_rejects_torchvision():
    with pytest.raises(ConfigError, match="small_cnn"):
        fit_core(sessions(), from_dict(FitConfig, {"backbone": "alexnet", "weights": "x.pth"}))


def test_fit_core_time_limit_stops_before_an_epoch_that_would_overrun():
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 6, "patience": 50})
    _, rep = fit_core(sessions(), cfg, seed=0, names=["a", "b"], max_seconds=0.0)
    assert rep["stopped_by_time_limit"] is True and rep["epochs_run"] == 1
    _, rep = fit_core(sessions(), cfg, seed=0, names=["a", "b"], max_seconds=3600.0)
    assert rep["stopped_by_time_limit"] is False and rep["epochs_run"] == 6 and rep["schedule_epochs"] == 6


def test_fit_core_time_limit_shortens_the_cosine_schedule(monkeypatch):
    """With a clock where every epoch takes 10 s, a 35 s limit fits 3 of 8 epochs, and the
    cosine schedule is shortened so that the learning rate still reaches 0 at the end."""
    import synth.surrogate.fit as fit_mod

    clock = {"t": 0.0}
    lrs = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    def pearson_and_tick(*a, **k):  # each session's validation moves the clock 5 s: 10 s an epoch
        clock["t"] += 5.0
        return real_pearson(*a, **k)

    real_pearson = fit_mod.pearson_columns
    monkeypatch.setattr(fit_mod.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(fit_mod, "pearson_columns", pearson_and_tick)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 8, "patience": 50, "lr_schedule": "cosine"})
    _, rep = fit_core(sessions(), cfg, seed=0, names=["a", "b"], max_seconds=35.0)
    assert rep["stopped_by_time_limit"] is True
    assert rep["epochs_run"] == 3 and rep["schedule_epochs"] == 3
    assert lrs[0] == pytest.approx(cfg.lr)
    assert lrs[-1] < 0.05 * cfg.lr  # annealed by the end of the shortened schedule


def test_fit_core_time_limit_is_not_cut_for_good_by_one_slow_epoch(monkeypatch):
    """Epochs of 10 s with one 40 s spike (epoch 2): 12 epochs take 150 s and all fit a
    150 s limit; judging by the slowest epoch would have stopped after 4."""
    import synth.surrogate.fit as fit_mod

    durations = [10.0, 40.0] + [10.0] * 10
    clock = {"t": 0.0, "calls": 0}

    def pearson_and_tick(*a, **k):  # two sessions validated per epoch: half an epoch each
        clock["t"] += durations[clock["calls"] // 2] / 2
        clock["calls"] += 1
        return real_pearson(*a, **k)

    real_pearson = fit_mod.pearson_columns
    monkeypatch.setattr(fit_mod.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(fit_mod, "pearson_columns", pearson_and_tick)
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 12, "patience": 50, "lr_schedule": "cosine"})
    _, rep = fit_core(sessions(), cfg, seed=0, names=["a", "b"], max_seconds=150.0)
    assert rep["stopped_by_time_limit"] is False and rep["epochs_run"] == 12 and rep["schedule_epochs"] == 12


def test_plan_epochs_shrinks_for_a_slowdown_and_stops_before_overrunning():
    from synth.surrogate.fit import _plan_epochs

    assert _plan_epochs([10.0] * 3, 30.0, 100.0, 20, 20) == (10, False)  # 7 more at 10 s
    assert _plan_epochs([10.0] * 3 + [20.0] * 3, 90.0, 100.0, 20, 10) == (6, True)  # next would end at 110 s
    assert _plan_epochs([10.0, 30.0], 40.0, 1000.0, 20, 20) == (20, False)  # plenty of time


def test_fit_core_in_bf16_trains_a_float32_core_close_to_the_fp32_one(core, monkeypatch):
    """precision bf16 autocasts the training passes: the core learns as well as in fp32
    (same data, seed and epochs), and what is saved is float32 and loads as usual.
    ``auto`` picks bf16 on a CPU that computes it natively."""
    from synth import runtime

    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 8})
    c16, rep16 = fit_core(sessions(), cfg, seed=0, names=["a", "b"], precision="auto")
    _, rep32, _ = core
    assert rep16["precision"] == "bf16" and rep32["precision"] == "fp32"
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in c16["state_dict"].values() if v.is_floating_point())
    assert rep16["mean_val_median_r"] > np.mean(list(rep16["history"][0].values()))
    assert abs(rep16["mean_val_median_r"] - rep32["mean_val_median_r"]) < 0.1
    differs = [k for k, v in c16["state_dict"].items() if v.is_floating_point() and not torch.equal(v, core[0]["state_dict"][k])]
    assert differs  # the passes really ran in bf16
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        fit_core(sessions(), cfg, precision="fp16")


def test_l2_adversarial_step_has_length_eps_and_raises_the_loss():
    """One fast-gradient step: every image moves by eps (L2) where no pixel is clipped,
    the loss rises, the step follows the gradient, and images stay in [0, 1]."""
    torch.manual_seed(0)
    w = torch.randn(3 * 8 * 8, 4)
    model = lambda z: torch.nn.functional.softplus(z.flatten(1) @ w)  # noqa: E731
    x = 0.25 + 0.5 * torch.rand(6, 3, 8, 8)  # far from 0 and 1: no clipping at this eps
    y = torch.rand(6, 4) * 3
    mse = lambda p, t: ((p - t) ** 2).mean()  # noqa: E731
    xa = l2_adversarial(model, x, y, mse, 0.1)
    assert xa.shape == x.shape and not xa.requires_grad
    assert torch.allclose((xa - x).flatten(1).norm(dim=1), torch.full((6,), 0.1), atol=1e-5)
    assert mse(model(xa), y) > mse(model(x), y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mse(model(xg), y), xg)
    cos = torch.nn.functional.cosine_similarity((xa - x).flatten(1), g.flatten(1), dim=1)
    assert (cos > 0.999).all()
    big = l2_adversarial(model, x, y, mse, 50.0)
    assert big.min() >= 0.0 and big.max() <= 1.0
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        l2_adversarial(model, x[0], y, mse, 0.1)


def test_fit_core_adversarial_training_changes_the_core_and_still_learns(core):
    """adversarial_eps > 0 trains on perturbed images: another core than the clean one
    (same seed), which still learns (validation r above its first epoch's); recorded in
    the report."""
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 8})
    adv, rep = fit_core(sessions(), cfg, seed=0, names=["a", "b"], adversarial_eps=0.3)
    assert rep["adversarial_eps"] == 0.3 and core[1]["adversarial_eps"] == 0.0
    assert rep["mean_val_median_r"] > np.mean(list(rep["history"][0].values()))
    assert any(not torch.equal(v, core[0]["state_dict"][k]) for k, v in adv["state_dict"].items() if v.is_floating_point())
    with pytest.raises(ConfigError, match="adversarial_eps"):
        fit_core(sessions(), cfg, adversarial_eps=-0.1)
