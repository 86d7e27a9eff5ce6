import numpy as np
import pytest
import torch

from synth.configtools import from_dict, to_dict
from synth.errors import ConfigError
from synth.synthesis import Job, SynthesisConfig, Synthesizer, ValueStopper, synthesize

from .helpers import TinySurrogate, assert_images_equal, context_for, small_cfg

SIZE = 24


def _setup(channels=1, n_sites=4, rf=False):
    model = TinySurrogate(n_sites=n_sites, channels=channels, size=SIZE)
    return model, context_for(model, channels, SIZE, rf=rf)


def _jobs(n, n_sites=4):
    kinds = ["stretch", "one_hot", {"name": "one_hot", "temperature": 0.5}]
    return [Job(f"img{i}", kinds[i % 3], i % n_sites, seed=1000 + i) for i in range(n)]


@pytest.mark.parametrize("channels", [1, 3])
def test_result_contents(channels):
    model, ctx = _setup(channels)
    jobs = _jobs(4)
    res = synthesize(model, jobs, small_cfg(), context=ctx, image_size=SIZE, channels=channels)
    assert res.images.shape == (4, SIZE, SIZE, channels) and res.images.dtype == np.uint8
    assert list(res.stimulus_id) == [j.stimulus_id for j in jobs]
    assert res.steps.tolist() == [12] * 4
    assert res.predicted.shape == (4, 4)
    # reported values are those of the saved 8-bit images
    x = res.images_float()
    with torch.no_grad():
        r = model(x).numpy()
    assert np.allclose(res.predicted, r, atol=1e-5)
    assert np.allclose(res.target_response, r[np.arange(4), [j.target_site for j in jobs]], atol=1e-5)
    assert np.allclose(res.luminance, x.flatten(1).mean(1).numpy(), atol=1e-6)
    for k in ("loss", "objective", "target_response"):
        assert res.history[k].shape == (4, 12) and np.isfinite(res.history[k]).all()


def test_same_jobs_give_identical_images_and_seeds_matter():
    model, ctx = _setup()
    cfg = small_cfg()
    a = synthesize(model, _jobs(3), cfg, context=ctx, image_size=SIZE, channels=1)
    b = synthesize(model, _jobs(3), cfg, context=ctx, image_size=SIZE, channels=1)
    assert_images_equal(a.images, b.images)
    other = [Job(j.stimulus_id, j.objective, j.target_site, j.seed + 1) for j in _jobs(3)]
    c = synthesize(model, other, cfg, context=ctx, image_size=SIZE, channels=1)
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("split", [[4, 3], [1, 6], [2, 2, 3]])
def test_batch_split_invariance(split):
    # plateau stopping, default transforms and priors, mixed objectives, aperture: all per image
    model, ctx = _setup()
    cfg = small_cfg(steps=20, stopping={"rule": "plateau", "patience": 3, "min_steps": 4, "min_delta": 0.05},
                    constraints={"aperture_radius": 0.45})
    jobs = _jobs(7)
    whole = synthesize(model, jobs, cfg, context=ctx, image_size=SIZE, channels=1)
    parts, i = [], 0
    for n in split:
        parts.append(synthesize(model, jobs[i : i + n], cfg, context=ctx, image_size=SIZE, channels=1))
        i += n
    assert_images_equal(np.concatenate([p.images for p in parts]), whole.images)
    assert np.array_equal(np.concatenate([p.steps for p in parts]), whole.steps)
    assert np.array_equal(np.concatenate([p.objective_value for p in parts]), whole.objective_value)
    # order within a batch does not matter either
    rev = synthesize(model, jobs[::-1], cfg, context=ctx, image_size=SIZE, channels=1)
    assert_images_equal(rev.images[::-1], whole.images)


def test_long_runs_stay_batch_invariant_in_every_float():
    # past step 30 Adam's bias corrections once depended on how many images shared a chunk
    # (0.99 ** t rounds with the tensor's length): invisible in 8-bit images for many steps,
    # visible in the saved losses
    model, ctx = _setup()
    cfg = small_cfg(steps=40, batch_size=16)
    jobs = _jobs(20)  # whole: a chunk of 16 images and one of 4; halves: 10 and 10
    whole = synthesize(model, jobs, cfg, context=ctx, image_size=SIZE, channels=1)
    a = synthesize(model, jobs[:10], cfg, context=ctx, image_size=SIZE, channels=1)
    b = synthesize(model, jobs[10:], cfg, context=ctx, image_size=SIZE, channels=1)
    for k in ("loss", "objective", "target_response"):
        assert np.array_equal(np.concatenate([a.history[k], b.history[k]]), whole.history[k]), k
    assert_images_equal(np.concatenate([a.images, b.images]), whole.images)


def test_plateau_stops_images_independently_and_fixed_runs_all():
    model, ctx = _setup()
    cfg = small_cfg(steps=60, stopping={"rule": "plateau", "patience": 3, "min_steps": 5, "min_delta": 0.05})
    res = synthesize(model, _jobs(4), cfg, context=ctx, image_size=SIZE, channels=1)
    assert res.steps.min() >= 5 and res.steps.min() < 60
    for i, s in enumerate(res.steps):
        assert np.isfinite(res.history["objective"][i, :s]).all()
        assert np.isnan(res.history["objective"][i, s:]).all()


def test_value_stopper_stops_when_reached():
    model, ctx = _setup()
    jobs = _jobs(3)
    easy = torch.tensor([-1e9, -1e9, 1e9])
    st = ValueStopper(easy, every=2)
    res = synthesize(model, jobs, small_cfg(steps=10), context=ctx, image_size=SIZE, channels=1, stoppers=[st])
    assert res.steps.tolist() == [2, 2, 10]
    assert st.reached.tolist() == [True, True, False]


def test_rf_mask_blends_to_background_outside_the_target_rf():
    model, ctx = _setup(rf=True)
    cfg = small_cfg(constraints={"rf_mask": True, "rf_threshold": 0.5, "rf_edge": 0.02, "luminance": 0.5, "contrast": 0.05})
    res = synthesize(model, [Job("a", "stretch", 0, 1), Job("b", "stretch", 1, 2)], cfg, context=ctx, image_size=SIZE, channels=1)
    rf = ctx.rf_masks
    for i in range(2):
        far = (torch.nn.functional.max_pool2d((rf[i] >= 0.5).float()[None, None], 9, 1, 4)[0, 0] == 0).numpy()
        assert far.any()
        assert np.all(res.images[i, far, 0] == round(0.5 * 255))


def test_model_flags_are_restored_and_params_get_no_grad():
    model, ctx = _setup()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    synthesize(model, _jobs(2), small_cfg(steps=3), context=ctx, image_size=SIZE, channels=1)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_bf16_autocast_runs_on_cpu():
    model, ctx = _setup()
    res = synthesize(model, _jobs(2), small_cfg(steps=4, precision="bf16"), context=ctx, image_size=SIZE, channels=1)
    assert res.info["precision"] == "bf16" and np.isfinite(res.objective_value).all()


@pytest.mark.parametrize(
    "precision,flags,expected", [("auto", {"avx512_bf16"}, "bf16"), ("auto", {"avx2"}, "fp32"), ("fp16", {"avx512_bf16"}, "fp32")]
)
def test_auto_precision_follows_the_cpu(monkeypatch, precision, flags, expected):
    from synth import runtime

    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset(flags))
    model, ctx = _setup()
    res = synthesize(model, _jobs(2), small_cfg(steps=2, precision=precision), context=ctx, image_size=SIZE, channels=1)
    assert res.info["precision"] == expected


@pytest.mark.parametrize("opt", ["adam", "sgd", "nsgd"])
def test_optimizers_improve(opt):
    model, ctx = _setup()
    lr = {"adam": 0.2, "sgd": 50.0, "nsgd": 0.3}[opt]
    res = synthesize(model, _jobs(2)[:1], small_cfg(steps=15, lr=lr, optimizer=opt, transforms=[], priors=[]), context=ctx, image_size=SIZE, channels=1)
    h = res.history["objective"][0]
    assert h[-3:].mean() > h[:2].mean()


def test_bad_jobs():
    model, ctx = _setup()
    with pytest.raises(ValueError, match="duplicate"):
        synthesize(model, [Job("a", "stretch", 0, 1), Job("a", "stretch", 1, 2)], small_cfg(), context=ctx, image_size=SIZE, channels=1)
    with pytest.raises(ValueError, match="target_site 9"):
        synthesize(model, [Job("a", "stretch", 9, 1)], small_cfg(), context=ctx, image_size=SIZE, channels=1)
    with pytest.raises(ConfigError, match="unknown objective"):
        synthesize(model, [Job("a", "strech", 0, 1)], small_cfg(), context=ctx, image_size=SIZE, channels=1)


def test_config_defaults_round_trip_and_errors():
    cfg = SynthesisConfig()
    assert from_dict(SynthesisConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"transforms\[1\]: unknown transform 'jiter'"):
        from_dict(SynthesisConfig, {"transforms": ["pad", "jiter"]})
    with pytest.raises(ConfigError, match=r"priors\[0\].*weigth"):
        from_dict(SynthesisConfig, {"priors": [{"name": "tv", "weigth": 1}]})
    with pytest.raises(ConfigError, match="param"):
        from_dict(SynthesisConfig, {"param": {"name": "fourier", "decay": 2}})
    with pytest.raises(ConfigError, match="optimizer"):
        from_dict(SynthesisConfig, {"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="steps"):
        from_dict(SynthesisConfig, {"steps": 0})


def test_synthesizer_can_be_assembled_from_pieces():
    model, ctx = _setup()
    syn = Synthesizer.from_config(model, small_cfg(), context=ctx, image_size=SIZE, channels=1)
    assert syn.transforms.n_random > 0 and syn.batch_size == 3
    res = syn.run(_jobs(2))
    assert res.images.shape[0] == 2


def test_init_images_start_from_given_images():
    model, ctx = _setup(channels=3)
    jobs = _jobs(3)
    g = torch.Generator().manual_seed(3)
    start = torch.nn.functional.interpolate(torch.rand(3, 3, 6, 6, generator=g), size=SIZE, mode="bilinear") * 0.8 + 0.1
    cfg = small_cfg(steps=4, lr=0.01, constraints={"luminance": None, "contrast": None})
    near = synthesize(model, jobs, cfg, context=ctx, image_size=SIZE, channels=3, init_images=start).images_float()
    noise = synthesize(model, jobs, cfg, context=ctx, image_size=SIZE, channels=3).images_float()
    d_near = float((near - start).abs().mean())
    assert d_near < 0.03 < float((noise - start).abs().mean())
    # the optimization still moves away from the start towards the objective
    assert d_near > 0
    with pytest.raises(ValueError, match="one image per job"):
        synthesize(model, jobs, cfg, context=ctx, image_size=SIZE, channels=3, init_images=start[:2])
