import numpy as np
import pytest
import torch
import torch.nn as nn

from synth.synthesis.scoring import ensemble_guard, held_out_splits, score_with
from .helpers import TinySurrogate, natural_like


class Scaled(nn.Module):
    """Another 'surrogate': the same model's responses times a factor plus an offset, per site."""

    def __init__(self, base: nn.Module, factor: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.base, self.offset = base, offset
        self.register_buffer("factor", factor)

    def forward(self, x):
        return self.base(x) * self.factor + self.offset


def _u8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_score_with_uses_uint8_images_as_saved():
    m = TinySurrogate(4, channels=1)
    x = natural_like(3, 1, 24, seed=2)
    u8 = _u8(x)
    got = score_with(m, u8, batch_size=2)
    want = m(torch.as_tensor(u8).permute(0, 3, 1, 2).float() / 255).numpy()
    assert got.shape == (3, 4) and np.allclose(got, want, atol=1e-6)


def test_held_out_splits_partition_differently():
    train, val = np.arange(0, 30), np.arange(30, 36)
    t2, v2 = held_out_splits(train, val, seed=3)
    assert t2.size == train.size and v2.size == val.size
    assert set(val) <= set(t2)  # the primary's validation images are trained on
    assert set(v2) <= set(train) and not set(v2) & set(t2)
    assert np.array_equal(held_out_splits(train, val, seed=3)[1], v2)
    assert not np.array_equal(held_out_splits(train, val, seed=4)[1], v2)
    with pytest.raises(ValueError):
        held_out_splits(np.arange(3), np.arange(3, 6), seed=0)


def test_ensemble_guard_scale_free_and_flags_disagreement():
    m = TinySurrogate(4, channels=1)
    nat = natural_like(30, 1, 24, seed=1)
    imgs = _u8(natural_like(6, 1, 24, seed=5))
    x = torch.as_tensor(imgs).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        pred, nat_p = m(x).numpy(), m(nat).numpy()
    targets = np.array([0, 1, 2, 3, 0, 1])
    # a held-out model that is the same up to per-site scale and offset agrees everywhere
    same = Scaled(m, torch.tensor([2.0, 0.5, 3.0, 1.0]), offset=1.0)
    with torch.no_grad():
        nat_s = same(nat).numpy()
    out = ensemble_guard(same, imgs, targets, pred, nat_p, nat_s)
    assert out["held_out_predicted"].shape == (6, 4)
    assert np.allclose(out["held_out_target_z"], out["target_z"], atol=1e-4)
    assert out["models_agree"].tolist() == [1] * 6
    # a held-out model with the opposite tuning disagrees wherever the primary moved the target
    flip = Scaled(m, torch.full((4,), -1.0))
    with torch.no_grad():
        nat_f = flip(nat).numpy()
    out = ensemble_guard(flip, imgs, targets, pred, nat_p, nat_f)
    moved = np.abs(out["target_z"]) > 1e-3
    assert moved.any() and not out["models_agree"][moved].any()
    with pytest.raises(ValueError):
        ensemble_guard(same, imgs, targets[:3], pred, nat_p, nat_s)


def test_ensemble_guard_z_scores_as_the_synthesis_objective_does():
    # target_z is the z-score the synthesis objective climbed: the synthesis context's
    # statistics (population sd + 1e-6), also for a site whose natural predictions never vary
    from synth.synthesis import ObjectiveContext

    m = TinySurrogate(2, channels=1)
    imgs = _u8(natural_like(2, 1, 24, seed=5))
    pred = np.array([[3.0, 1.5], [2.0, 4.0]])
    nat = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])  # site 1 is constant over the natural set
    out = ensemble_guard(m, imgs, np.array([0, 1]), pred, nat, nat)
    ctx = ObjectiveContext.from_predictions(["a", "b"], nat)
    want = (pred - ctx.natural_mean.double().numpy()) / ctx.natural_std.double().numpy()
    assert np.allclose(out["target_z"], [want[0, 0], want[1, 1]], rtol=1e-6)
    assert abs(out["target_z"][1] - 2.0 / 1e-6) < 1.0  # not 2 / 1e-9
    with pytest.raises(ValueError, match="at least one image"):
        ensemble_guard(m, imgs, np.array([0, 1]), pred, nat[:0], nat)


def test_candidate_scores_are_the_validation_scores_of_the_predictions():
    from synth.synthesis.scoring import candidate_scores
    from synth.validation.control import one_hot_scores

    rng = np.random.default_rng(0)
    nat, pred = rng.gamma(2.0, 1.0, (40, 4)), rng.gamma(2.0, 1.0, (5, 4))
    objectives, targets = ["stretch", "one_hot", "one_hot", "stretch", "one_hot"], np.array([0, 1, 3, 2, 0])
    got = candidate_scores(objectives, targets, pred, nat)
    soft = one_hot_scores(nat.T, pred.T)[1]
    want = [pred[i, t] if o == "stretch" else soft[t, i] for i, (o, t) in enumerate(zip(objectives, targets))]
    assert np.allclose(got, want)
    assert 0 < got[1] < 1 and got[0] == pred[0, 0]
    with pytest.raises(ValueError, match="unknown objective 'other'"):
        candidate_scores(["other"], np.array([0]), pred[:1], nat)
    with pytest.raises(ValueError, match="expected"):
        candidate_scores(objectives, targets[:2], pred, nat)


def test_choose_candidates_keeps_the_best_of_each_objective_and_target():
    from synth.synthesis.scoring import choose_candidates

    objectives = ["stretch"] * 3 + ["one_hot"] * 3 + ["stretch"] * 3
    targets = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    scores = np.array([1.0, 3.0, 2.0, 0.1, 0.1, 0.5, np.nan, 7.0, 7.0])
    assert choose_candidates(objectives, targets, scores, keep=1).tolist() == [1, 5, 7]  # ties: the earlier image
    assert choose_candidates(objectives, targets, scores, keep=2).tolist() == [1, 2, 3, 5, 7, 8]  # NaN scores last
    assert choose_candidates(objectives, targets, scores, keep=5).tolist() == list(range(9))
    with pytest.raises(ValueError, match="keep must be >= 1"):
        choose_candidates(objectives, targets, scores, keep=0)
