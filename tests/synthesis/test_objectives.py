import math

import pytest
import torch

from synth.configtools import from_dict
from synth.errors import ConfigError
from synth.synthesis import OBJECTIVES, Job, ObjectiveInputs, SynthesisConfig, build_objective, synthesize
from synth.synthesis.objectives import check_objective_spec

from .helpers import TinySurrogate, context_for, small_cfg


def _inputs(r, target, images=None, **kw):
    r = torch.as_tensor(r, dtype=torch.float32)
    b, s = r.shape
    return ObjectiveInputs(
        responses=r, images=torch.rand(b, 1, 4, 4) if images is None else images, target=torch.as_tensor(target),
        natural_mean=torch.zeros(s), natural_std=torch.ones(s), site_ids=[f"s{i}" for i in range(s)],
        background=torch.full((b,), 0.5), **kw,
    )


def test_stretch_and_suppress_pick_each_image_target():
    inp = _inputs([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [2, 0])
    assert OBJECTIVES.build("stretch")(inp).tolist() == [3.0, 4.0]
    assert OBJECTIVES.build("suppress")(inp).tolist() == [-3.0, -4.0]
    assert OBJECTIVES.build({"name": "stretch", "site": "s1"})(inp).tolist() == [2.0, 5.0]


def test_zscoring_uses_natural_statistics():
    inp = _inputs([[3.0, 0.0]], [0])
    inp.natural_mean = torch.tensor([1.0, 0.0])
    inp.natural_std = torch.tensor([2.0, 1.0])
    assert OBJECTIVES.build("stretch")(inp).tolist() == [1.0]
    assert OBJECTIVES.build({"name": "stretch", "zscore": False})(inp).tolist() == [3.0]


def test_one_hot_is_log_softmax_with_temperature():
    r = torch.tensor([[2.0, 0.0, 1.0]])
    inp = _inputs(r, [0])
    v = OBJECTIVES.build({"name": "one_hot", "temperature": 0.5})(inp)
    assert torch.allclose(v, torch.log_softmax(r / 0.5, 1)[:, 0])
    p = OBJECTIVES.build({"name": "one_hot", "log": False})(inp)
    assert torch.allclose(p, torch.softmax(r, 1)[:, 0])
    # raising the target raises it; raising another site lowers it
    up = OBJECTIVES.build("one_hot")(_inputs([[3.0, 0.0, 1.0]], [0]))
    other = OBJECTIVES.build("one_hot")(_inputs([[2.0, 0.0, 2.0]], [0]))
    assert float(up) > float(OBJECTIVES.build("one_hot")(inp)) > float(other)


def test_pattern_match_and_raise():
    inp = _inputs([[1.0, 2.0, 3.0]], [0])
    match = OBJECTIVES.build({"name": "pattern", "pattern": [1.0, 2.0, 3.0]})(inp)
    assert float(match) == 0.0
    off = OBJECTIVES.build({"name": "pattern", "pattern": [0.0, 2.0], "sites": ["s0", 1]})(inp)
    assert float(off) == pytest.approx(-0.5)
    rise = OBJECTIVES.build({"name": "pattern", "pattern": [1.0, -1.0], "sites": [2, 0], "mode": "raise"})(inp)
    assert float(rise) == pytest.approx((3.0 - 1.0) / 2)
    with pytest.raises(ConfigError, match="3 sites"):
        OBJECTIVES.build({"name": "pattern", "pattern": [1.0, 2.0]})(inp)


def test_diversity_penalizes_similarity_within_group_only():
    imgs = torch.stack([torch.full((1, 4, 4), 0.5) + torch.randn(1, 4, 4) * 0.1 for _ in range(3)])
    snap = torch.stack([imgs[0], imgs[0], -imgs[2] + 1.0])  # image 1 is a copy of 0; image 2 is image 2 inverted
    inp = _inputs(torch.zeros(3, 2), [0, 0, 1], images=imgs, group=torch.tensor([0, 0, 1]), snapshot=snap,
                  snapshot_group=torch.tensor([0, 0, 1]), index=torch.arange(3))
    v = OBJECTIVES.build("diversity")(inp)
    cos = torch.nn.functional.cosine_similarity((imgs[0] - 0.5).flatten(), (imgs[1] - 0.5).flatten(), dim=0)
    assert float(v[0]) == pytest.approx(-1.0, abs=1e-5)  # compares with snapshot row 1 (= its own copy)
    assert float(v[1]) == pytest.approx(-float(cos), abs=1e-5)
    assert float(v[2]) == 0.0  # alone in its group (itself excluded)


def test_arithmetic_composes_like_lucent():
    inp = _inputs([[1.0, 2.0]], [1])
    a, b = OBJECTIVES.build("stretch"), OBJECTIVES.build({"name": "stretch", "site": 0})
    assert float((a + b)(inp)) == 3.0
    assert float((a - b)(inp)) == 1.0
    assert float((2 * a - 1)(inp)) == 3.0
    assert float((-a / 2 + 5)(inp)) == 4.0
    assert float((1 - a)(inp)) == -1.0
    with pytest.raises(TypeError):
        a * b


def test_specs_lists_weights_and_aliases():
    inp = _inputs([[1.0, 2.0]], [1])
    obj = build_objective([{"name": "stretch"}, {"name": "suppress", "site": 0, "weight": 3.0}])
    assert float(obj(inp)) == 2.0 - 3.0
    aliased = build_objective("custom", {"custom": {"name": "stretch", "site": 0}})
    assert float(aliased(inp)) == 1.0
    with pytest.raises(ConfigError, match="unknown objective 'strech'.*did you mean 'stretch'"):
        check_objective_spec("strech")
    with pytest.raises(ConfigError, match="temprature"):
        check_objective_spec({"name": "one_hot", "temprature": 2})
    with pytest.raises(ConfigError, match="objectives.x"):
        from_dict(SynthesisConfig, {"objectives": {"x": {"name": "nope"}}})


@pytest.mark.parametrize("spec", ["stretch", "suppress", "one_hot", {"name": "pattern", "pattern": [2.0, -1.0], "sites": [0, 1], "mode": "raise"}])
def test_objective_improves_within_a_few_steps(spec):
    model = TinySurrogate(n_sites=4, channels=1, size=24)
    ctx = context_for(model, 1, 24)
    jobs = [Job(f"j{i}", spec, i, seed=i) for i in range(2)]
    res = synthesize(model, jobs, small_cfg(steps=15, lr=0.2, transforms=[], priors=[]), context=ctx, image_size=24, channels=1)
    h = res.history["objective"]
    assert h.shape == (2, 15)
    assert (h[:, -3:].mean(1) > h[:, :2].mean(1) + 0.05).all(), h


def test_diversity_makes_seeds_differ():
    model = TinySurrogate(n_sites=3, channels=1, size=24)
    ctx = context_for(model, 1, 24)
    cfg = small_cfg(steps=25, lr=0.2, transforms=[], priors=[], param={"name": "pixel"})
    jobs = [Job(f"j{i}", "stretch", 0, seed=100 + i) for i in range(3)]
    plain = synthesize(model, jobs, cfg, context=ctx, image_size=24, channels=1)
    div = [Job(f"j{i}", [{"name": "stretch"}, {"name": "diversity", "weight": 20.0}], 0, seed=100 + i) for i in range(3)]
    diverse = synthesize(model, div, cfg, context=ctx, image_size=24, channels=1)

    def mean_cos(u8):
        x = torch.as_tensor(u8).float().flatten(1)
        x = torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)
        c = x @ x.T
        return float((c.sum() - c.diagonal().sum()) / 6)

    assert mean_cos(diverse.images) < mean_cos(plain.images) - 0.05
