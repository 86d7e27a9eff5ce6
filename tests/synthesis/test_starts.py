"""Natural starts: each job starts from the natural image that does best on its own objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synth.synthesis import Job, ObjectiveContext
from synth.synthesis.starts import rank_natural_starts

SITES = ["a", "b", "c"]


def _responses(n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, len(SITES)), generator=g) * torch.tensor([1.0, 5.0, 20.0])


def _softmax_z(r: torch.Tensor) -> torch.Tensor:
    """The one-hot objective's softmax, z-scored as the synthesis context z-scores."""
    ctx = ObjectiveContext.from_predictions(SITES, r)
    z = (r - ctx.natural_mean) / ctx.natural_std
    return torch.softmax(z, dim=1)


def test_stretch_seeds_take_the_target_sites_best_natural_images_in_order():
    r = _responses()
    jobs = [Job(f"st_{t}_{k}", "stretch", t, 100 + k) for t in range(3) for k in range(3)]
    idx = rank_natural_starts(jobs, r, site_ids=SITES)
    for t in range(3):
        want = torch.argsort(r[:, t], descending=True)[:3].tolist()
        assert idx[3 * t : 3 * t + 3].tolist() == want


def test_one_hot_ranks_by_the_softmax_of_z_scores_not_by_the_raw_response():
    r = _responses(seed=1)
    # image 0: the largest response of site 0, but every other site high too (a poor one-hot image)
    r[0] = torch.tensor([2.0, 10.0, 40.0])
    jobs = [Job(f"oh_{k}", "one_hot", 0, k) for k in range(4)]
    idx = rank_natural_starts(jobs, r, site_ids=SITES)
    want = torch.argsort(_softmax_z(r)[:, 0], descending=True)[:4].tolist()
    assert idx.tolist() == want
    assert 0 not in idx.tolist()
    assert rank_natural_starts([Job("s", "stretch", 0, 0)], r, site_ids=SITES).tolist() == [0]


def test_one_hot_ranks_with_the_synthesis_contexts_statistics():
    # Four natural images: the sample and the population standard deviation differ by
    # sqrt(4/3), enough to reorder this set's one-hot scores (seed found by search);
    # the ranking must z-score as the objective being climbed does.
    r = _responses(n=4, seed=44)
    sample_z = torch.softmax((r - r.mean(0)) / r.std(0), dim=1)[:, 0]
    want = torch.argsort(_softmax_z(r)[:, 0], descending=True).tolist()
    assert want != torch.argsort(sample_z, descending=True).tolist()
    jobs = [Job(f"oh_{k}", "one_hot", 0, k) for k in range(4)]
    assert rank_natural_starts(jobs, r, site_ids=SITES).tolist() == want


def test_groups_are_independent_of_other_jobs_and_aliases_resolve():
    r = _responses(seed=2)
    alone = rank_natural_starts([Job("x0", "stretch", 1, 0), Job("x1", "stretch", 1, 1)], r, site_ids=SITES)
    mixed = [Job("y", "one_hot", 1, 9), Job("x0", "stretch", 1, 0), Job("z", "stretch", 2, 3), Job("x1", "stretch", 1, 1)]
    idx = rank_natural_starts(mixed, r, site_ids=SITES)
    assert idx[[1, 3]].tolist() == alone.tolist()
    # a named objective (SynthesisConfig.objectives) ranks as its spec does
    aliased = rank_natural_starts([Job("q", "drive", 1, 0), Job("q1", "drive", 1, 1)], r, site_ids=SITES, aliases={"drive": "stretch"})
    assert aliased.tolist() == alone.tolist()
    # a suppressing objective takes the lowest responses
    low = rank_natural_starts([Job("s", "suppress", 2, 0)], r, site_ids=SITES)
    assert low.tolist() == [int(torch.argmin(r[:, 2]))]


def test_more_seeds_than_natural_images_wrap_around():
    r = _responses(n=3)
    idx = rank_natural_starts([Job(f"j{k}", "stretch", 0, k) for k in range(5)], r, site_ids=SITES)
    order = torch.argsort(r[:, 0], descending=True).tolist()
    assert idx.tolist() == order + order[:2]


def test_numpy_and_images_are_accepted():
    r = _responses(n=10)
    imgs = torch.rand(10, 1, 8, 8)
    a = rank_natural_starts([Job("a", "stretch", 2, 0)], r.numpy().astype(np.float64), site_ids=np.array(SITES), images=imgs, chunk=3)
    assert a.tolist() == [int(torch.argmax(r[:, 2]))]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"responses": torch.zeros(4)}, "must be (natural images, sites)"),
        ({"responses": torch.zeros(4, 2)}, "but site_ids has 3"),
        ({"responses": torch.full((4, 3), float("nan"))}, "NaN"),
        ({"images": torch.zeros(3, 1, 4, 4)}, "images has 3 natural images"),
        ({"jobs": [Job("bad", "stretch", 3, 0)]}, "target_site 3 out of range"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs, needle):
    args = {"jobs": [Job("a", "stretch", 0, 0)], "responses": torch.rand(4, 3), "site_ids": SITES, **kwargs}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        rank_natural_starts(**args)


def test_natural_statistics_are_the_population_mean_and_sd_in_float64():
    from synth.synthesis.jobs import natural_statistics

    r = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
    mean, std = natural_statistics(r)
    assert mean.dtype == std.dtype == torch.float32
    assert torch.equal(mean, torch.tensor([2.0, 2.0]))
    # population sd (not the sample's), + 1e-6 so that a constant site stays > 0
    assert torch.allclose(std, torch.tensor([np.sqrt(2 / 3) + 1e-6, 1e-6], dtype=torch.float32), rtol=0, atol=1e-7)
    assert torch.equal(natural_statistics(torch.as_tensor(r))[1], std)
    ctx = ObjectiveContext.from_predictions(["a", "b"], r)
    assert torch.equal(ctx.natural_mean, mean) and torch.equal(ctx.natural_std, std)
    with pytest.raises(ValueError, match="natural images, sites"):
        natural_statistics(np.zeros(3))
