"""synth.validation.choice: reading a run's candidates back and naming choices of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synth.synthesis.jobs import parse_stimulus_id, stimulus_id_of
from synth.validation.choice import Candidates, read_candidates, selections, within_target_spearman

SITES = ["a_n000", "a_n001"]


def test_parse_stimulus_id_inverts_stimulus_id_of_with_underscores_in_site_ids():
    assert parse_stimulus_id(stimulus_id_of("one_hot", "a_n001", 12), SITES) == ("one_hot", "a_n001", 12)
    assert parse_stimulus_id("stretch_a_n000_s0", SITES) == ("stretch", "a_n000", 0)
    for bad in ("stretch_b_n000_s0", "one_hot_a_n000", "flat_a_n000_s1", "stretch_a_n000_sx"):
        with pytest.raises(ValueError, match="is not <stretch|one_hot>_<site>_s<k>"):
            parse_stimulus_id(bad, SITES)


def _candidates(ids):
    parsed = [parse_stimulus_id(s, SITES) for s in ids]
    return Candidates(stimulus_id=list(ids), objective=[p[0] for p in parsed], target_site=[p[1] for p in parsed],
                      target_index=np.array([SITES.index(p[1]) for p in parsed]), rank=np.array([p[2] for p in parsed]),
                      images=torch.zeros(len(ids), 1, 4, 4))


def test_selections_name_the_first_the_judged_the_truly_best_and_all():
    ids = [f"{o}_{s}_s{k}" for o in ("stretch", "one_hot") for s in SITES for k in range(3)]
    c = _candidates(ids)
    judge = np.array([3.0, 2, 1, 1, 2, 3, 4, 4, 4, 9, 1, 2])
    truth = np.array([1.0, 2, 3, 3, 2, 1, 5, 0, 0, 0, 9, 1])
    got = selections(c, judge, truth, keep=1)
    assert got["first"].tolist() == [0, 3, 6, 9]
    assert got["judge"].tolist() == [0, 5, 6, 9]
    assert got["best"].tolist() == [2, 3, 6, 10]
    assert got["all"].tolist() == list(range(12))
    assert selections(c, judge, truth, keep=2)["best"].tolist() == [1, 2, 3, 4, 6, 7, 10, 11]  # ties: the earlier one
    with pytest.raises(ValueError, match="judge and true scores"):
        selections(c, judge[:3], truth, keep=1)
    rho = within_target_spearman(c, judge, truth)
    assert rho["stretch"].tolist() == pytest.approx([-1.0, -1.0])
    assert np.isnan(rho["one_hot"][0]) and rho["one_hot"][1] == pytest.approx(-1.0)  # a constant judge gives no correlation


def test_read_candidates_reads_every_batch_in_order(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    ids = ["stretch_a_n000_s0", "stretch_a_n000_s1", "stretch_a_n001_s0", "one_hot_a_n000_s0", "one_hot_a_n001_s1"]
    np.savez(ck / "synthesis_batch_0001.npz", stimulus_id=np.array(ids[3:]), images=imgs[3:])
    np.savez(ck / "synthesis_batch_0000.npz", stimulus_id=np.array(ids[:3]), images=imgs[:3])
    c = read_candidates(tmp_path, SITES)
    assert c.stimulus_id == ids and c.rank.tolist() == [0, 1, 0, 0, 1] and c.target_index.tolist() == [0, 0, 1, 0, 1]
    assert c.objective == ["stretch"] * 3 + ["one_hot"] * 2
    assert torch.equal((c.images * 255).round().to(torch.uint8), torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert c.manifest([4]) == [{"stimulus_id": ids[4], "objective": "one_hot", "target_site": "a_n001"}]
    np.savez(ck / "synthesis_batch_0002.npz", stimulus_id=np.array(ids[:1]), images=imgs[:1])
    with pytest.raises(ValueError, match="appears twice"):
        read_candidates(tmp_path, SITES)
    with pytest.raises(FileNotFoundError, match="no synthesis_batch"):
        read_candidates(tmp_path / "nothing", SITES)
