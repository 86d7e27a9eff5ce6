"""The core stage (``fit.weights: auto``): session exclusion, twin exclusion, cache reuse, config.

Most tests use a tiny data root in the layout of the Cowley 2023 release, built in a
temporary folder (3 sessions of 24 random images, random compact-model "twins" for two of
them), so that a whole core training takes a second; the checks on the real shared data
skip with a stated reason where it is absent.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from _shared import cowley_root, random_twin_state, requires_cowley
from synth.configtools import from_dict
from synth.data import cowley
from synth.data.sessions import CowleySessions
from synth.errors import ConfigError, DataError
from synth.populations import twins
from synth.surrogate import core as core_mod
from synth.surrogate.core import CoreConfig, core_summary, ensure_core, plan_core
from synth.surrogate.fit import FitConfig

N_IMAGES = 24
SITES = {"a1": 2, "b2": 3, "c3": 2}
WITH_TWINS = ("a1", "c3")
TINY_CORE = {
    "backbone_kwargs": {"channels": 4, "n_layers": 2, "first_kernel": 5},
    "input_size": 16,
    "epochs": 1,
    "batch_size": 8,
    "val_fraction": 0.25,
    "distill_images": 10,
}


def _jpeg(rng: np.random.Generator) -> bytes:
    a = rng.integers(0, 256, size=(14, 14, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).resize((112, 112), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _twin_state(seed: int) -> dict[str, torch.Tensor]:
    return random_twin_state([2, 2, 2, 2, 2], seed, unit_bn=True)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A data root with sessions a1, b2, c3 (twins for a1 and c3)."""
    root = tmp_path_factory.mktemp("cowley") / "root"
    (root / cowley.IMAGES_DIR).mkdir(parents=True)
    (root / cowley.AVERAGED_DIR).mkdir(parents=True)
    (root / cowley.MODELS_DIR).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s, n_sites in SITES.items():
        with zipfile.ZipFile(cowley.images_path(root, s), "w") as zf:
            for k in range(N_IMAGES):
                zf.writestr(f"image{k + 1:04d}.jpg", _jpeg(rng))
        np.save(cowley.averaged_path(root, s), rng.gamma(2.0, 2.0, size=(n_sites, N_IMAGES)))
        if s in WITH_TWINS:
            for k in range(n_sites):
                torch.save(_twin_state(100 * len(s) + k + ord(s[0])), root / cowley.MODELS_DIR / f"compact_model_{s}_neuron{k}.pt")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(d))
    return d


def _cc(**kw) -> CoreConfig:
    return from_dict(CoreConfig, {**TINY_CORE, **kw})


# --------------------------------------------------------------------------- config


def test_fit_config_core_keys_validated():
    fc = from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "core": {"epochs": 3, "distill_twins": ["x"]}})
    assert fc.core.epochs == 3 and fc.core.distill_twins == ("x",)
    with pytest.raises(ConfigError, match="needs backbone pretrained_core"):
        from_dict(FitConfig, {"backbone": "small_cnn", "weights": "auto"})
    with pytest.raises(ConfigError, match="only with backbone: pretrained_core and weights: auto"):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "/tmp/x.pt", "core": {}})
    with pytest.raises(ConfigError, match="core.epochs"):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "core": {"epochs": 0}})
    with pytest.raises(ConfigError, match="distill_twins"):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "core": {"distill_twins": "all"}})
    with pytest.raises(ConfigError, match="unknown key 'sesions'"):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "core": {"sesions": ["a"]}})
    with pytest.raises(ConfigError, match="backbone_kwargs"):
        from_dict(CoreConfig, {"backbone_kwargs": {"n_layerz": 3}})


def test_closed_loop_config_loads():
    from synth.config import load_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "cowley2023_closed_loop.yaml", ["target.session=190923"])
    assert cfg.fit.weights == "auto" and cfg.fit.backbone == "pretrained_core"
    assert cfg.target.session == "190923" and cfg.target.root.endswith("cowley2023_v4")
    assert abs(cfg.fit.split.test - 0.5) < 1e-9  # the readout is fitted on one half, tested on the other
    with pytest.raises(ConfigError, match="fit.core"):
        load_config(repo / "configs" / "cowley2023_closed_loop.yaml", ["fit.weights=/tmp/core.pt"])


def test_auto_weights_need_a_real_data_target():
    from types import SimpleNamespace

    from synth.config import Config
    from synth.pipeline import plan_core_stage

    cfg = from_dict(Config, {"fit": {"backbone": "pretrained_core", "weights": "auto"}})
    with pytest.raises(ConfigError, match="other recording sessions under the target.s data root; target virtual_v4 has none"):
        plan_core_stage(cfg, SimpleNamespace(name="virtual_v4"))
    assert plan_core_stage(from_dict(Config, {}), SimpleNamespace(name="virtual_v4")) is None


# --------------------------------------------------------------------------- planning


def test_plan_excludes_evaluated_session_and_its_twins(fake_root, cache):
    plan = plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=1)
    assert plan.sessions == ("a1", "b2")
    assert plan.teachers == ("a1",)  # c3 has twins too, but c3 is evaluated
    assert not any(k.startswith("c3/") for k in plan.checksums)
    assert str(plan.path).startswith(str(cache))
    plan2 = plan_core(_cc(distill_twins="auto", exclude=["b2"]), root=fake_root, evaluated="a1", grayscale=False, seed=1)
    assert plan2.sessions == ("c3",) and plan2.teachers == ("c3",)


def test_plan_rejects_evaluated_session_or_twins(fake_root, cache):
    with pytest.raises(ConfigError, match="evaluated session c3"):
        plan_core(_cc(sessions=["a1", "c3"]), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    with pytest.raises(ConfigError, match="its own twins"):
        plan_core(_cc(distill_twins=["c3"]), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    with pytest.raises(ConfigError, match="no digital twins"):
        plan_core(_cc(distill_twins=["b2"]), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    with pytest.raises(ConfigError, match="no session 'zz'"):
        plan_core(_cc(sessions=["zz"]), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    with pytest.raises(ConfigError, match="no session left"):
        plan_core(_cc(exclude=["a1", "b2"]), root=fake_root, evaluated="c3", grayscale=False, seed=0)


def test_cache_key_tracks_config_seed_mode_and_data(fake_root, cache):
    base = plan_core(_cc(), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    same = plan_core(_cc(max_minutes=5.0), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    assert same.key == base.key  # a time limit does not change what is trained
    # without teachers the distillation image count changes nothing either; with them it does
    assert plan_core(_cc(distill_images=7), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == base.key
    with_t = plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    assert with_t.teachers and with_t.key != base.key
    assert plan_core(_cc(distill_twins="auto", distill_images=7), root=fake_root, evaluated="c3", grayscale=False, seed=0).key != with_t.key
    # noise images: no change without teachers or at 0 (older cores keep their keys), a new core otherwise
    assert plan_core(_cc(distill_noise_images=5), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == base.key
    assert plan_core(_cc(distill_twins="auto", distill_noise_images=0), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == with_t.key
    assert plan_core(_cc(distill_twins="auto", distill_noise_images=5), root=fake_root, evaluated="c3", grayscale=False, seed=0).key != with_t.key
    assert plan_core(_cc(distill_synth_images=5), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == base.key
    assert plan_core(_cc(distill_twins="auto", distill_synth_images=0, distill_synth_steps=9), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == with_t.key
    synth = plan_core(_cc(distill_twins="auto", distill_synth_images=5), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    assert synth.key not in (with_t.key, plan_core(_cc(distill_twins="auto", distill_synth_images=5, distill_synth_steps=9), root=fake_root, evaluated="c3", grayscale=False, seed=0).key)
    # the teachers' synthesis recipe is part of the key of cores that use it, and only of those
    recipe = {**core_mod.TEACHER_SYNTHESIS, "priors": [{"name": "tv", "weight": 1.0}]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core_mod, "TEACHER_SYNTHESIS", recipe)
        assert plan_core(_cc(distill_twins="auto", distill_synth_images=5), root=fake_root, evaluated="c3", grayscale=False, seed=0).key != synth.key
        assert plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == with_t.key
    # adversarial training: off keeps the keys of cores trained before the option, on is a new core
    assert plan_core(_cc(adversarial_eps=0.0), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == base.key
    assert plan_core(_cc(adversarial_eps=0.5), root=fake_root, evaluated="c3", grayscale=False, seed=0).key != base.key
    # Jacobian matching: likewise (and nothing without teachers)
    assert plan_core(_cc(distill_jacobian=1.0, distill_jacobian_decay=1.0), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == base.key
    assert plan_core(_cc(distill_twins="auto", distill_jacobian=0.0, distill_jacobian_decay=1.0), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == with_t.key
    jac = plan_core(_cc(distill_twins="auto", distill_jacobian=1.0), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    assert jac.key not in (with_t.key, plan_core(_cc(distill_twins="auto", distill_jacobian=1.0, distill_jacobian_decay=1.0), root=fake_root, evaluated="c3", grayscale=False, seed=0).key)
    assert plan_core(_cc(distill_twins="auto", distill_jacobian=1.0, distill_jacobian_from_epoch=1), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == jac.key
    assert plan_core(_cc(distill_twins="auto", distill_jacobian=1.0, distill_jacobian_from_epoch=3), root=fake_root, evaluated="c3", grayscale=False, seed=0).key != jac.key
    assert plan_core(_cc(distill_twins="auto", distill_jacobian_from_epoch=3), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == with_t.key
    # feature distillation: likewise
    assert plan_core(_cc(distill_features="layer4", distill_features_grid=2), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == base.key
    assert plan_core(_cc(distill_twins="auto", distill_features="none", distill_features_grid=2), root=fake_root, evaluated="c3", grayscale=False, seed=0).key == with_t.key
    feat = plan_core(_cc(distill_twins="auto", distill_features="layer4"), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    assert feat.key not in (with_t.key, plan_core(_cc(distill_twins="auto", distill_features="layer4", distill_features_grid=2), root=fake_root, evaluated="c3", grayscale=False, seed=0).key)
    assert plan_core(_cc(distill_twins="auto", distill_features="layers3-4"), root=fake_root, evaluated="c3", grayscale=False, seed=0).key != feat.key
    for other in (
        plan_core(_cc(), root=fake_root, evaluated="c3", grayscale=False, seed=1),
        plan_core(_cc(), root=fake_root, evaluated="c3", grayscale=True, seed=0),
        plan_core(_cc(epochs=2), root=fake_root, evaluated="c3", grayscale=False, seed=0),
        plan_core(_cc(), root=fake_root, evaluated="b2", grayscale=False, seed=0),
    ):
        assert other.key != base.key and other.path != base.path


def test_noise_images_are_seeded_in_range_at_natural_luminance():
    g = torch.Generator().manual_seed(0)
    natural = 0.2 + 0.5 * torch.rand(30, 3, 32, 32, generator=g)
    a = core_mod.noise_images(12, natural, seed=5)
    assert a.shape == (12, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, core_mod.noise_images(12, natural, seed=5))
    assert not torch.equal(a, core_mod.noise_images(12, natural, seed=6))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert abs(float(a[:6].mean()) - float(natural.mean())) < 0.02  # pure noise at the natural luminance
    contrast = a[:6].flatten(1).std(dim=1)
    assert float(contrast.min()) > 0.02 and float(contrast.max() - contrast.min()) > 0.02  # a spread of contrasts
    # the second half are blends: each correlates with some natural image, unlike pure noise
    def best_r(x):
        v, n = x.flatten() - x.mean(), natural.flatten(1) - natural.flatten(1).mean(1, keepdim=True)
        return float(((n @ v) / (n.norm(dim=1) * v.norm())).max())
    assert min(best_r(x) for x in a[6:]) > 0.15 and max(best_r(x) for x in a[:6]) < 0.1


def test_teachers_label_the_noise_images_too(fake_root, cache):
    plan = plan_core(_cc(distill_twins="auto", distill_noise_images=4), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    datasets, names, info = core_mod.training_sets(plan)
    x_t, y_t = datasets[names.index("twins:a1")]
    assert x_t.shape[0] == y_t.shape[0] == 10 + 4 and torch.isfinite(y_t).all()
    assert info["teachers"]["a1"]["n_images"] == 10 and info["teachers"]["a1"]["n_noise_images"] == 4


def test_feature_distillation_config_names_a_twin_layer():
    assert _cc(distill_features="layers3-4").distill_features == "layers3-4"
    with pytest.raises(ConfigError, match=r"^distill_features: unknown layer 'layer5'; expected none, layer2"):
        _cc(distill_features="layer5")
    with pytest.raises(ConfigError, match="core.distill_features_grid"):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "core": {"distill_features_grid": 0}})


def test_teachers_hidden_layers_become_feature_targets(fake_root, cache):
    """Each pseudo-site is one twin channel averaged over one grid cell, on the images its
    session's twins label; they train the core as a dataset of their own."""
    plan = plan_core(_cc(distill_twins="auto", distill_features="layers3-4", distill_features_grid=2), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    datasets, names, info = core_mod.training_sets(plan)
    assert names[-2:] == ["twins:a1", "twinfeatures:a1"]
    x_t, y_t = datasets[names.index("twins:a1")]
    x_f, f = datasets[names.index("twinfeatures:a1")]
    assert x_f is x_t  # the same distillation images, one copy
    # the labels, from the features' pass through the twins, are those of a core without features
    plain, plain_names, _ = core_mod.training_sets(plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=0))
    torch.testing.assert_close(y_t, plain[plain_names.index("twins:a1")][1], rtol=1e-6, atol=1e-6)
    ens = CowleySessions(str(fake_root)).teacher("a1").ensemble
    # the images the twins saw: the distillation images at their native size
    pool = torch.cat([cowley.load_session(fake_root, s, image_size=cowley.NATIVE_SIZE, grayscale=False)[1] for s in plan.sessions])
    idx = np.sort(np.random.default_rng(core_mod.derive_seed(0, "core-distill")).choice(pool.shape[0], size=10, replace=False))
    # by hand: twin k's layers 3 and 4 through the unfolded reference model, 2 x 2 cell means
    states = [twins.read_twin_state(p) for p in cowley.twin_files(fake_root, "a1").values()]
    xin = twins.preprocess(pool[torch.as_tensor(idx)]).double()
    want = []
    for st in states:
        m = twins.compact_twin(st).requires_grad_(False)
        L, h = m.layers, None
        h = torch.relu(L["layer0_bn"](L["layer0_conv"](xin)))
        for i in range(1, 5):
            if i <= 2:
                h = torch.nn.functional.pad(h, (1, 3, 1, 3))
            h = torch.relu(L[f"layer{i}_bn"](L[f"layer{i}_conv_point"](L[f"layer{i}_conv_depth"](h))))
            if i >= 3:
                want.append(torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))
    want = torch.cat(want, dim=1).float()
    assert f.shape == want.shape and f.shape[0] == 10 and info["teachers"]["a1"]["feature_targets"] == f.shape[1]
    torch.testing.assert_close(f, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert float(f.min()) >= 0.0
    # and the core trains with them, through a cell readout (channel weights over each
    # target's own cell of the core's features) unless the factorized one is asked for
    builders = core_mod.feature_readouts(plan.config, names)
    assert list(builders) == ["twinfeatures:a1"]
    ro = builders["twinfeatures:a1"]((4, 6, 6), f.shape[1])
    assert ro.config()["name"] == "cells" and ro.cells.tolist() == [k % 4 for k in range(f.shape[1])]
    assert core_mod.feature_readouts(_cc(distill_twins="auto", distill_features="layer4", distill_features_readout="factorized"), names) == {}
    path, cinfo = ensure_core(plan)
    assert path.exists() and "twinfeatures:a1" in cinfo["val_median_r"]


def test_teacher_stimuli_drive_their_own_twin_and_are_seeded(fake_root, cache):
    rec = CowleySessions(str(fake_root)).teacher("a1")
    _, natural, _ = cowley.load_session(fake_root, "a1", image_size=cowley.NATIVE_SIZE, grayscale=False)
    n_twins = rec.ensemble.n_twins
    a = core_mod.teacher_stimuli(rec, natural, 2 * n_twins, seed=4, steps=12)
    assert a.shape == (2 * n_twins, *natural.shape[1:]) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, core_mod.teacher_stimuli(rec, natural, 2 * n_twins, seed=4, steps=12))
    assert not torch.equal(a, core_mod.teacher_stimuli(rec, natural, 2 * n_twins, seed=5, steps=12))
    assert core_mod.teacher_stimuli(rec, natural, 0, seed=4).shape[0] == 0
    # every twin is the target of two images, and each image drives its own target twin
    # above that twin's mean natural response (z-scored stretch works on the true model)
    perm = np.random.default_rng(4).permutation(n_twins)
    y_syn, y_nat = rec.expected(a), rec.expected(natural)
    targets = [int(perm[i % n_twins]) for i in range(a.shape[0])]
    assert sorted(targets) == sorted(list(range(n_twins)) * 2)
    z = [(float(y_syn[i, t]) - float(y_nat[:, t].mean())) / float(y_nat[:, t].std()) for i, t in enumerate(targets)]
    assert np.median(z) > 1.0


def test_teachers_label_their_synthesized_images(fake_root, cache):
    plan = plan_core(_cc(distill_twins="auto", distill_synth_images=3, distill_synth_steps=4), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    datasets, names, info = core_mod.training_sets(plan)
    x_t, y_t = datasets[names.index("twins:a1")]
    assert x_t.shape[0] == y_t.shape[0] == 10 + 3 and torch.isfinite(y_t).all()
    t = info["teachers"]["a1"]
    assert t["n_images"] == 10 and t["n_synth_images"] == 3 and t["synthesized_on_own_twins"] == 3 and t["synth_seconds"] >= 0


def _spy_twin_devices(monkeypatch, *, honour: bool = False) -> list[tuple[str, object]]:
    """Record (session, device) of every twin load: the device asked for, loading on the CPU
    (sentinel devices are not real); with ``honour``, the device the twins were loaded on."""
    asked: list[tuple[str, object]] = []
    real = twins.load_twins

    def spy(root, session, *, device="cpu", **kw):
        ens = real(root, session, device=device if honour else "cpu", **kw)
        asked.append((str(session), ens._device().type if honour else device))
        return ens

    monkeypatch.setattr(twins, "load_twins", spy)
    return asked


def test_teachers_and_recorder_compute_on_the_device_they_are_given(fake_root, cache, monkeypatch):
    """The twins label and calibrate where the run computes (on a GPU, not left on the CPU)."""
    from synth.targets import build_target

    asked = _spy_twin_devices(monkeypatch)
    plan = plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    core_mod.training_sets(plan, device="gpu-under-test")
    assert asked == [("a1", "gpu-under-test")]

    repo = Path(__file__).resolve().parents[2]
    target = build_target(repo / "targets" / "cowley2023.yaml", root=str(fake_root), session="c3", overrides={"followup_noise": "none"})
    rec = target.recorder(device="gpu-under-test")
    assert asked[-1] == ("c3", "gpu-under-test")
    assert target.recorder() is rec and len(asked) == 2  # calibrated once, left where it is
    target.recorder(device="cpu")
    assert rec.ensemble._device().type == "cpu" and len(asked) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_pipeline_on_cuda_runs_the_twins_on_cuda(fake_root, cache, tmp_path, monkeypatch):
    from synth.config import Config
    from synth.configtools import to_dict
    from synth.pipeline import run_pipeline

    asked = _spy_twin_devices(monkeypatch, honour=True)
    cfg = from_dict(Config, {**to_dict(_core_stage_config(fake_root)), "device": "cuda"})
    out = run_pipeline(cfg, out=str(tmp_path / "run"))
    rep = json.loads((out / "report.json").read_text())
    assert asked == [("c3", "cuda"), ("a1", "cuda")]  # the recorder (record stage), then the teacher (core stage)
    assert json.loads((out / "provenance.json").read_text())["device"].startswith("cuda")
    assert np.isfinite(rep["fit"]["reference_median_r_test"])


# --------------------------------------------------------------------------- training + cache


def _spy_session_loads(monkeypatch) -> list[str]:
    """The sessions whose images and responses are loaded from now on, in order."""
    loaded: list[str] = []
    real_load = cowley.load_session

    def spy_load(root, session, **kw):
        loaded.append(str(session))
        return real_load(root, session, **kw)

    monkeypatch.setattr(cowley, "load_session", spy_load)
    return loaded


def test_core_never_loads_evaluated_session_and_cache_is_reused(fake_root, cache, monkeypatch):
    loaded = _spy_session_loads(monkeypatch)
    twin_sessions_loaded: list[str] = []
    real_twins = twins.load_twins

    def spy_twins(root, session, **kw):
        twin_sessions_loaded.append(str(session))
        return real_twins(root, session, **kw)

    monkeypatch.setattr(twins, "load_twins", spy_twins)
    plan = plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=3)
    path, info = ensure_core(plan)
    assert info["cache"] == "miss" and path.exists() and path == plan.path
    assert "c3" not in loaded and set(loaded) == {"a1", "b2"}
    assert twin_sessions_loaded == ["a1"]  # only the other session's twins label images
    assert info["sessions"] == ["a1", "b2"] and info["excluded_session"] == "c3" and info["distill_twins"] == ["a1"]
    assert info["data"]["teachers"]["a1"]["n_images"] == 10 and info["data"]["teachers"]["a1"]["n_noise_images"] == 0
    assert "c3" not in info["data"]["teachers"]["a1"]["image_sessions"]
    assert set(info["val_median_r"]) == {"a1", "b2", "twins:a1"}
    saved = json.loads(path.with_name("core.json").read_text())
    assert saved["key"] == plan.key

    # second run: the cached core, no training, no data loading
    loaded.clear()

    def no_training(*a, **k):
        raise AssertionError("the cached core should have been reused")

    monkeypatch.setattr("synth.surrogate.fit.fit_core", no_training)
    path2, info2 = ensure_core(plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=3))
    assert info2["cache"] == "hit" and path2 == path and loaded == []

    # the cached core is a pretrained_core for the evaluated session
    from synth.surrogate.backbones import build_backbone

    bb = build_backbone("pretrained_core", weights=str(path), in_channels=3)
    assert bb.input_size == 16 and bb(torch.rand(2, 3, 112, 112)).shape[0] == 2


def test_damaged_cache_entry_is_retrained(fake_root, cache):
    plan = plan_core(_cc(), root=fake_root, evaluated="a1", grayscale=True, seed=0)
    plan.path.parent.mkdir(parents=True)
    plan.path.write_bytes(b"not a checkpoint")
    plan.path.with_name("core.json").write_text("{}")
    _, info = ensure_core(plan)
    assert info["cache"] == "miss"
    assert ensure_core(plan)[1]["cache"] == "hit"


def test_adversarial_core_is_its_own_cache_entry_and_records_eps(fake_root, cache):
    clean = ensure_core(plan_core(_cc(), root=fake_root, evaluated="a1", grayscale=False, seed=0))
    adv_plan = plan_core(_cc(adversarial_eps=0.2), root=fake_root, evaluated="a1", grayscale=False, seed=0)
    path, info = ensure_core(adv_plan)
    assert info["cache"] == "miss" and path != clean[0] and path.exists()
    assert info["adversarial_eps"] == 0.2 and clean[1]["adversarial_eps"] == 0.0
    assert core_summary(info)["adversarial_eps"] == 0.2  # into report.json
    assert json.loads(path.with_name("core.json").read_text())["config"]["adversarial_eps"] == 0.2
    assert ensure_core(adv_plan)[1]["cache"] == "hit"


def test_jacobian_targets_are_each_images_own_twin_gradient_seen_by_the_fourier_view(fake_root, cache):
    """One seeded twin per distillation image; its target is that calibrated twin's input
    gradient at the core's input (unit length, fourier view); none unless asked for."""
    from synth.surrogate.fit import spectral_view

    plan = plan_core(_cc(distill_twins="auto", distill_jacobian=0.5, distill_jacobian_decay=1.5), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    datasets, names, _ = core_mod.training_sets(plan)
    jac = core_mod.jacobian_targets(plan, datasets, names)
    assert list(jac) == ["twins:a1"]
    jt = jac["twins:a1"]
    x, y = datasets[names.index("twins:a1")]
    assert jt.grads.shape == x.shape and jt.sites.shape == (x.shape[0],) and jt.weight == 0.5 and jt.decay_power == 1.5
    assert int(jt.sites.min()) >= 0 and int(jt.sites.max()) < y.shape[1] and jt.sites.unique().numel() > 1
    assert torch.allclose(jt.grads.float().flatten(1).norm(dim=1), torch.ones(x.shape[0]), atol=1e-2)
    rec = CowleySessions(str(fake_root)).teacher("a1")
    for i in (0, 5):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(rec.site_model(int(jt.sites[i]))(xi).sum(), xi)
        cos = torch.nn.functional.cosine_similarity(spectral_view(g, 1.5).flatten(), jt.grads[i].float().flatten(), dim=0)
        assert float(cos) > 0.999
    again = core_mod.jacobian_targets(plan, datasets, names)["twins:a1"]
    assert torch.equal(again.sites, jt.sites) and torch.equal(again.grads, jt.grads)
    other = plan_core(_cc(distill_twins="auto", distill_jacobian=0.5), root=fake_root, evaluated="c3", grayscale=False, seed=1)
    assert not torch.equal(core_mod.jacobian_targets(other, datasets, names)["twins:a1"].sites, jt.sites)
    off = plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    assert core_mod.jacobian_targets(off, datasets, names) == {}


def test_jacobian_core_records_the_cosine_per_epoch(fake_root, cache):
    plan = plan_core(_cc(distill_twins="auto", distill_jacobian=1.0, epochs=2), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    path, info = ensure_core(plan)
    assert info["cache"] == "miss" and len(info["jacobian_cosine"]) == info["epochs_run"] == 2
    assert all(-1.0 <= c <= 1.0 for c in info["jacobian_cosine"])
    assert core_summary(info)["jacobian_cosine"] == info["jacobian_cosine"]
    assert json.loads(path.with_name("core.json").read_text())["config"]["distill_jacobian"] == 1.0


@pytest.mark.parametrize("limit", [10.0, None])
def test_core_cut_short_by_time_is_retrained_when_the_limit_is_raised(fake_root, cache, limit, caplog):
    # a limit of 0: the first epoch runs (there is no duration to plan with yet), no more
    plan = plan_core(_cc(max_minutes=0.0, epochs=3), root=fake_root, evaluated="a1", grayscale=False, seed=0)
    _, info = ensure_core(plan)
    assert info["cache"] == "miss" and info["stopped_by_time_limit"] and info["epochs_run"] == 1
    # same limit: the cut core is what this limit gives, reused, with a warning at each reuse
    with caplog.at_level("WARNING", logger="synth"):
        assert ensure_core(plan)[1]["cache"] == "hit"
    cut = [r.getMessage() for r in caplog.records if "cut short by its time limit" in r.getMessage()]
    assert len(cut) == 1 and "1 of 3 epochs" in cut[0] and "fit.core.max_minutes" in cut[0]
    caplog.clear()
    # a higher limit, or none: retrained (same key, same cache folder), then reused
    raised = plan_core(_cc(max_minutes=limit, epochs=3), root=fake_root, evaluated="a1", grayscale=False, seed=0)
    assert raised.path == plan.path
    _, info2 = ensure_core(raised)
    assert info2["cache"] == "miss" and not info2["stopped_by_time_limit"] and info2["epochs_run"] == 3
    with caplog.at_level("WARNING", logger="synth"):
        assert ensure_core(raised)[1]["cache"] == "hit"
        assert ensure_core(plan)[1]["cache"] == "hit"  # a full core serves a lower limit too
    assert not [r for r in caplog.records if "cut short" in r.getMessage()]


def test_core_cut_short_by_the_stage_limit_is_retrained_when_the_stage_allows_more(fake_root, cache):
    plan = plan_core(_cc(max_minutes=10.0, epochs=3), root=fake_root, evaluated="a1", grayscale=False, seed=0)
    # nothing left of a 5 min stage: one epoch, cut by the stage (its own 10 min would allow 3)
    _, info = ensure_core(plan, limit_minutes=0.0, stage_minutes=5.0)
    assert info["stopped_by_time_limit"] and info["limited_by_stage"] and info["epochs_run"] == 1
    assert info["limit_minutes"] == 0.0 and info["stage_minutes"] == 5.0
    assert core_summary(info)["limited_by_stage"] is True
    # the same or a tighter stage limit: what it gives, reused
    assert ensure_core(plan, limit_minutes=5.0, stage_minutes=5.0)[1]["cache"] == "hit"
    assert ensure_core(plan, limit_minutes=4.0, stage_minutes=4.0)[1]["cache"] == "hit"
    # a longer stage, or none: retrained in full
    _, info2 = ensure_core(plan, limit_minutes=6.0, stage_minutes=6.0)
    assert info2["cache"] == "miss" and info2["epochs_run"] == 3 and not info2["limited_by_stage"]
    assert ensure_core(plan)[1]["cache"] == "hit"
    # cut by its own limit, below what is left of the stage: not the stage's doing
    own = plan_core(_cc(max_minutes=0.0, epochs=2), root=fake_root, evaluated="a1", grayscale=False, seed=0)
    _, info3 = ensure_core(own, limit_minutes=5.0, stage_minutes=5.0)
    assert info3["stopped_by_time_limit"] and not info3["limited_by_stage"] and info3["limit_minutes"] == 0.0
    assert ensure_core(own, limit_minutes=60.0, stage_minutes=60.0)[1]["cache"] == "hit"


def test_core_stage_gives_each_core_what_is_left_students_first_then_shortest_limit(monkeypatch):
    from synth import pipeline

    clock = [100.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    took = {"student": 20.0, "long": 25.0, "short": 7.0, "cached": 0.0}  # minutes each core takes (cached: none)
    calls: list[tuple[str, float | None, float | None]] = []

    def fake_ensure(plan, *, device, limit_minutes=None, stage_minutes=None):
        calls.append((plan.name, limit_minutes, stage_minutes))
        own = plan.config.max_minutes
        clock[0] += 60.0 * min(took[plan.name], *(m for m in (own, limit_minutes) if m is not None))
        return Path(f"/cores/{plan.name}.pt"), {"cache": "miss", "key": plan.name}

    monkeypatch.setattr(core_mod, "ensure_core", fake_ensure)

    def plan(name, objective, minutes):
        return SimpleNamespace(name=name, config=SimpleNamespace(objective=objective, max_minutes=minutes))

    plans = [plan("long", "responses", 44.0), plan("short", "responses", 15.0), None, plan("student", "teacher_maps", 30.0), plan("cached", "responses", 44.0)]
    fits = [FitConfig() for _ in plans]
    out, reports = pipeline._core_stage(fits, plans, torch.device("cpu"), pipeline.Timer(), stage_minutes=50.0)
    # the student first, then the others by their own limit, shortest first (ties in the config's order)
    assert [c[0] for c in calls] == ["student", "short", "long", "cached"]
    left = {name: limit for name, limit, _ in calls}
    assert left["student"] == pytest.approx(50.0) and left["short"] == pytest.approx(30.0)
    assert left["long"] == pytest.approx(23.0)  # 50 - 20 - 7: the cut falls on the core given the most time
    assert left["cached"] == pytest.approx(0.0)  # nothing left, but a cached core needs no time
    assert {c[2] for c in calls} == {50.0}
    assert reports[2] is None and out[2] is fits[2] and out[0].weights == "/cores/long.pt" and out[0].core is None
    assert [r["key"] for r in reports if r] == ["long", "short", "student", "cached"]  # reported in the config's order
    # no stage limit: every core has only its own
    calls.clear()
    pipeline._core_stage(fits, plans, torch.device("cpu"), pipeline.Timer())
    assert {c[1] for c in calls} == {None} and {c[2] for c in calls} == {None}


def test_core_stage_limit_is_one_for_the_whole_stage():
    fc = from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "core_stage_minutes": 58, "ensemble": [{"core": {"input_size": 64}}]})
    assert fc.core_stage_minutes == 58.0 and all(m.core_stage_minutes == 58.0 for m in fc.members())
    with pytest.raises(ConfigError, match=r"^ensemble\[0\]\.core_stage_minutes: the core stage's time limit covers every member's core"):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "ensemble": [{"core_stage_minutes": 10}]})
    with pytest.raises(ConfigError, match=r"^judge\.core_stage_minutes: the core stage's time limit covers the judge's core too"):
        from_dict(FitConfig, {"backbone": "pretrained_core", "weights": "auto", "judge": {"core_stage_minutes": 10}})
    with pytest.raises(ConfigError, match=r"core_stage_minutes"):
        from_dict(FitConfig, {"core_stage_minutes": -1})


def test_training_guard_refuses_evaluated_session(fake_root, cache):
    import dataclasses

    plan = plan_core(_cc(), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    bad = dataclasses.replace(plan, sessions=("a1", "c3"))
    with pytest.raises(DataError, match="evaluated session c3"):
        core_mod.training_sets(bad)


def _core_stage_config(fake_root, **fit_extra):
    from synth.config import Config

    repo = Path(__file__).resolve().parents[2]
    data = {
        "name": "core_stage",
        "device": "cpu",
        "target": {"file": str(repo / "targets" / "cowley2023.yaml"), "root": str(fake_root), "session": "c3", "params": {"followup_noise": "none"}},
        "data": {"image_size": 112, "grayscale": False},
        "fit": {
            "backbone": "pretrained_core", "weights": "auto", "epochs": 2, "batch_size": 8,
            "split": {"train": 0.4, "val": 0.1, "test": 0.5},
            "core": {**TINY_CORE, "distill_twins": "auto"},
        },
        "stimuli": {"seeds_per_target": 1},
        "synthesis": {"steps": 2, "batch_size": 4},
        "followup": {"n_repeats": 2},
        "validate": {"n_bootstrap": 0},
    }
    data["fit"].update(fit_extra)
    return from_dict(Config, data)


def test_pipeline_with_core_stage(fake_root, cache, tmp_path):
    """The whole loop on the tiny root: core trained then reused, twins' reference r reported."""
    from synth.pipeline import run_pipeline

    cfg = _core_stage_config(fake_root)
    out = run_pipeline(cfg, out=str(tmp_path / "run1"))
    rep = json.loads((out / "report.json").read_text())
    prov = json.loads((out / "provenance.json").read_text())
    assert rep["core"]["cache"] == "miss" and rep["core"]["sessions"] == ["a1", "b2"]
    assert rep["core"]["distill_twins"] == ["a1"] and rep["core"]["excluded_session"] == "c3"
    assert prov["core"]["key"] == rep["core"]["key"] and rep["core"]["precision"] == "fp32"
    assert np.isfinite(rep["fit"]["reference_median_r_test"]) and rep["fit"]["n_test_images"] == N_IMAGES // 2
    assert "core" in rep["timing"]
    assert rep["trial_noise"] == {"model": "none", "fano": None}  # the follow-up's noise model, as configured
    resolved = (out / "config.resolved.yaml").read_text()
    assert "weights: auto" in resolved  # re-running the resolved config reuses the cache
    out2 = run_pipeline(cfg, out=str(tmp_path / "run2"))
    assert json.loads((out2 / "report.json").read_text())["core"]["cache"] == "hit"


def test_pipeline_hands_its_device_to_the_twins(fake_root, cache, tmp_path, monkeypatch):
    """The run's resolved device reaches the teachers' and the recorder's twins (not a default)."""
    from synth.pipeline import run_pipeline

    asked = _spy_twin_devices(monkeypatch)
    run_pipeline(_core_stage_config(fake_root), out=str(tmp_path / "run"))
    assert [s for s, _ in asked] == ["c3", "a1"]  # the recorder (record stage), then the teacher (core stage)
    assert all(isinstance(d, torch.device) and d.type == "cpu" for _, d in asked), asked


def test_ensemble_member_gets_its_own_core_without_the_evaluated_session(fake_root, cache, tmp_path):
    from synth.pipeline import run_pipeline

    cfg = _core_stage_config(fake_root, ensemble=[{"core": {"distill_twins": "none", "epochs": 1}}])
    out = run_pipeline(cfg, out=str(tmp_path / "run1"))
    rep = json.loads((out / "report.json").read_text())
    main, member = rep["core"], rep["ensemble_cores"][0]
    assert main["key"] != member["key"] and main["cache"] == member["cache"] == "miss"
    assert member["sessions"] == ["a1", "b2"] and member["excluded_session"] == "c3" and member["distill_twins"] == []
    assert main["distill_twins"] == ["a1"]
    assert (out / "surrogate_member1.pt").is_file() and len(rep["fit"]["ensemble"]) == 2
    assert json.loads((out / "provenance.json").read_text())["ensemble_cores"][0]["key"] == member["key"]
    rep2 = json.loads((run_pipeline(cfg, out=str(tmp_path / "run2")) / "report.json").read_text())
    assert rep2["core"]["cache"] == rep2["ensemble_cores"][0]["cache"] == "hit"
    assert rep2["fit"]["median_r_test"] == pytest.approx(rep["fit"]["median_r_test"])


def test_twin_feature_member_uses_only_the_other_sessions_twins(fake_root, cache, tmp_path):
    """An ensemble member on the cowley_twins backbone: sessions auto is every session with
    twins but the evaluated one; its checkpoint holds no twin weights; the report lists it."""
    from synth.pipeline import run_pipeline
    from synth.surrogate.model import Surrogate

    member = {"backbone": "cowley_twins", "weights": "none", "core": None, "backbone_kwargs": {"root": "auto", "sessions": "auto"}}
    out = run_pipeline(_core_stage_config(fake_root, ensemble=[member]), out=str(tmp_path / "run"))
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["fit"]["ensemble"]) == 2 and "ensemble_cores" not in rep  # the member trains no core
    saved = torch.load(out / "surrogate_member1.pt", weights_only=True)
    assert saved["spec"]["backbone"]["build"]["kwargs"] == {"root": str(fake_root.resolve()), "sessions": ["a1"]}
    assert list(k for k in saved["state_dict"] if k.startswith("backbone.")) == ["backbone.body.feature_scale"]
    assert Surrogate.load(out / "surrogate_member1.pt").backbone.body.n_channels == 2 * 3 * 2  # a1's 2 twins x layers 2-4 x 2 channels
    listed = {**member, "backbone_kwargs": {"root": "auto", "sessions": ["a1", "c3"]}}
    with pytest.raises(ConfigError, match="session c3's own twins are its follow-up recorder"):
        run_pipeline(_core_stage_config(fake_root, ensemble=[listed]), out=str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob("refused*"))


def _extends_closed_loop(name: str):
    """A config built on the shipped closed loop (``base:``): its members and the base's; the
    rest as in the base file."""
    from synth.config import config_files, load_config

    repo = Path(__file__).resolve().parents[2]
    path = repo / "configs" / f"{name}.yaml"
    base = load_config(repo / "configs" / "cowley2023_closed_loop.yaml")
    cfg = load_config(path, ["target.session=190923"])
    assert cfg.synthesis == base.synthesis and cfg.stimuli == base.stimuli and cfg.name == name
    assert config_files(path) == [str(path), str(path.parent / "cowley2023_closed_loop.yaml")]
    return cfg.fit.members(), base.fit.members()


def test_twins_config_builds_on_the_closed_loop_config():
    members, base = _extends_closed_loop("cowley2023_closed_loop_twins")
    assert [m.backbone for m in members] == ["pretrained_core", "pretrained_core", "cowley_twins"]
    assert members[2].core is None and members[2].backbone_kwargs == {"root": "auto", "sessions": "auto"}
    assert members[1] == base[1]  # the small core as in the base file


def test_student_config_builds_on_the_closed_loop_config():
    members, base = _extends_closed_loop("cowley2023_closed_loop_student")
    assert [m.backbone for m in members] == ["pretrained_core"] * 3 and [m.weights for m in members] == ["auto"] * 3
    assert members[:2] == base  # the shipped pair as in the base file
    st = members[2].core
    assert st.objective == "teacher_maps" and st.distill_twins == "auto" and st.augment_shift == 0 and st.input_size == 112
    assert members[2].lr == 0.002


# --------------------------------------------------------------------------- real data


@requires_cowley
@pytest.mark.parametrize("evaluated,other", [("201025", "190923"), ("190923", "201025")])
def test_real_plan_uses_other_sessions_and_other_twins(evaluated, other, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(tmp_path))
    root = cowley_root()
    plan = plan_core(from_dict(CoreConfig, {"distill_twins": "auto"}), root=root, evaluated=evaluated, grayscale=False, seed=0)
    present = cowley.list_sessions(root)
    assert evaluated not in plan.sessions and set(plan.sessions) == set(present) - {evaluated}
    assert plan.teachers == (other,)
    assert not any(k.startswith(f"{evaluated}/") for k in plan.checksums)


# --------------------------------------------------------------------------- student cores
STUDENT = {"distill_twins": "auto", "objective": "teacher_maps", "augment_shift": 0, "teacher_components": 3}


def test_student_config_takes_teachers_and_no_response_options():
    assert _cc(**STUDENT).objective == "teacher_maps" and _cc().objective == "responses"
    with pytest.raises(ConfigError, match=r"^distill_twins: objective teacher_maps needs teachers"):
        _cc(objective="teacher_maps")
    with pytest.raises(ConfigError, match=r"^augment_shift: objective teacher_maps takes augment_shift: 0 \(shifts would move"):
        _cc(**{**STUDENT, "augment_shift": 2})
    with pytest.raises(ConfigError, match=r"^distill_features: objective teacher_maps takes distill_features: none"):
        _cc(**STUDENT, distill_features="layer4")
    with pytest.raises(ConfigError, match=r"^lr_schedule: objective teacher_maps takes lr_schedule: cosine"):
        _cc(**STUDENT, lr_schedule="plateau")
    with pytest.raises(ConfigError, match=r"^teacher_layers: unknown layer 'layer5'"):
        _cc(**STUDENT, teacher_layers="layer5")
    with pytest.raises(ConfigError, match=r"^backbone_kwargs.head: the student's head is set by teacher_components"):
        _cc(**{**STUDENT, "backbone_kwargs": {"channels": 4, "n_layers": 2, "head": 3}})
    with pytest.raises(ConfigError, match="objective"):
        _cc(objective="maps")


def test_student_cache_key(fake_root, cache):
    def key(**kw):
        return plan_core(_cc(**kw), root=fake_root, evaluated="c3", grayscale=False, seed=0).key

    base = key(distill_twins="auto")
    assert key(distill_twins="auto", teacher_layers="layer4", teacher_components=7) == base  # unused by a response core: old keys kept
    st = key(**STUDENT)
    assert st != base
    assert key(**{**STUDENT, "teacher_components": 4}) != st and key(**STUDENT, teacher_layers="layer4") != st


def test_student_targets_are_the_other_sessions_twins_standardized_maps(fake_root, cache):
    from synth.surrogate.twin_backbone import build_cowley_twins

    plan = plan_core(_cc(**{**STUDENT, "teacher_components": 0}), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    x, maps, info = core_mod.student_set(plan)
    assert x.shape == (10, 3, 16, 16) and maps.shape == (10, 12, 28, 28)  # a1's 2 twins x layers 2-4 x 2 channels
    assert info["teachers"] == {"a1": {"n_twins": 2}} and info["teacher_channels"] == 12 and info["components"] == 12
    assert "c3" not in info["image_sessions"] and info["n_images"] == 10
    native = {s: cowley.load_session(fake_root, s, image_size=cowley.NATIVE_SIZE, grayscale=False)[1] for s in plan.sessions}
    images, _ = core_mod.distill_selection(plan, native)
    f = build_cowley_twins(root=str(fake_root), sessions=["a1"], layer="layers2-4")(images).detach().double()
    flat = f.permute(0, 2, 3, 1).reshape(-1, 12)
    want = (f - flat.mean(0).view(1, -1, 1, 1)) / flat.std(0).clamp_min(1e-3).view(1, -1, 1, 1)
    torch.testing.assert_close(maps.double(), want, rtol=2e-2, atol=2e-2)
    # a grayscale experiment's student sees luminance, and so do its teachers
    gray = plan_core(_cc(**{**STUDENT, "teacher_components": 0}), root=fake_root, evaluated="c3", grayscale=True, seed=0)
    xg, mg, _ = core_mod.student_set(gray)
    assert xg.shape == (10, 1, 16, 16) and mg.shape == maps.shape and not torch.equal(mg, maps)


def test_student_core_learns_only_other_sessions_and_is_reused(fake_root, cache, monkeypatch):
    from synth.surrogate.backbones import build_backbone

    loaded = _spy_session_loads(monkeypatch)
    teachers: list[str] = []
    real_teacher = CowleySessions.teacher

    def spy_teacher(self, session, device="cpu"):
        teachers.append(str(session))
        return real_teacher(self, session, device)

    monkeypatch.setattr(CowleySessions, "teacher", spy_teacher)
    plan = plan_core(_cc(**STUDENT), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    path, info = ensure_core(plan)
    assert "c3" not in loaded and teachers == ["a1"]
    assert info["cache"] == "miss" and info["objective"] == "teacher_maps" and info["mean_val_median_r"] is None
    assert info["data"]["components"] == 3 and len(info["val_r2_history"]) == info["epochs_run"] == 1
    summary = core_summary(info)
    assert summary["objective"] == "teacher_maps" and summary["val_r2"] == info["val_r2"]
    bb = build_backbone("pretrained_core", weights=str(path), in_channels=3)
    assert bb.out_shape(112, 3) == (3, 8, 8)  # the head's 3 components at the 16 px student's output

    def no_training(*a, **k):
        raise AssertionError("the cached student should have been reused")

    monkeypatch.setattr("synth.surrogate.student.fit_student", no_training)
    path2, info2 = ensure_core(plan_core(_cc(**STUDENT), root=fake_root, evaluated="c3", grayscale=False, seed=0))
    assert info2["cache"] == "hit" and path2 == path


def test_students_maps_pass_labels_a_core_distilled_on_the_same_images(fake_root, cache, tmp_path, monkeypatch):
    """The student's pass through the teachers caches their outputs: a core distilled from
    the same twins on the same images then gets the same labels without running a twin."""
    monkeypatch.setattr(twins, "_CACHE_MIN", 1)  # the tiny root's 10 images are cached as real ones are
    resp = plan_core(_cc(distill_twins="auto"), root=fake_root, evaluated="c3", grayscale=False, seed=0)
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(tmp_path / "elsewhere"))
    want, names, _ = core_mod.training_sets(resp)  # labelled by the twins themselves
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(cache))
    ensure_core(plan_core(_cc(**STUDENT), root=fake_root, evaluated="c3", grayscale=False, seed=0))

    def boom(*a, **k):
        raise AssertionError("the labels should have come from the student's pass")

    monkeypatch.setattr(twins.TwinEnsemble, "forward", boom)
    got, names2, _ = core_mod.training_sets(resp)
    assert names2 == names and "twins:a1" in names
    for (x_w, y_w), (x_g, y_g) in zip(want, got):
        torch.testing.assert_close(x_g, x_w, rtol=0, atol=0)
        torch.testing.assert_close(y_g, y_w, rtol=1e-5, atol=1e-5)


def test_student_member_in_the_closed_loop(fake_root, cache, tmp_path, monkeypatch):
    from synth.pipeline import run_pipeline
    from synth.surrogate.model import Surrogate

    trained: list[str] = []
    real_ensure = core_mod.ensure_core

    limits: list[tuple[float, float]] = []

    def spy_ensure(plan, **kw):
        trained.append(plan.config.objective)
        limits.append((kw["limit_minutes"], kw["stage_minutes"]))
        return real_ensure(plan, **kw)

    monkeypatch.setattr(core_mod, "ensure_core", spy_ensure)
    cfg = _core_stage_config(fake_root, ensemble=[{"core": STUDENT, "lr": 0.002}], core_stage_minutes=30)
    out = run_pipeline(cfg, out=str(tmp_path / "run"))
    assert trained == ["teacher_maps", "responses"]  # the student first (its maps pass labels the main core's images)
    assert [stage for _, stage in limits] == [30.0, 30.0] and 0 < limits[1][0] < limits[0][0] <= 30.0  # fit.core_stage_minutes
    rep = json.loads((out / "report.json").read_text())
    main, member = rep["core"], rep["ensemble_cores"][0]
    assert main["objective"] == "responses" and member["objective"] == "teacher_maps"  # reported in the config's order
    assert member["distill_twins"] == ["a1"] and member["excluded_session"] == "c3" and member["key"] != main["key"]
    assert len(rep["fit"]["ensemble"]) == 2
    assert Surrogate.load(out / "surrogate_member1.pt").backbone.out_shape(112, 3)[0] == 3
