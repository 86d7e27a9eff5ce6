"""Digital twins (Cowley et al. 2023 compact models) as the follow-up recorder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _shared import cowley_root, random_twin_state, requires_cowley
from synth.data import cowley
from synth.data.recordings import Recording
from synth.errors import ConfigError, DataError
from synth.populations import twins

REPO = Path(__file__).resolve().parents[2]


def _random_state(counts: list[int], seed: int) -> dict[str, torch.Tensor]:
    return random_twin_state(counts, seed)


def _toy_ensemble(dtype=torch.float64) -> tuple[twins.TwinEnsemble, list[dict]]:
    states = [_random_state([4, 6, 3, 5, 3], 0), _random_state([5, 3, 4, 3, 2], 1)]
    return twins.TwinEnsemble(states, ["s_n000", "s_n001"], dtype=dtype), states


def _images(n: int, size: int = 112, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size // 8, size // 8, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------- architecture


def test_fast_ensemble_matches_reference_architecture():
    ens, states = _toy_ensemble(torch.float64)
    x = _images(3)
    with torch.no_grad():
        got = ens(x)
        ref = torch.stack([twins.compact_twin(s)(twins.preprocess(x, torch.float64)) for s in states], dim=1)
    assert got.shape == (3, 2) and float(ref.std()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # float32 path (channels-last, small blocks) agrees to rounding, for any block size
    ens32 = twins.TwinEnsemble(states, ["a", "b"], dtype=torch.float32, block=3)
    with torch.no_grad():
        torch.testing.assert_close(ens32(x).double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_reference_eps_and_published_padding():
    m = twins.CompactTwin([3, 3, 3, 3, 3])
    assert all(bn.eps == twins.BN_EPS == 1e-5 for name, bn in m.layers.items() if name.endswith("_bn"))
    state = _random_state([3, 3, 3, 3, 3], 2)
    x = twins.preprocess(_images(2), torch.float64)
    ref = twins.compact_twin(state)
    with torch.no_grad():
        a = ref(x)
        # eps is not a no-op here, and the fast path honours a non-default one
        keras = twins.compact_twin(state, bn_eps=twins.KERAS_BN_EPS)
        assert not torch.allclose(a, keras(x), rtol=1e-6)
        ens = twins.TwinEnsemble([state], ["a"], dtype=torch.float64, bn_eps=twins.KERAS_BN_EPS)
        torch.testing.assert_close(ens(_images(2))[:, 0], keras(x), rtol=1e-10, atol=1e-10)
        # layers 1-2 read the 112 -> 56 -> 28 grids through (1, 3, 1, 3) padding
        h = F.relu(ref.layers["layer0_bn"](ref.layers["layer0_conv"](x)))
        h = ref.layers["layer1_conv_depth"](F.pad(h, (1, 3, 1, 3)))
        assert h.shape[-2:] == (56, 56)


def test_ensemble_is_differentiable():
    ens, _ = _toy_ensemble(torch.float32)
    x = _images(2).requires_grad_(True)
    ens(x)[:, 1].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_input_grayscale_and_resizing():
    ens, _ = _toy_ensemble()
    rgb = _images(2)
    gray = rgb.mean(dim=1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(ens(gray), ens(gray.expand(-1, 3, -1, -1)))
        small = _images(2, size=64)
        big = F.interpolate(small, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(ens(small), ens(big), rtol=1e-5, atol=1e-5)  # big was resized in float32
    with pytest.raises(DataError, match="shape"):
        ens(torch.rand(2, 2, 112, 112))


# --------------------------------------------------------------------------- calibration / recording


def test_fit_linear_recovers_known_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    slope, icpt = np.array([2.0, -1.0, 0.5, 3.0]), np.array([1.0, 0.0, 4.0, -2.0])
    y = x * slope + icpt + rng.normal(scale=1e-3, size=x.shape)
    s, b = twins.fit_linear(x, y)
    np.testing.assert_allclose(s, slope, atol=1e-3)
    np.testing.assert_allclose(b, icpt, atol=1e-3)
    s, b = twins.fit_linear(np.ones((10, 1)), np.arange(10.0)[:, None])  # constant input
    assert s[0] == 0 and b[0] == 4.5


def _calibrated(noise="poisson", noisy: bool = False) -> tuple[twins.TwinRecorder, torch.Tensor, np.ndarray]:
    ens, _ = _toy_ensemble(torch.float32)
    x = _images(30, seed=3)
    with torch.no_grad():
        raw = ens(x).double().numpy()
    slope, icpt = np.array([3.0, 1.5]), np.array([2.0, 5.0])
    y = raw * slope + icpt
    if noisy:
        y = y + np.random.default_rng(0).normal(size=y.shape) * y.std(axis=0)
    ids = [f"img{i}" for i in range(30)]
    rec = Recording(stimulus_id=ids, site_id=["other", "s_n001", "s_n000"], responses=np.stack([y[:, 0] * 0, y[:, 1], y[:, 0]]))
    return twins.TwinRecorder.calibrate(ens, x, rec, noise=noise, cache=False), x, y


def test_calibration_recovers_linear_map():
    recd, x, y = _calibrated()
    np.testing.assert_allclose(recd.slope, [3.0, 1.5], rtol=1e-4)
    np.testing.assert_allclose(recd.intercept, [2.0, 5.0], rtol=1e-4, atol=1e-3)
    assert list(recd.site_ids) == ["s_n000", "s_n001"] and list(recd.areas) == ["V4", "V4"]
    exp = recd.expected(x)
    assert exp.shape == (30, 2) and exp.dtype == torch.float32
    np.testing.assert_allclose(exp.numpy(), np.maximum(y, 0), rtol=1e-4, atol=1e-3)
    assert recd.info["median_r"] > 0.999
    noisy, x, y = _calibrated(noisy=True)  # reported r is per site, over images
    with torch.no_grad():
        raw = noisy.ensemble(x).double().numpy()
    want = [np.corrcoef(raw[:, i], y[:, i])[0, 1] for i in range(2)]
    np.testing.assert_allclose([noisy.info["r"]["s_n000"], noisy.info["r"]["s_n001"]], want, rtol=1e-6)
    assert 0.3 < noisy.info["median_r"] < 0.95
    neg = twins.TwinRecorder(ensemble=recd.ensemble, slope=-recd.slope, intercept=-recd.intercept)
    assert float(neg.expected(x).min()) == 0.0  # clipped at zero


def test_site_model_is_one_calibrated_twin_and_differentiable():
    recd, x, y = _calibrated()
    for site in (0, 1):
        m = recd.site_model(site)
        out = m(x)
        assert out.shape == (30, 1)
        np.testing.assert_allclose(out[:, 0].detach().numpy(), y[:, site], rtol=1e-4, atol=1e-3)  # unclipped line
    xg = x[:2].clone().requires_grad_(True)
    recd.site_model(1)(xg).sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    with pytest.raises(IndexError, match="site 2 out of range for 2 twins"):
        recd.site_model(2)


def test_population_model_is_every_calibrated_twin_with_gradients():
    recd, x, y = _calibrated()
    pop = recd.population_model()
    with torch.no_grad():
        out = pop(x)
    assert out.shape == (30, 2)
    np.testing.assert_allclose(out.numpy(), y, rtol=1e-4, atol=1e-3)  # unclipped lines, column order
    np.testing.assert_array_equal(recd.population_model([1, 0])(x).detach().numpy(), out.numpy()[:, ::-1])
    # with gradients each twin is recomputed in the backward pass (checkpointed): same
    # values, and the input gradient is the sum of the single twins' gradients
    xg = x[:3].clone().requires_grad_(True)
    got = pop(xg)
    np.testing.assert_allclose(got.detach().numpy(), out[:3].numpy(), rtol=1e-6)
    (got * torch.tensor([2.0, -1.0])).sum().backward()
    grads = []
    for site in (0, 1):
        xs = x[:3].clone().requires_grad_(True)
        recd.site_model(site)(xs).sum().backward()
        grads.append(xs.grad)
    np.testing.assert_allclose(xg.grad.numpy(), (2 * grads[0] - grads[1]).numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(IndexError, match=r"sites \[2\] out of range for 2 twins"):
        recd.population_model([0, 2])


def test_poisson_record_is_seeded_and_per_stimulus():
    recd, x, _ = _calibrated()
    ids = [f"img{i}" for i in range(30)]
    a = recd.record(x, ids, n_repeats=5, seed=7)
    b = recd.record(x, ids, n_repeats=5, seed=7)
    c = recd.record(x, ids, n_repeats=5, seed=8)
    assert a.responses.shape == (2, 30, 5)
    np.testing.assert_array_equal(a.responses, b.responses)
    assert not np.array_equal(a.responses, c.responses)
    assert np.all(a.responses == np.round(a.responses)) and a.responses.min() >= 0
    perm = np.random.default_rng(0).permutation(30)  # noise depends on the id, not the row
    p = recd.record(x[perm], [ids[i] for i in perm], n_repeats=5, seed=7)
    np.testing.assert_array_equal(p.select(stimuli=ids).responses, a.responses)
    many = recd.record(x[:3], ids[:3], n_repeats=4000, seed=1)
    exp = recd.expected(x[:3]).numpy().T
    np.testing.assert_allclose(many.responses.mean(axis=2), exp, rtol=0.05)
    np.testing.assert_allclose(many.responses.var(axis=2), exp, rtol=0.15)  # Poisson: var = mean
    # given the expected responses, the same trials are drawn around them (no second twin pass)
    e = recd.record(x, ids, n_repeats=5, seed=7, expected=recd.expected(x))
    np.testing.assert_array_equal(e.responses, a.responses)
    with pytest.raises(ValueError, match="expected responses have shape"):
        recd.record(x, ids, n_repeats=5, seed=7, expected=recd.expected(x[:4]))


def test_noise_none_returns_expected_exactly():
    recd, x, _ = _calibrated(noise="none")
    r = recd.record(x, [f"i{k}" for k in range(30)], n_repeats=1, seed=0)
    np.testing.assert_array_equal(r.responses[:, :, 0], recd.expected(x).numpy().T.astype(np.float64))
    with pytest.raises(ConfigError, match="followup_noise"):
        twins.TwinRecorder(ensemble=recd.ensemble, slope=recd.slope, intercept=recd.intercept, noise="gaussian")


def test_measured_noise_record_follows_the_fano_table():
    from synth.populations.trialnoise import FanoTable

    table = FanoTable(mean=(1.0, 10.0), fano=(0.9, 0.5), n=(100, 100), source="toy")
    ens, _ = _toy_ensemble(torch.float32)
    base, x, _ = _calibrated()
    recd = twins.TwinRecorder(ensemble=ens, slope=base.slope, intercept=base.intercept, noise="measured", fano=table)
    assert recd.noise_info() == {"model": "measured", "fano": table.as_dict()}
    assert base.noise_info() == {"model": "poisson", "fano": None}
    ids = [f"img{i}" for i in range(30)]
    a = recd.record(x, ids, n_repeats=5, seed=7)
    np.testing.assert_array_equal(a.responses, recd.record(x, ids, n_repeats=5, seed=7).responses)
    assert np.all(a.responses == np.round(a.responses)) and a.responses.min() >= 0
    assert not np.array_equal(a.responses, base.record(x, ids, n_repeats=5, seed=7).responses)
    many = recd.record(x[:3], ids[:3], n_repeats=6000, seed=1)
    exp = recd.expected(x[:3]).numpy().T.astype(np.float64)
    np.testing.assert_allclose(many.responses.mean(axis=2), exp, rtol=0.03)
    # under-dispersed: variance = Fano(mean) x mean, up to the binomial's whole number of trials
    np.testing.assert_allclose(many.responses.var(axis=2), table.at(exp) * exp, rtol=0.15)
    pos = exp > 0
    assert pos.sum() >= 3 and np.all(many.responses.var(axis=2)[pos] < 0.95 * exp[pos])
    with pytest.raises(ValueError, match="Fano table"):
        twins.TwinRecorder(ensemble=ens, slope=base.slope, intercept=base.intercept, noise="measured")
    with pytest.raises(ValueError, match="Fano table"):
        twins.TwinRecorder(ensemble=ens, slope=base.slope, intercept=base.intercept, fano=table)


def test_measured_noise_needs_single_trials_under_the_root(tmp_path):
    from synth.targets import build_target

    root = tmp_path / "root"
    (root / cowley.AVERAGED_DIR).mkdir(parents=True)
    np.save(cowley.averaged_path(root, "999001"), np.ones((2, 3)))
    tfile = REPO / "targets" / "cowley2023.yaml"
    with pytest.raises(ConfigError, match="params.followup_noise: followup_noise 'measured' needs a session with single-trial"):
        build_target(tfile, root=str(root), session="999001", overrides={"followup_noise": "measured"})
    with pytest.raises(ConfigError, match="params.followup_noise"):
        twins.measured_fano(root)
    (root / cowley.RAW_DIR).mkdir(parents=True)
    trials = np.random.default_rng(0).poisson(3.0, size=(2, 3, 10)).astype(float)
    np.save(cowley.raw_path(root, "999001"), np.concatenate([trials] * 10, axis=1)[:, :3])
    t = build_target(tfile, root=str(root), session="999001", overrides={"followup_noise": "measured"})
    assert t.followup_noise == "measured" and twins.raw_sessions(root) == ["999001"]
    table = twins.measured_fano(root, min_pairs=1)
    assert table.source == "999001: 2 sites x 3 images" and sum(table.n) == 6
    with pytest.raises(DataError, match=r"responses_999001.npy: no mean-count bin has 50"):
        twins.measured_fano(root)  # 6 (site, image) pairs: too few to measure a spread


def test_calibration_images_are_not_recomputed_and_reference_by_id(monkeypatch):
    recd, x, y = _calibrated(noise="none")
    full = recd.expected(x).numpy()
    by_id = recd.natural_expected(["img3", "img0"])
    np.testing.assert_allclose(by_id, full[[3, 0]], rtol=1e-5, atol=1e-4)
    calls = []
    real = recd.ensemble.outputs_cached

    def spy(images, cache=True):
        calls.append(int(images.shape[0]))
        return real(images, cache=False)

    monkeypatch.setattr(recd.ensemble, "outputs_cached", spy)
    new = _images(3, seed=9)
    both = recd.expected(torch.cat([x, new])).numpy()  # natural set + new images
    assert calls == [3]  # only the new images go through the twins
    np.testing.assert_allclose(both[:30], full, rtol=1e-6)
    with torch.no_grad():
        want = np.maximum(recd.ensemble(new).double().numpy() * recd.slope + recd.intercept, 0)
    np.testing.assert_allclose(both[30:], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match="not among the 30 images"):
        recd.natural_expected(["nope"])


def test_twin_outputs_are_cached_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(tmp_path / "cache"))
    ens, _ = _toy_ensemble(torch.float32)
    x = _images(4)
    first = ens.outputs_cached(x)
    files = list((tmp_path / "cache" / "twins").glob("*.npy"))
    assert len(files) == 1 and files[0].stem == ens.cache_key(x)

    def boom(*a, **k):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(ens, "forward", boom)
    np.testing.assert_array_equal(ens.outputs_cached(x), first)
    assert ens.cache_key(x) != ens.cache_key(x.flip(0))


def test_labels_and_features_in_one_pass_are_cached_as_labels(tmp_path, monkeypatch):
    """The feature pass gives the labels too: the same as ``expected``, for the images not
    known from calibration, and cached where ``expected`` looks for them."""
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(tmp_path / "cache"))
    recd, x, _ = _calibrated(noise="none")
    imgs = torch.cat([x[:2], _images(5, seed=9)])  # 2 calibration images, 5 new ones
    want_y = recd.expected(imgs)  # below the caching size: nothing written
    want_f = recd.ensemble.pooled_hidden(imgs, [3, 4], 2)
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(twins, "_CACHE_MIN", 1)
    calls = []
    real = recd.ensemble.pooled_hidden

    def spy(*a, **k):
        calls.append(k.get("with_outputs", False))
        return real(*a, **k)

    def boom(*a, **k):
        raise AssertionError("a second pass through the twins")

    monkeypatch.setattr(recd.ensemble, "pooled_hidden", spy)
    monkeypatch.setattr(recd.ensemble, "forward", boom)
    y, f = recd.expected_and_features(imgs, [3, 4], 2)
    torch.testing.assert_close(f, want_f, rtol=0, atol=0)
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
    assert len(list((tmp_path / "cache" / "twins").glob("*.npy"))) == 1  # the 5 new images' outputs
    torch.testing.assert_close(recd.expected(imgs), y, rtol=0, atol=0)  # read back, no pass
    y2, f2 = recd.expected_and_features(imgs, [3, 4], 2)  # labels cached: features only
    assert calls == [True, False]
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(f2, f, rtol=0, atol=0)
    known = recd.expected_and_features(x[:4], [4], 1)  # all seen at calibration: features only
    assert calls[-1] is False and known[1].shape == (4, sum(t.b4.shape[0] for t in recd.ensemble.twins))
    torch.testing.assert_close(known[0], recd.expected(x[:4]), rtol=0, atol=0)


def test_outputs_from_another_pass_are_remembered_where_expected_looks(tmp_path, monkeypatch):
    """``remember``: outputs computed elsewhere (a student's maps pass) are cached for the
    images not seen at calibration, so ``expected`` reads them and runs no twin."""
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(tmp_path / "cache"))
    recd, x, _ = _calibrated(noise="none")
    imgs = torch.cat([x[:2], _images(5, seed=9)])  # 2 calibration images, 5 new ones
    with torch.no_grad():
        raw = recd.ensemble(imgs).numpy()
    assert not recd.remember(imgs, raw)  # 5 images x 2 twins: below the caching size, as expected's
    monkeypatch.setattr(twins, "_CACHE_MIN", 1)
    with pytest.raises(ValueError, match=r"raw outputs have shape \(7, 3\), want \(7, 2\)"):
        recd.remember(imgs, np.zeros((7, 3)))
    marked = raw.copy()
    marked[:2] = 1e6  # rows of calibration images: never stored (calibration knows them)
    assert recd.remember(imgs, marked)
    assert not recd.remember(imgs, marked * 2)  # an existing entry is kept
    assert not recd.remember(x[:4], recd.ensemble(x[:4]).detach().numpy())  # all known from calibration

    def boom(*a, **k):
        raise AssertionError("a pass through the twins")

    monkeypatch.setattr(recd.ensemble, "forward", boom)
    got = recd.expected(imgs)
    want = torch.as_tensor(np.maximum(raw * recd.slope + recd.intercept, 0), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- real twins


@requires_cowley
def test_real_twins_match_reference():
    root = cowley_root()
    ens = twins.load_twins(root, "201025", neurons=[0, 5])
    assert list(ens.site_ids) == ["201025_n000", "201025_n005"]
    _, x, _ = cowley.load_session(root, "210305")  # any images will do
    x = x[:4]
    with torch.no_grad():
        ref = torch.stack([twins.compact_twin(twins.read_twin_state(f))(twins.preprocess(x, torch.float64)) for f in ens.files], 1)
        torch.testing.assert_close(ens(x).double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@requires_cowley
def test_real_twins_predict_their_neurons():
    """Known answer: twins of 201025 correlate with the recorded responses (README: 0.69).

    Also pins the numbering: twin file ``neuron<k>`` is row k (0-based); shifting by one
    destroys the correlation.
    """
    root = cowley_root()
    ids, x, rec = cowley.load_session(root, "201025")
    sel = np.arange(0, 1200, 5)  # 240 images spread over the session
    k = list(range(8))
    ens = twins.load_twins(root, "201025", neurons=k)
    with torch.no_grad():
        pred = ens(x[sel]).double().numpy()
    y = rec.mean()[:, sel]
    r = np.array([np.corrcoef(pred[:, i], y[i])[0, 1] for i in range(len(k))])
    r_shift = np.array([np.corrcoef(pred[:, i], y[i + 1])[0, 1] for i in range(len(k))])
    assert np.median(r) > 0.5, r
    assert np.median(r) > np.median(r_shift) + 0.2, (r, r_shift)


@requires_cowley
def test_published_running_var_already_holds_keras_eps():
    """Why BN_EPS is 1e-5: no stored variance is below Keras' 1e-3 (var + 1e-3 was saved)."""
    files = cowley.twin_files(cowley_root(), "201025")
    v = torch.cat([twins.read_twin_state(files[k])[f"layers.layer{i}_bn.running_var"] for k in range(0, 89, 8) for i in range(5)])
    assert float(v.min()) >= 1e-3
    assert float((v < 2e-3).double().mean()) > 0.02  # and many sit just above it


@requires_cowley
def test_load_twins_errors():
    root = cowley_root()
    with pytest.raises(DataError, match="no compact models for session 210305.*190923, 201025"):
        twins.load_twins(root, "210305")
    with pytest.raises(DataError, match="neuron89"):
        twins.load_twins(root, "201025", neurons=[89])
    assert twins.twin_sessions(root) == ["190923", "201025"]


@requires_cowley
def test_target_from_targets_file():
    from synth.populations.base import TARGETS
    from synth.targets import build_target

    assert "cowley2023" in TARGETS
    tfile = REPO / "targets" / "cowley2023.yaml"
    root = str(cowley_root())
    t = build_target(tfile, root=root)
    assert t.session == "201025" and t.site_ids.size == 89
    _, _, rec = cowley.load_session(root, "201025")
    assert list(t.site_ids) == list(rec.site_id)

    small = build_target(tfile, root=root, session="210305", overrides={"followup_noise": "none"})
    nat = small.natural(image_size=64, grayscale=True, seed=0)
    assert nat.images.shape == (400, 1, 64, 64)
    assert list(nat.stimulus_id) == list(nat.recording.stimulus_id)
    assert list(nat.recording.site_id) == list(small.site_ids)
    assert any(k.endswith("images_210305.zip") for k in nat.info["checksums"])
    with pytest.raises(ConfigError, match="target.session: session 210305 has no digital twins"):
        small.recorder()
    with pytest.raises(ConfigError, match="target.session.*no session '999999'"):
        build_target(tfile, root=root, session="999999")
    with pytest.raises(ConfigError, match="followup_noise"):
        build_target(tfile, root=root, overrides={"followup_noise": "gauss"})


@requires_cowley
@pytest.mark.slow
def test_full_recorder_201025():
    """All 89 twins calibrated on the 1200 natural images (minutes on one CPU core, once)."""
    from synth.targets import build_target

    t = build_target(REPO / "targets" / "cowley2023.yaml", root=str(cowley_root()))
    recd = t.recorder()
    assert list(recd.site_ids) == list(t.site_ids)
    assert 0.6 < recd.info["median_r"] < 0.8
    nat = t.natural(image_size=112, grayscale=False, seed=0)
    exp = recd.expected(nat.images[:50])
    r = [np.corrcoef(exp[:, i].numpy(), nat.recording.mean()[i, :50])[0, 1] for i in range(89)]
    assert np.nanmedian(r) > 0.4
