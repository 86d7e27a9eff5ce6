"""The ``cowley_twins`` backbone: other sessions' digital twins as frozen features.

Uses random compact-model files in the Cowley 2023 layout (a temporary folder); the
check on the real twins skips where the licensed data are absent.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _shared import cowley_root, random_twin_state, requires_cowley
from synth.configtools import from_dict
from synth.data import cowley
from synth.errors import ConfigError, DataError
from synth.pipeline import resolve_twin_backbone
from synth.populations import twins
from synth.surrogate.backbones import build_backbone
from synth.surrogate.fit import FitConfig, fit_surrogate
from synth.surrogate.model import Surrogate
from synth.surrogate.readouts import build_readout
from synth.surrogate.twin_backbone import TwinFeatures, parse_twin_layers, twin_shares

COUNTS = [3, 2, 2, 3, 4]  # channels of layers 0-4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Twins for sessions s1 (2 neurons) and s2 (1 neuron); no recordings needed here."""
    r = tmp_path_factory.mktemp("twinroot")
    (r / cowley.MODELS_DIR).mkdir(parents=True)
    for s, n in (("s1", 2), ("s2", 1)):
        for k in range(n):
            torch.save(random_twin_state(COUNTS, 10 * len(s) + k + ord(s[1]), unit_bn=True), r / cowley.MODELS_DIR / f"compact_model_{s}_neuron{k}.pt")
    return r


def _backbone(root: Path, sessions=("s1",), layer="out"):
    return build_backbone("cowley_twins", weights="none", layer=layer, in_channels=3, kwargs={"root": str(root), "sessions": list(sessions)})


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,layers", [("out", (2, 3, 4)), (None, (2, 3, 4)), ("layer3", (3,)), ("layers3-4", (3, 4)), ("layers2-4", (2, 3, 4))])
def test_layer_names(name, layers):
    assert parse_twin_layers(name) == layers


@pytest.mark.parametrize("name", ["layer1", "layers4-2", "layers1-4", "conv3", "layer5"])
def test_unknown_layer_names_the_valid_ones(name):
    with pytest.raises(ConfigError, match=f"unknown layer '{name}' for backbone cowley_twins; expected out, layer2"):
        parse_twin_layers(name)


def test_features_are_the_twins_own_hidden_layers(root):
    """Channels in twin order, layers 2-4 each; the last layer, read out by the twin's own
    weights, gives back the twin's response (so these are the twins' real activations)."""
    bb = _backbone(root).eval()
    x = _images(3)
    ens = twins.load_twins(root, "s1")
    with torch.no_grad():
        f = bb(x)
        rec = ens(x)
    per_twin = sum(COUNTS[i] for i in (2, 3, 4))
    assert f.shape == (3, 2 * per_twin, 28, 28)
    assert rec.abs().min() > 0  # responses the check can tell apart
    for t, twin in enumerate(ens.twins):
        last = f[:, t * per_twin + COUNTS[2] + COUNTS[3] : (t + 1) * per_twin]
        out = (last * twin.beta).sum(dim=(1, 2, 3)) + twin.beta_b
        torch.testing.assert_close(out, rec[:, t], rtol=1e-4, atol=1e-4)


def test_one_layer_and_grayscale_input(root):
    bb = _backbone(root, sessions=("s1", "s2"), layer="layer3").eval()
    with torch.no_grad():
        f_rgb = bb(_images(2).mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
        f_gray = bb(_images(2).mean(dim=1, keepdim=True))
    assert f_rgb.shape == (2, 3 * COUNTS[3], 28, 28)
    torch.testing.assert_close(f_gray, f_rgb)


def test_gradients_reach_the_image(root):
    bb = _backbone(root).eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    x = _images(2).requires_grad_(True)
    bb(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_feature_scale_standardizes_and_is_the_only_saved_state(root, tmp_path):
    bb = _backbone(root).eval()
    x = _images(6)
    with torch.no_grad():
        f = bb(x)
        sd = bb.body.fit_feature_scale(f)
        g = bb(x)
    torch.testing.assert_close(g, f / sd.view(1, -1, 1, 1))
    np.testing.assert_allclose(g.std(dim=(0, 2, 3)).numpy(), (f.std(dim=(0, 2, 3)) / sd).numpy(), rtol=1e-4)
    live = f.std(dim=(0, 2, 3)) > 0.1
    assert live.any() and float((g.std(dim=(0, 2, 3))[live] - 1).abs().max()) < 0.01  # unit std where the floor is negligible
    assert list(bb.state_dict()) == ["body.feature_scale"]  # the twins' weights are never copied into a checkpoint


def test_fitted_surrogate_round_trips_with_its_scale(root, tmp_path):
    x, y = _images(12, 1), torch.rand(12, 2) + 0.1
    cfg = from_dict(FitConfig, {"backbone": "cowley_twins", "backbone_kwargs": {"root": str(root), "sessions": ["s1"]}, "epochs": 2, "batch_size": 4})
    model, rep = fit_surrogate(cfg, (x[:8], y[:8]), (x[8:], y[8:]), site_ids=["a", "b"], seed=0)
    scale = model.backbone.body.feature_scale
    assert not torch.allclose(scale, torch.ones_like(scale))  # set from the training features
    assert rep["feature_shape"] == {"out": [2 * sum(COUNTS[2:]), 28, 28]}
    path = tmp_path / "s.pt"
    model.save(path)
    back = Surrogate.load(path)
    torch.testing.assert_close(back.backbone.body.feature_scale, scale)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    assert not any(k.startswith("backbone.body.twins") for k in torch.load(path, weights_only=True)["state_dict"])


def test_config_rules():
    fc = from_dict(FitConfig, {"backbone": "cowley_twins", "backbone_kwargs": {"root": "auto", "sessions": "auto"}})
    assert not fc.trains_backbone  # weights none is fine: the twins' files are the weights
    with pytest.raises(ConfigError, match="train_backbone"):
        from_dict(FitConfig, {"backbone": "cowley_twins", "train_backbone": True})
    with pytest.raises(ConfigError, match="layers: unknown layer 'conv3' for backbone cowley_twins"):
        from_dict(FitConfig, {"backbone": "cowley_twins", "layers": ["layers2-4", "conv3"]})  # at load, before any run folder
    with pytest.raises(ConfigError, match="unknown argument 'session'"):
        from_dict(FitConfig, {"backbone": "cowley_twins", "backbone_kwargs": {"session": ["a"]}})


def test_builder_errors_are_one_line(root):
    with pytest.raises(ConfigError, match="needs backbone_kwargs root"):
        build_backbone("cowley_twins", weights="none", kwargs={"root": "auto", "sessions": "auto"})
    with pytest.raises(ConfigError, match="expected weights: none"):
        build_backbone("cowley_twins", weights="x.pt", kwargs={"root": str(root), "sessions": ["s1"]})
    with pytest.raises(DataError, match="no digital twins of session zz .sessions with twins: s1, s2"):
        build_backbone("cowley_twins", weights="none", kwargs={"root": str(root), "sessions": ["zz"]})


def test_run_fills_auto_and_never_uses_the_evaluated_sessions_twins(root):
    fc = from_dict(FitConfig, {"backbone": "cowley_twins", "backbone_kwargs": {"root": "auto", "sessions": "auto"}})
    target = SimpleNamespace(name="cowley2023", root=str(root), session="s1")
    got = resolve_twin_backbone(fc, target)
    assert got.backbone_kwargs == {"root": str(root.resolve()), "sessions": ["s2"]}
    assert resolve_twin_backbone(fc, SimpleNamespace(name="cowley2023", root=str(root), session="s9")).backbone_kwargs["sessions"] == ["s1", "s2"]
    listed = from_dict(FitConfig, {"backbone": "cowley_twins", "backbone_kwargs": {"root": "auto", "sessions": ["s2", "s1"]}})
    with pytest.raises(ConfigError, match="fit.backbone_kwargs.sessions: session s1's own twins are its follow-up recorder"):
        resolve_twin_backbone(listed, target)
    with pytest.raises(ConfigError, match="fit.backbone_kwargs.root: root auto takes the data root of a cowley2023 target; target virtual_v4 has none"):
        resolve_twin_backbone(fc, SimpleNamespace(name="virtual_v4"))
    only = from_dict(FitConfig, {"backbone": "cowley_twins", "backbone_kwargs": {"root": str(root), "sessions": ["s1"]}})
    with pytest.raises(ConfigError, match="follow-up recorder"):
        resolve_twin_backbone(only, target)
    other = from_dict(FitConfig, {})
    assert resolve_twin_backbone(other, target) is other


def test_twins_keeps_the_listed_twins_channels_and_records_them(root):
    full = _backbone(root, sessions=("s1", "s2")).eval()
    some = build_backbone("cowley_twins", weights="none", in_channels=3, kwargs={"root": str(root), "sessions": ["s1", "s2"], "twins": ["s2_n000", "s1_n000"]}).eval()
    assert full.body.ids == ("s1_n000", "s1_n001", "s2_n000")
    assert some.body.ids == ("s1_n000", "s2_n000")  # in the data's order, not the list's
    per_twin = sum(COUNTS[i] for i in (2, 3, 4))
    assert full.body.channel_ranges == ((0, per_twin), (per_twin, 2 * per_twin), (2 * per_twin, 3 * per_twin))
    x = _images(2)
    with torch.no_grad():
        f, g = full(x), some(x)
    torch.testing.assert_close(g, torch.cat([f[:, :per_twin], f[:, 2 * per_twin :]], dim=1))
    assert some.build_spec["kwargs"]["twins"] == ["s1_n000", "s2_n000"]
    assert "twins" not in full.build_spec["kwargs"]
    with pytest.raises(ConfigError, match="backbone_kwargs.twins: twin s2_n001 is not a twin of session.s. s1, s2 under .* .expected ids such as s1_n000"):
        build_backbone("cowley_twins", weights="none", kwargs={"root": str(root), "sessions": ["s1", "s2"], "twins": ["s2_n001"]})
    with pytest.raises(ConfigError, match="expected a list of twin ids"):
        build_backbone("cowley_twins", weights="none", kwargs={"root": str(root), "sessions": ["s1"], "twins": "s1_n000"})


def test_twin_shares_follow_the_readout_weights():
    """Weights on the second twin's channels only: it carries the whole drive; spread
    evenly over equal, independent channels: equal shares."""
    ranges = ((0, 3), (3, 5), (5, 9))
    f = torch.randn(40, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    ro = build_readout({"name": "factorized"}, in_shape=(9, 4, 4), n_sites=2, seed=0)
    with torch.no_grad():
        ro.weight.zero_()
        ro.weight[:, 3:5] = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    np.testing.assert_allclose(twin_shares(ro, f, ranges), [0.0, 1.0, 0.0], atol=1e-6)
    with torch.no_grad():
        ro.weight.fill_(1.0)
        ro.mask.fill_(1.0)
    got = twin_shares(ro, f, ranges)
    assert got.sum() == pytest.approx(1.0) and got[2] > got[0] > got[1]  # more channels, more drive
    np.testing.assert_allclose(got, np.array([3, 2, 4]) / 9, atol=0.08)
    with pytest.raises(ValueError, match="factorized readout"):
        twin_shares(build_readout({"name": "gaussian"}, in_shape=(9, 4, 4), n_sites=2, seed=0), f, ranges)
    with pytest.raises(ValueError, match="cover the 9 channels"):
        twin_shares(ro, f, ranges[:2])


def test_max_twins_keeps_the_twin_that_drives_the_sites_and_round_trips(tmp_path):
    """Session s1 with three twins, two of them blind (first-layer weights 0: features that
    do not depend on the image): their channels carry no drive, so max_twins 1 keeps the
    seeing twin s1_n001, refits on its channels alone, and the saved surrogate rebuilds
    with that twin only."""
    root = tmp_path / "root"
    (root / cowley.MODELS_DIR).mkdir(parents=True)
    for k in range(3):
        state = random_twin_state(COUNTS, 40 + k, unit_bn=True)
        if k != 1:
            state["layers.layer0_conv.weight"] = torch.zeros_like(state["layers.layer0_conv.weight"])
        torch.save(state, root / cowley.MODELS_DIR / f"compact_model_s1_neuron{k}.pt")
    x = _images(48, 3)
    bb = _backbone(root).eval()
    a, b = bb.body.channel_ranges[1]
    with torch.no_grad():
        own = bb(x)[:, a:b].mean(dim=(2, 3))  # (N, channels of s1_n001)
    w = torch.randn(b - a, 2, generator=torch.Generator().manual_seed(2))
    drive = own @ w
    y = ((drive - drive.min(dim=0).values) / drive.std(dim=0) + 0.2).float()
    base = {"backbone": "cowley_twins", "backbone_kwargs": {"root": str(root), "sessions": ["s1"]}, "epochs": 20, "batch_size": 16, "loss": "mse"}
    plain, rep_all = fit_surrogate(from_dict(FitConfig, base), (x[:36], y[:36]), (x[36:], y[36:]), site_ids=["a", "b"], seed=0)
    plain_scale = plain.backbone.body.feature_scale
    cfg = from_dict(FitConfig, {**base, "max_twins": 1})
    model, rep = fit_surrogate(cfg, (x[:36], y[:36]), (x[36:], y[36:]), site_ids=["a", "b"], seed=0)
    notes = rep["max_twins"]
    assert notes["twins"] == ["s1_n001"] and notes["twins_of"] == 3 and notes["channels"] == sum(COUNTS[2:])
    assert notes["twins_share"] > 0.99  # the blind twins' channels do not vary: no drive
    assert model.backbone.body.ids == ("s1_n001",)
    assert rep["feature_shape"] == {"out": [sum(COUNTS[2:]), 28, 28]}
    torch.testing.assert_close(model.backbone.body.feature_scale, plain_scale[a:b])  # the first fit's scales of the kept channels
    path = tmp_path / "pruned.pt"
    model.save(path)
    back = Surrogate.load(path)
    assert back.backbone.body.ids == ("s1_n001",)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    assert "max_twins" not in rep_all and plain.backbone.body.ids == ("s1_n000", "s1_n001", "s1_n002")
    assert rep_all["val_median_r"] == pytest.approx(notes["val_median_r_all_twins"], abs=1e-4)  # the same first fit


def test_max_twins_needs_the_twin_backbone_and_a_factorized_readout():
    with pytest.raises(ConfigError, match="max_twins: max_twins ranks the twins of backbone cowley_twins by a factorized readout's weights; got backbone small_cnn"):
        from_dict(FitConfig, {"max_twins": 4})
    with pytest.raises(ConfigError, match="readout gaussian"):
        from_dict(FitConfig, {"backbone": "cowley_twins", "readout": "gaussian", "max_twins": 4})
    assert from_dict(FitConfig, {"backbone": "cowley_twins", "max_twins": 4}).max_twins == 4


def test_twin_features_need_twins():
    with pytest.raises(ValueError, match="at least one twin"):
        TwinFeatures([], (2, 3, 4))
    with pytest.raises(ValueError, match="block must be >= 1 image, got 0"):
        TwinFeatures([random_twin_state(COUNTS, 0, unit_bn=True)], (2, 3, 4), block=0)


def test_blocks_give_the_whole_batch_features_and_gradients(root, monkeypatch):
    """On a CPU the twins see small blocks of images (speed); the features and the image
    gradients are those of the whole batch at once, the last, shorter block included."""
    bb = _backbone(root).eval()
    body = bb.body
    assert isinstance(body, TwinFeatures) and body.block is None  # the CPU default, CPU_BLOCK
    x = _images(5, seed=3)
    out = {}
    for block in (5, 2):
        body.block = block
        seen = []
        real = TwinFeatures._features
        monkeypatch.setattr(TwinFeatures, "_features", lambda self, xb: seen.append(xb.shape[0]) or real(self, xb))
        xi = x.clone().requires_grad_(True)
        f = bb(xi)
        (f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum().backward()
        out[block] = (f.detach(), xi.grad)
        monkeypatch.setattr(TwinFeatures, "_features", real)
        assert seen == ([5] if block == 5 else [2, 2, 1])
    torch.testing.assert_close(out[2][0], out[5][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2][1], out[5][1], rtol=1e-4, atol=1e-6)


@requires_cowley
def test_real_twins_features_reproduce_their_responses():
    """On the real files: 190923's first twin, read out by its own weights from the backbone's layer 4."""
    root = cowley_root()
    bb = build_backbone("cowley_twins", weights="none", layer="layer4", in_channels=3, kwargs={"root": str(root), "sessions": ["190923"]}).eval()
    first = twins.load_twins(root, "190923", neurons=[min(cowley.twin_files(root, "190923"))])
    x = _images(2, 3)
    with torch.no_grad():
        f = bb(x)
        c4 = first.twins[0].beta.shape[0]
        out = (f[:, :c4] * first.twins[0].beta).sum(dim=(1, 2, 3)) + first.twins[0].beta_b
        torch.testing.assert_close(out, first(x)[:, 0], rtol=1e-3, atol=1e-3)
    assert f.shape[1] == sum(twins.channel_counts(twins.read_twin_state(p))[4] for p in cowley.twin_files(root, "190923").values())
