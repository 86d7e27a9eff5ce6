from __future__ import annotations

import pytest
import torch

from _shared import cowley_root, random_twin_state, requires_cowley
from synth.cli import main
from synth.populations import twins
from synth.populations.twinbench import bench_twin_passes


def test_bench_times_three_passes_and_checks_the_single_pass_outputs():
    ens = twins.TwinEnsemble([random_twin_state([4, 6, 3, 5, 3], 0), random_twin_state([5, 3, 4, 3, 2], 1)], ["s_n000", "s_n001"])
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    lines: list[str] = []
    rounds = bench_twin_passes(ens, x, layers=[3, 4], grid=2, repeats=2, write=lines.append)
    assert len(rounds) == 2 and len(lines) == 2 and lines[1].startswith("round 2: outputs ")
    for r in rounds:
        assert min(r["outputs_s"], r["features_s"], r["one_pass_s"]) > 0
        assert r["ratio"] == pytest.approx((r["outputs_s"] + r["features_s"]) / r["one_pass_s"])
        assert r["max_abs_diff"] == 0.0  # the one pass computes exactly what forward does
    with pytest.raises(ValueError, match="repeats"):
        bench_twin_passes(ens, x, layers=[4], grid=1, repeats=0)


def test_one_pass_gives_the_outputs_even_for_features_of_lower_layers():
    """With outputs asked for, the pass runs on to layer 4 whatever the features' layers."""
    ens = twins.TwinEnsemble([random_twin_state([4, 6, 3, 5, 3], 0)], ["s_n000"])
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, y1 = ens.pooled_hidden(x, [3], 1, with_outputs=True)
        torch.testing.assert_close(y1, ens(x), rtol=0, atol=0)
        feats = ens.pooled_hidden(x, [3], 1)
    assert feats.shape == (2, 5)  # layer 3's 5 channels, 1 cell each


@requires_cowley
def test_bench_teachers_on_real_twins(capsys):
    assert main(["bench", "teachers", str(cowley_root()), "--session", "190923", "--images", "4", "--rounds", "1", "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("twins of 190923: 33, on 4 of its images, device cpu")
    assert out[1].startswith("round 1: outputs ") and out[1].endswith("max |diff| 0")
