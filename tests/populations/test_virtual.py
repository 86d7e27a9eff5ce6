import numpy as np
import pytest
import torch

from synth.data.natural import generate_natural_images
from synth.errors import ConfigError
from synth.populations.base import TARGETS, NaturalData, Recorder, Target
from synth.populations.virtual import VirtualParams, build_virtual_target


@pytest.fixture(scope="module")
def pop():
    return build_virtual_target(n_v4=6, n_it=2, n_images=40, n_repeats=3, seed=7)


@pytest.fixture(scope="module")
def images():
    return generate_natural_images(64, size=112, seed=123)


def test_registered_and_protocols(pop):
    assert TARGETS.get("virtual") is build_virtual_target
    assert isinstance(pop, Target)
    assert isinstance(pop.recorder(), Recorder)
    assert list(pop.site_ids) == ["v4_000", "v4_001", "v4_002", "v4_003", "v4_004", "v4_005", "it_000", "it_001"]
    assert list(pop.areas) == ["V4"] * 6 + ["IT"] * 2


def test_params_validation():
    with pytest.raises(ConfigError, match=r"params: unknown key 'n_v5' \(did you mean 'n_v4'\?\)"):
        build_virtual_target(n_v5=3)
    with pytest.raises(ConfigError, match=r"params.n_repeats: expected a value >= 1"):
        build_virtual_target(n_repeats=0)
    with pytest.raises(ConfigError, match=r"rate_min <= rate_max"):
        build_virtual_target(rate_min=5.0, rate_max=1.0)
    with pytest.raises(ConfigError, match=r"at least one site"):
        build_virtual_target(n_v4=0, n_it=0)
    with pytest.raises(ConfigError, match=r"params.seed: expected an integer"):
        build_virtual_target(seed="abc")


def test_expected_shape_dtype_positive(pop, images):
    e = pop.recorder().expected(images)
    assert e.shape == (64, 8) and e.dtype == torch.float32
    assert torch.isfinite(e).all() and (e > 0).all()
    # sites respond differently to different images, and differently from each other
    assert (e.std(0) > 0.1 * e.mean(0)).all()
    c = np.corrcoef(e.T.numpy())
    assert np.abs(c[np.triu_indices(8, 1)]).max() < 0.98


def test_any_display_size_same_geometry(pop, images):
    rec = pop.recorder()
    big = rec.expected(images[:16])
    small = rec.expected(torch.nn.functional.interpolate(images[:16], size=96, mode="bilinear", antialias=True))
    r = np.corrcoef(big.flatten().numpy(), small.flatten().numpy())[0, 1]
    assert r > 0.9


def test_grayscale_and_rgb_paths(pop):
    rgb = generate_natural_images(16, size=64, grayscale=False, seed=4)
    gray = generate_natural_images(16, size=64, grayscale=True, seed=4)
    rec = pop.recorder()
    e_rgb, e_gray = rec.expected(rgb), rec.expected(gray)
    e_rep = rec.expected(gray.expand(-1, 3, -1, -1))  # grey RGB = grayscale
    assert e_rgb.shape == e_gray.shape == (16, 8)
    assert torch.allclose(e_rep, e_gray, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(e_rgb, e_gray, rtol=1e-3)  # colour channels matter
    r = np.corrcoef(e_rgb.flatten().numpy(), e_gray.flatten().numpy())[0, 1]
    assert r > 0.7  # mostly shape-driven


def test_population_is_deterministic_in_its_seed(pop, images):
    a = pop.recorder().expected(images[:8])
    # same seed: the same sites (a site's identity does not depend on how many are simulated)
    b = build_virtual_target(n_v4=2, n_it=0, seed=7).recorder().expected(images[:8])
    c = build_virtual_target(n_v4=2, n_it=0, seed=8).recorder().expected(images[:8])
    assert torch.allclose(a[:, :2], b, rtol=1e-4, atol=1e-4)
    assert (b - c).abs().max() > 0.1


def test_record_noise_seeded_and_unbiased(pop, images):
    rec = pop.recorder()
    x = images[:6]
    ids = [f"s{i}" for i in range(6)]
    a = rec.record(x, ids, n_repeats=4, seed=1)
    b = rec.record(x, ids, n_repeats=4, seed=1)
    c = rec.record(x, ids, n_repeats=4, seed=2)
    assert a.responses.shape == (8, 6, 4)
    assert list(a.site_id) == list(pop.site_ids) and list(a.stimulus_id) == ids
    assert list(a.areas) == list(pop.areas)
    np.testing.assert_array_equal(a.responses, b.responses)
    assert not np.array_equal(a.responses, c.responses)
    assert (a.responses >= 0).all() and np.all(a.responses == np.round(a.responses))  # spike counts
    # repeats differ
    assert (a.responses.std(axis=2) > 0).mean() > 0.8
    # noise of a stimulus depends on its id, not on the other stimuli recorded with it
    d = rec.record(x[2:4], ids[2:4], n_repeats=4, seed=1)
    np.testing.assert_array_equal(d.responses, a.responses[:, 2:4])
    # the mean of many repeats approaches expected()
    many = rec.record(x[:2], ids[:2], n_repeats=3000, seed=3).mean()  # (S, 2)
    exp = rec.expected(x[:2]).numpy().T
    np.testing.assert_allclose(many, exp, rtol=0.08, atol=0.1)
    # given the expected responses, the same trials are drawn around them (no second pass)
    e = rec.record(x, ids, n_repeats=4, seed=1, expected=rec.expected(x))
    np.testing.assert_array_equal(e.responses, a.responses)
    doubled = rec.record(x, ids, n_repeats=4, seed=1, expected=2 * rec.expected(x))
    assert doubled.responses.mean() > 1.5 * a.responses.mean()
    with pytest.raises(ValueError, match="expected responses have shape"):
        rec.record(x, ids, n_repeats=4, seed=1, expected=rec.expected(x[:3]))


def test_noise_settings(images):
    p = build_virtual_target(n_v4=2, n_it=0, gain_noise=0.0, poisson=False, root="/nonexistent", session="12")  # root, session ignored
    rec = p.recorder()
    r = rec.record(images[:3], ["a", "b", "c"], n_repeats=2, seed=0)
    np.testing.assert_allclose(r.responses[:, :, 0], rec.expected(images[:3]).numpy().T.astype(np.float64), rtol=1e-6)
    np.testing.assert_array_equal(r.responses[:, :, 0], r.responses[:, :, 1])


def test_rf_locality(pop):
    """A stimulus confined far outside a V4 site's RF barely changes its response."""
    rec = pop.recorder()
    g = torch.Generator().manual_seed(0)
    base = torch.full((1, 1, 112, 112), 0.5)
    yy, xx = torch.meshgrid((torch.arange(112) + 0.5) / 112, (torch.arange(112) + 0.5) / 112, indexing="ij")
    checked = 0
    for i in range(6):
        cx, cy, s = pop.rf(f"v4_{i:03d}")
        # beyond 3 RF sigmas plus the reach of the coarsest V1 filters and subunit offsets
        far = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() > 3 * s + 0.25
        near = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() < 1.5 * s
        if far.float().mean() < 0.1:
            continue
        noise = (torch.rand(1, 1, 112, 112, generator=g) > 0.5).float()  # high-contrast texture
        img_far = torch.where(far, noise, base)
        img_near = torch.where(near, noise, base)
        e = rec.expected(torch.cat([base, img_far, img_near]))[:, i]
        assert abs(e[1] - e[0]) < 0.05 * abs(e[2] - e[0]) + 1e-3, (i, e)
        checked += 1
    assert checked >= 3


def test_natural(pop):
    nat = pop.natural(image_size=64, grayscale=True, seed=3)
    assert isinstance(nat, NaturalData)
    assert nat.images.shape == (40, 1, 64, 64) and nat.images.dtype == torch.float32
    assert torch.equal(nat.images, torch.round(nat.images * 255) / 255)  # 8-bit, as displayed
    assert list(nat.recording.stimulus_id) == list(nat.stimulus_id)
    assert list(nat.recording.site_id) == list(pop.site_ids)
    assert nat.recording.responses.shape == (8, 40, 3)
    again = pop.natural(image_size=64, grayscale=True, seed=3)
    assert torch.equal(nat.images, again.images)
    np.testing.assert_array_equal(nat.recording.responses, again.recording.responses)
    other = pop.natural(image_size=64, grayscale=True, seed=4)
    assert not torch.equal(nat.images, other.images)
    rgb = pop.natural(image_size=48, grayscale=False, seed=3)
    assert rgb.images.shape == (40, 3, 48, 48)


def test_rates_in_range_and_headroom(pop, images):
    e = pop.recorder().expected(images).numpy()
    m = e.mean(0)
    p = VirtualParams()
    assert (m > 0.5 * p.rate_min).all() and (m < 2.0 * p.rate_max).all()
    # no hard saturation: the best natural image is well below the rate ceiling
    ceiling = pop.model.ceiling.numpy()
    assert (e.max(0) < 0.6 * ceiling).all()


def test_gradient_ascent_exceeds_natural_max(pop, images):
    """Headroom: a few gradient steps on the true model beat the best natural image."""
    model = pop.model
    nat_max = pop.recorder().expected(images)[:, 0].max()
    p = torch.logit(images[:1].clamp(0.02, 0.98)).clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05)
    for _ in range(40):
        r = model(torch.sigmoid(p))[0, 0]
        opt.zero_grad()
        (-r).backward()
        opt.step()
    with torch.no_grad():
        assert model(torch.sigmoid(p))[0, 0] > nat_max


def test_recorder_device_is_kept_and_results_come_back_on_the_images_device(images):
    pop = build_virtual_target(n_v4=2, n_it=0, seed=7)
    rec = pop.recorder()
    assert rec.device is None  # at first: wherever the images are
    a = rec.expected(images[:4])
    assert pop.recorder(device="cpu") is rec and rec.device == torch.device("cpu")
    assert pop.recorder().device == torch.device("cpu")  # asking again leaves it where it is
    b = rec.expected(images[:4])
    assert b.device == images.device and torch.equal(a, b)
