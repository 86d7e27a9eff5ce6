import logging

import numpy as np
import pytest
import torch

from synth.configtools import from_dict
from synth.errors import ConfigError
from synth.synthesis import ConstraintsConfig, Display, Job, image_stats, quantize, synthesize
from synth.synthesis.constraints import aperture_mask, rf_mask
from synth.data.stimuli import reload_images

from .helpers import TinySurrogate, context_for, small_cfg


def _display(size=24, channels=1, rf=False, **cfg):
    model = TinySurrogate(channels=channels, size=size)
    ctx = context_for(model, channels, size, rf=rf)
    return Display(from_dict(ConstraintsConfig, cfg), size=size, context=ctx), ctx


def _x(b=4, c=1, n=24, seed=0):
    return torch.rand(b, c, n, n, generator=torch.Generator().manual_seed(seed)) ** 2


def test_range_luminance_contrast_hold():
    disp, _ = _display(luminance=0.4, contrast=0.12, final_iters=60)
    y = disp(_x(), None, iters=60)
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    lum, con = image_stats(y)
    assert torch.allclose(lum, torch.full_like(lum, 0.4), atol=1e-3)
    assert torch.allclose(con, torch.full_like(con, 0.12), atol=1e-3)


def test_natural_values_are_the_default():
    disp, ctx = _display()
    assert disp.luminance == pytest.approx(ctx.luminance) and disp.contrast == pytest.approx(ctx.contrast)
    assert disp.background == pytest.approx(ctx.luminance)


def test_high_contrast_is_clipped_into_range_and_approximately_met():
    disp, _ = _display(luminance=0.3, contrast=0.3)
    y = disp(_x(), None, iters=100)
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.allclose(image_stats(y)[1], torch.full((4,), 0.3), atol=0.01)


def test_aperture_outside_equals_background_exactly():
    disp, _ = _display(luminance=0.45, contrast=0.1, aperture_radius=0.35, aperture_edge=0.1)
    mask = disp.mask(torch.zeros(4, dtype=torch.long))
    y = disp(_x(), mask, iters=40)
    n = 24
    c = (n - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    outside = torch.sqrt((yy - c) ** 2 + (xx - c) ** 2) / n >= 0.35 + 0.05
    assert torch.equal(y[:, 0][:, outside], torch.full_like(y[:, 0][:, outside], 0.45))
    inside = torch.sqrt((yy - c) ** 2 + (xx - c) ** 2) / n < 0.3
    assert float(y[:, 0][:, inside].std()) > 0.05
    assert torch.allclose(image_stats(y)[0], torch.full((4,), 0.45), atol=1e-3)


def test_aperture_mask_profile():
    m = aperture_mask(64, 0.3, 0.1)
    assert float(m[32, 32]) == 1.0 and float(m[0, 0]) == 0.0
    assert 0 < float(m[32, 32 + int(0.3 * 64)]) < 1  # on the soft edge
    assert float(aperture_mask(64, 0.3, 0.0)[32, 32 + 25]) == 0.0


def test_rf_mask_follows_the_target_site():
    disp, ctx = _display(rf=True, luminance=0.5, contrast=0.1, rf_mask=True, rf_threshold=0.5, rf_edge=0.05)
    rf = ctx.rf_masks
    m = disp.mask(torch.tensor([0, 1]))
    assert m.shape == (2, 1, 24, 24)
    for i in (0, 1):
        core = rf[i] >= 0.5
        assert torch.all(m[i, 0][core] == 1.0)
        far = rf_mask(rf[i : i + 1], 24, 0.5, 0.0)[0] == 0
        assert float(m[i, 0][far].min()) >= 0.0
    assert not torch.equal(m[0], m[1])
    y = disp(_x(b=2), m, iters=20)
    zero = m[:, 0] == 0
    assert torch.all(y[:, 0][zero] == 0.5)


def test_saved_png_meets_constraints_after_quantization(tmp_path):
    # through the whole engine and an 8-bit PNG round trip
    model = TinySurrogate(channels=1, size=24)
    ctx = context_for(model, 1, 24)
    cfg = small_cfg(constraints={"luminance": 0.42, "contrast": 0.15, "aperture_radius": 0.4, "aperture_edge": 0.08})
    res = synthesize(model, [Job(f"j{i}", "stretch", i, i) for i in range(3)], cfg, context=ctx, image_size=24, channels=1)
    back = reload_images(res.images)
    assert np.array_equal(back, res.images)
    x = back.astype(np.float64) / 255.0
    lum = x.reshape(3, -1).mean(1)
    con = x.reshape(3, -1).std(1)
    assert np.allclose(lum, 0.42, atol=1.5 / 255) and np.allclose(res.luminance, lum)
    assert np.allclose(con, 0.15, atol=1.5 / 255) and np.allclose(res.contrast, con)
    n = 24
    c = (n - 1) / 2
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    outside = np.sqrt((yy - c) ** 2 + (xx - c) ** 2) / n >= 0.4 + 0.04
    assert np.all(back[:, outside, 0] == round(0.42 * 255))


def test_unreachable_contrast_warns(caplog):
    disp, _ = _display(luminance=0.5, contrast=0.45, aperture_radius=0.15, aperture_edge=0.02, tolerance=0.01)
    y = disp(_x(), disp.mask(torch.zeros(4, dtype=torch.long)), iters=50)
    lum, con = image_stats(y)
    with caplog.at_level(logging.WARNING):
        disp.check(lum, con, ["a", "b", "c", "d"])
    assert "contrast" in caplog.text and float(con.max()) < 0.44


def test_free_luminance_and_contrast_is_identity_without_aperture():
    disp, _ = _display(luminance=None, contrast=None)
    x = _x()
    assert torch.equal(disp(x, None), x)


def test_quantize_rounds_to_nearest():
    x = torch.tensor([0.0, 0.5 / 255 - 1e-6, 1.0, 0.31]).view(1, 1, 1, 4)
    assert quantize(x).flatten().tolist() == [0, 0, 255, 79]


def test_config_errors():
    with pytest.raises(ConfigError, match="luminance"):
        from_dict(ConstraintsConfig, {"luminance": "bright"})
    with pytest.raises(ConfigError, match="contrast"):
        from_dict(ConstraintsConfig, {"contrast": 1.5})


def test_context_targets_are_the_natural_images_statistics_as_the_constraints_measure_them():
    from synth.synthesis import ObjectiveContext

    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = ObjectiveContext.from_predictions(["a"], np.ones((5, 1)), natural_images=x)
    lum, con = image_stats(x)
    assert ctx.luminance == pytest.approx(float(lum.mean()), abs=1e-7)
    assert ctx.contrast == pytest.approx(float(con.mean()), abs=1e-7)  # population sd, not the sample sd
    assert abs(ctx.contrast - float(x.flatten(1).std(1).mean())) > 1e-4
