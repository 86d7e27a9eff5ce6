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


# --------------------------------------------------------------------------- view search


def test_start_views_begin_with_the_whole_image_and_grid_each_zoom():
    from synth.synthesis.starts import View, start_views

    assert start_views() == [View()]
    v = start_views((1.0, 1.5, 2.0), flips=True)
    assert v[0] == View() and len(v) == 2 * (1 + 9 + 9) and len(set(v)) == len(v)
    assert start_views((2.0,))[0] == View()  # the whole image is always there
    z2 = [w for w in start_views((2.0,)) if w.zoom == 2.0]
    assert sorted({w.x for w in z2}) == [-0.5, 0.0, 0.5] and sorted({w.y for w in z2}) == [-0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="zoom 0.5 out of range"):
        start_views((0.5,))


def test_views_enlarge_their_window_and_mirror_exactly():
    from synth.synthesis.starts import View, apply_views

    x = torch.zeros(2, 1, 16, 16)
    x[0, 0, :8, :8] = 1.0  # image 0: its top-left quadrant lit
    x[1] = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    views = [View(), View(2.0, -0.5, -0.5), View(2.0, 0.5, 0.5), View(1.0, 0.0, 0.0, True)]
    out = apply_views(x, views)
    assert out.shape == (8, 1, 16, 16)
    assert torch.equal(out[0], x[0]) and torch.equal(out[4], x[1])  # the whole image, bit for bit
    # top-left window at zoom 2: the lit quadrant fills the view (but for its bilinear edge)
    assert torch.equal(out[1, 0, :14, :14], torch.ones(14, 14)) and float(out[1].mean()) > 0.75
    assert float(out[2, 0, 1:, 1:].abs().max()) == 0.0 and float(out[2].mean()) < 0.01  # bottom-right window: dark
    assert torch.allclose(out[7], torch.flip(x[1], dims=[-1]), atol=1e-6)  # mirrored
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        apply_views(x[0], views)


def _corner_model(x: torch.Tensor) -> torch.Tensor:
    """Three 'sites': the mean of the top-left 4 x 4 corner, of the bottom-right one, of the whole image."""
    return torch.stack([x[:, :, :4, :4].mean((1, 2, 3)), x[:, :, -4:, -4:].mean((1, 2, 3)), x.mean((1, 2, 3))], dim=1)


def _patch_images(n: int = 12, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.2
    for i in range(n):  # a bright 4 x 4 patch somewhere inside
        r, c = torch.randint(2, 10, (2,), generator=g).tolist()
        x[i, 0, r : r + 4, c : c + 4] += 0.8
    return x


def test_the_view_search_starts_each_job_at_the_best_view_of_its_best_images():
    from synth.synthesis.starts import apply_views, search_natural_starts, start_views

    x = _patch_images()
    r = _corner_model(x)
    views = start_views((1.0, 1.5, 2.0), flips=True)
    jobs = [Job(f"{o}_{t}_{k}", o, t, k) for o in ("stretch", "one_hot") for t in range(3) for k in range(3)]
    src, view, starts = search_natural_starts(jobs, r, _corner_model, x, site_ids=SITES, views=views, candidates=5, chunk=64)
    assert starts.shape == (len(jobs), 1, 16, 16)
    for i in range(len(jobs)):  # each start is the view it names
        assert torch.equal(starts[i], apply_views(x[src[i] : src[i] + 1], [views[view[i]]])[0])
    for g in range(0, len(jobs), 3):  # a target's seeds start from different natural images, all among its 5 best
        assert len(set(src[g : g + 3].tolist())) == 3
    st = [j for j, job in enumerate(jobs) if job.objective == "stretch"]
    top5 = {t: set(torch.argsort(r[:, t], descending=True)[:5].tolist()) for t in range(3)}
    assert all(int(src[j]) in top5[jobs[j].target_site] for j in st)
    # the chosen view is the best view of its image, never worse than the whole image
    for j in st:
        t = jobs[j].target_site
        every = _corner_model(apply_views(x[src[j] : src[j] + 1], views))[:, t]
        assert float(_corner_model(starts[j : j + 1])[0, t]) == pytest.approx(float(every.max()))
        assert float(every.max()) >= float(every[0])
    # the corner sites are driven by moving the patch into their corner: views are used
    assert (view[[j for j in st if jobs[j].target_site < 2]] != 0).all()
    assert float(_corner_model(starts[:3])[:, 0].min()) > float(r[:, 0].max())


def test_the_whole_image_as_the_only_view_is_the_plain_natural_start():
    from synth.synthesis.starts import View, search_natural_starts

    x = _patch_images(seed=5)
    r = _corner_model(x)
    jobs = [Job(f"{o}_{t}_{k}", o, t, k) for o in ("stretch", "one_hot") for t in range(3) for k in range(4)]
    src, view, starts = search_natural_starts(jobs, r, _corner_model, x, site_ids=SITES, views=[View()], candidates=12)
    assert src.tolist() == rank_natural_starts(jobs, r, site_ids=SITES).tolist()
    assert (view == 0).all() and torch.equal(starts, x[torch.as_tensor(src)])
    # more jobs than candidates wrap around the candidates
    src2, _, _ = search_natural_starts(jobs[:4], r, _corner_model, x, site_ids=SITES, views=[View()], candidates=2)
    best = torch.argsort(r[:, 0], descending=True)[:2].tolist()
    assert src2.tolist() == best + best
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        search_natural_starts(jobs, r, _corner_model, x, site_ids=SITES, views=[View()], candidates=0)
