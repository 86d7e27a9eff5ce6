import dataclasses

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


def test_fit_core_takes_a_readout_per_session():
    """A session named in ``readouts`` gets that builder's readout (seeded like the others);
    a name that is not a session is refused."""
    from synth.surrogate.readouts import CellReadout

    built = []

    def cells(in_shape, n_sites):
        built.append((in_shape, n_sites))
        return CellReadout(in_shape, torch.arange(n_sites) % 4, 2)

    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 1})
    _, rep = fit_core(sessions(), cfg, seed=0, names=["a", "b"], readouts={"b": cells})
    assert len(built) == 1 and built[0][1] == 7 and set(rep["val_median_r"]) == {"a", "b"}
    with pytest.raises(ValueError, match=r"readouts for unknown sessions \['c'\]"):
        fit_core(sessions(), cfg, seed=0, names=["a", "b"], readouts={"c": cells})


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


def test_spectral_view_is_the_fourier_params_gradient_space():
    """The cosine of two spectral views equals the cosine of the same gradients pulled back
    into the ``fourier`` parameterization (clamp output, no colour mixing), whatever the decay."""
    from synth.surrogate.fit import spectral_view
    from synth.synthesis.params import fourier

    g1, g2 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    for decay in (0.0, 1.0, 2.5):
        param = fourier(decay_power=decay, output="clamp", decorrelate=False, channels=3, size=16)
        p = torch.zeros(1, *param.param_shape, requires_grad=True)
        pulled = [torch.autograd.grad((param(p) * g).sum(), p)[0].flatten() for g in (g1, g2)]
        v1, v2 = (spectral_view(g[None], decay).flatten() for g in (g1, g2))
        cos_p = torch.nn.functional.cosine_similarity(pulled[0], pulled[1], dim=0)
        cos_v = torch.nn.functional.cosine_similarity(v1, v2, dim=0)
        assert abs(float(cos_p) - float(cos_v)) < 0.05, decay
    assert torch.allclose(spectral_view(g1[None], 0.0), g1[None], atol=1e-5)  # no decay: the pixels themselves
    with pytest.raises(ValueError, match="square"):
        spectral_view(torch.zeros(1, 3, 8, 9), 2.0)


def _linear_model(w):
    return lambda x: x.flatten(1) @ w.flatten(1).T


def test_jacobian_loss_known_answers():
    """A linear model's input gradient for site j is its weight map j: the loss is 0 against
    its own (viewed) weights, 2 against their negatives, and the gradient of the loss reaches
    the model's parameters (it can train)."""
    from synth.surrogate.fit import JacobianTargets, jacobian_loss, spectral_view

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 1, 8, 8, generator=gen, requires_grad=True)
    x = torch.rand(6, 1, 8, 8, generator=gen)
    sites = torch.tensor([0, 1, 2, 2, 1, 0])
    own = spectral_view(w.detach()[sites], 2.0)
    idx = torch.arange(6)
    pred, loss = jacobian_loss(_linear_model(w), x, JacobianTargets(sites=sites, grads=own, weight=1.0, decay_power=2.0), idx)
    assert pred.shape == (6, 3) and abs(float(loss.detach())) < 1e-5
    _, loss = jacobian_loss(_linear_model(w), x, JacobianTargets(sites=sites, grads=-own, weight=1.0, decay_power=2.0), idx)
    assert abs(float(loss.detach()) - 2.0) < 1e-5
    other = spectral_view(torch.randn(6, 1, 8, 8, generator=gen), 2.0)
    _, loss = jacobian_loss(_linear_model(w), x[:3], JacobianTargets(sites=sites, grads=other, weight=1.0, decay_power=2.0), idx[:3])
    (gw,) = torch.autograd.grad(loss, w)
    assert float(gw.abs().sum()) > 0
    with pytest.raises(DataError, match="sites"):
        JacobianTargets(sites=sites[:2], grads=own, weight=1.0, decay_power=2.0)
    with pytest.raises(ConfigError, match="distill_jacobian"):
        JacobianTargets(sites=sites, grads=own, weight=-1.0, decay_power=2.0)


def test_fit_core_jacobian_matching_aligns_the_gradients_with_the_teachers():
    """With Jacobian targets taken from the generating model, the core's gradients on that
    session turn towards them over the epochs (the report's per-epoch cosine rises well
    above where it starts), and the cosine is not computed at weight 0."""
    from synth.surrogate.fit import JacobianTargets, spectral_view

    gen = torch.Generator().manual_seed(2)
    x = toy_images(160, seed=3)
    w = spectral_view(torch.randn(2, *x.shape[1:], generator=gen), 1.0)
    a = x.flatten(1) @ w.flatten(1).T * 0.05
    y = torch.nn.functional.softplus(a) + 0.1
    sites = torch.randint(0, 2, (x.shape[0],), generator=gen)
    g = torch.sigmoid(a)[torch.arange(x.shape[0]), sites].view(-1, 1, 1, 1) * w[sites]
    targets = JacobianTargets(sites=sites, grads=spectral_view(g, 2.5), weight=5.0, decay_power=2.5)
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 6})
    _, rep = fit_core([(x, y)] + sessions()[:1], cfg, seed=0, names=["t", "a"], jacobians={"t": targets})
    cos = rep["jacobian_cosine"]
    assert len(cos) == rep["epochs_run"] and cos[-1] > cos[0] + 0.1 and cos[-1] > 0.5
    _, rep0 = fit_core([(x, y)], cfg, seed=0, names=["t"], jacobians={"t": dataclasses.replace(targets, weight=0.0)})
    assert rep0["jacobian_cosine"] == []
    # from a later epoch: plain epochs first (the same as without targets), then matching
    late, rep_late = fit_core([(x, y)], cfg, seed=0, names=["t"], jacobians={"t": targets}, jacobian_from_epoch=5)
    plain, rep_plain = fit_core([(x, y)], cfg, seed=0, names=["t"])
    assert len(rep_late["jacobian_cosine"]) == 2 and rep_late["history"][:4] == rep_plain["history"][:4]
    assert any(not torch.equal(v, plain["state_dict"][k]) for k, v in late["state_dict"].items() if v.is_floating_point())
    with pytest.raises(DataError, match="unknown session 'u'"):
        fit_core([(x, y)], cfg, names=["t"], jacobians={"u": targets})
    with pytest.raises(DataError, match="shape"):
        fit_core([(x, y)], cfg, names=["t"], jacobians={"t": dataclasses.replace(targets, grads=targets.grads[:, :, :8])})


def test_fit_core_keeps_a_matched_epoch_when_matching_starts_late():
    """With Jacobian matching from a later epoch, the kept core is one of the matched epochs,
    even when the matching (here towards random gradients, at a large weight) costs
    validation r that the plain epochs had: a plain core is not what was asked for."""
    from synth.surrogate.fit import JacobianTargets, spectral_view

    gen = torch.Generator().manual_seed(4)
    x = toy_images(160, seed=3)
    w = spectral_view(torch.randn(2, *x.shape[1:], generator=gen), 1.0)
    y = torch.nn.functional.softplus(x.flatten(1) @ w.flatten(1).T * 0.05) + 0.1
    sites = torch.randint(0, 2, (x.shape[0],), generator=gen)
    wrong = JacobianTargets(sites=sites, grads=spectral_view(torch.randn(x.shape, generator=gen), 2.5), weight=50.0, decay_power=2.5)
    cfg = from_dict(FitConfig, {**TINY_FIT, "epochs": 6})
    _, plain = fit_core([(x, y)], cfg, seed=0, names=["t"])
    _, late = fit_core([(x, y)], cfg, seed=0, names=["t"], jacobians={"t": wrong}, jacobian_from_epoch=4)
    assert late["history"][:3] == plain["history"][:3]  # the plain epochs before matching ran alike
    assert max(h["t"] for h in late["history"][3:]) < max(h["t"] for h in plain["history"][:3])  # matching cost val r
    assert late["best_epoch"] >= 4, (late["best_epoch"], late["history"])
