"""Gradient alignment between surrogates and the sites' own differentiable models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _shared import REPO, cowley_root, requires_cowley
from synth.populations.alignment import gradient_alignment
from synth.synthesis.params import PARAMS

D = 1 * 8 * 8


class Linear(nn.Module):
    """images (N, 1, 8, 8) -> (N, S) = flattened images @ W.T: its input gradient is W[s]."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def _setup(seed: int = 0, n_sites: int = 4):
    g = torch.Generator().manual_seed(seed)
    w_model = torch.randn(n_sites, D, generator=g)
    w_site = torch.randn(n_sites, D, generator=g) + 0.8 * w_model  # partly aligned
    images = torch.rand(6, 1, 8, 8, generator=g) * 0.8 + 0.1
    return w_model, w_site, images


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def test_linear_models_give_the_known_cosines_in_both_spaces():
    w_model, w_site, images = _setup()
    param = PARAMS.build({"name": "pixel"}, key="p", channels=1, size=8)  # x = sigmoid(p): dx/dp = x (1 - x)
    out = gradient_alignment({"m": Linear(w_model)}, lambda s: Linear(w_site[s : s + 1]), images, sites=range(4), param=param)
    assert out.n_images == 6 and out.sites.tolist() == [0, 1, 2, 3]
    assert np.allclose(out.pixel["m"], _cos(w_model, w_site).numpy(), atol=1e-6)
    x = param(param.encode(images)).detach().flatten(1)  # the rendering the gradients are taken at
    jac = (x * (1 - x)).double()  # (N, D)
    want = [np.median(_cos(w_model[s] * jac, w_site[s] * jac).numpy()) for s in range(4)]
    assert np.allclose(out.param["m"], want, atol=1e-6)
    assert out.median("m") == pytest.approx(float(np.median(want)))
    assert out.median("m", "pixel") == pytest.approx(float(np.median(_cos(w_model, w_site).numpy())))
    # without a parameterization only pixel space is compared, at the images themselves
    plain = gradient_alignment({"m": Linear(w_model)}, lambda s: Linear(w_site[s : s + 1]), images, sites=[2])
    assert plain.param == {} and np.allclose(plain.pixel["m"], out.pixel["m"][2:3], atol=1e-6)
    with pytest.raises(KeyError, match="no param-space alignment"):
        plain.median("m")


def test_the_site_itself_aligns_perfectly_and_its_negative_opposite():
    w_model, _, images = _setup(1)
    param = PARAMS.build({"name": "fourier", "decay_power": 1.5}, key="p", channels=1, size=8)
    models = {"same": Linear(w_model), "negated": Linear(-w_model)}
    out = gradient_alignment(models, lambda s: Linear(w_model[s : s + 1]), images, sites=[0, 3], param=param, ensemble=None)
    for space in ("pixel", "param"):
        assert np.allclose(getattr(out, space)["same"], 1.0, atol=1e-6)
        assert np.allclose(getattr(out, space)["negated"], -1.0, atol=1e-6)
    assert set(out.param) == {"same", "negated"}  # ensemble=None: no mean entry


def test_ensemble_entry_is_the_mean_models_alignment():
    w_model, w_site, images = _setup(2)
    w_other = torch.randn(4, D, generator=torch.Generator().manual_seed(9))
    param = PARAMS.build({"name": "fourier", "decay_power": 2.0}, key="p", channels=1, size=8)
    ref = lambda s: Linear(w_site[s : s + 1])  # noqa: E731
    out = gradient_alignment({"a": Linear(w_model), "b": Linear(w_other)}, ref, images, sites=range(4), param=param)
    mean = gradient_alignment({"mean": Linear((w_model + w_other) / 2)}, ref, images, sites=range(4), param=param)
    for space in ("pixel", "param"):
        assert np.allclose(getattr(out, space)["ensemble"], getattr(mean, space)["mean"], atol=1e-6)
        # and it is not simply one member's figure
        assert not np.allclose(getattr(out, space)["ensemble"], getattr(out, space)["a"], atol=1e-3)


def test_models_and_flags_are_left_as_they_were():
    w_model, w_site, images = _setup(3)
    m = Linear(w_model).train()
    gradient_alignment({"m": m}, lambda s: Linear(w_site[s : s + 1]), images, sites=[0])
    assert m.training and m.w.requires_grad and m.w.grad is None


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"images": torch.rand(1, 8, 8)}, ValueError, "expected images of shape"),
        ({"images": torch.rand(0, 1, 8, 8)}, ValueError, "expected images of shape"),
        ({"sites": []}, ValueError, "no sites"),
        ({"sites": [4]}, ValueError, "out of range"),
        ({"models": {}}, ValueError, "no models"),
        ({"reference": lambda s: Linear(torch.randn(2, D))}, ValueError, "2 outputs per image, expected 1"),
    ],
)
def test_bad_input_is_refused(kwargs, error, needle):
    w_model, w_site, images = _setup()
    args = {"models": {"m": Linear(w_model)}, "reference": lambda s: Linear(w_site[s : s + 1]), "images": images, "sites": [0]}
    args.update(kwargs)
    with pytest.raises(error, match=needle):
        gradient_alignment(args.pop("models"), args.pop("reference"), args.pop("images"), **args)


def test_virtual_site_model_is_one_differentiable_column_of_the_population():
    from synth.populations.virtual import build_virtual_target

    pop = build_virtual_target(n_v4=3, n_it=1, n_images=20)
    rec = pop.recorder()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    col = rec.site_model(2)
    with torch.no_grad():
        assert torch.allclose(col(x)[:, 0], rec.expected(x)[:, 2], atol=1e-5)
    xg = x.clone().requires_grad_(True)
    col(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    pop.model(xr)[:, 2].sum().backward()
    assert xg.grad.abs().sum() > 0 and torch.allclose(xg.grad, xr.grad)
    with pytest.raises(IndexError, match="out of range for 4 sites"):
        rec.site_model(4)


@requires_cowley
def test_bench_gradients_on_real_twins(tmp_path, capsys):
    """A run folder of session 190923 (a small untrained surrogate): the CLI compares it with the twins."""
    from synth.cli import main
    from synth.config import dump_config, load_config
    from synth.pipeline import load_natural, load_target
    from synth.surrogate.backbones import build_backbone
    from synth.surrogate.model import Surrogate
    from synth.surrogate.readouts import build_readout

    cfg = load_config(REPO / "configs" / "cowley2023_closed_loop.yaml",
                      [f"target.root={cowley_root()}", "target.session=190923", "fit.ensemble=[]", "device=cpu"])
    target = load_target(cfg, str(REPO / "configs"))
    bb = build_backbone("small_cnn", in_channels=3, input_size=0, kwargs={"channels": 4, "n_layers": 2, "first_kernel": 5}, seed=0)
    ro = build_readout({"name": "factorized"}, in_shape=bb.out_shape(112, 3), n_sites=len(target.site_ids), seed=0)
    with torch.no_grad():
        ro.weight.normal_(generator=torch.Generator().manual_seed(0))
    model = Surrogate(bb, ro, site_ids=list(target.site_ids), image_size=112, in_channels=3).freeze()
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.resolved.yaml")
    model.save(run / "surrogate.pt")
    code = main(["bench", "gradients", str(run), "--images", "3", "--sites", "2", "-q"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0].startswith("cowley2023: 2 of 33 sites, 3 held-out test images") and "fourier" in out[0]
    nat, splits = load_natural(cfg, target)
    param = PARAMS.build(cfg.synthesis.param, key="p", channels=3, size=112)
    want = gradient_alignment({"s": Surrogate.load(run / "surrogate.pt")}, target.recorder().site_model,
                              nat.images[splits.test[:3]], sites=[0, 1], param=param)
    assert out[1] == (f"surrogate.pt: median over sites of the median cosine: pixel {want.median('s', 'pixel'):.3f}, "
                      f"parameter {want.median('s'):.3f}")
    assert out[-1] == f"gradient_alignment: {want.median('s'):.3f}"
    assert all(-1 <= v <= 1 for v in (*want.pixel["s"], *want.param["s"]))
