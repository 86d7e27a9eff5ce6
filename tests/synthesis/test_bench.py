import math

import pytest
import torch

pytest.importorskip("lucent.optvis.render", reason="torch-lucent (and ipython) not installed; the benchmark needs them")

from synth.synthesis.bench import StandInSurrogate, bench_synthesis  # noqa: E402


def test_stand_in_surrogate_contract():
    m = StandInSurrogate(5, channels=3, seed=1)
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    r = m(x)
    assert r.shape == (2, 5) and bool((r > 0).all())
    r[:, 0].sum().backward()
    assert float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in m.parameters()) and not m.training
    assert torch.equal(StandInSurrogate(5, channels=3, seed=1)(x.detach()), m(x.detach()))
    assert m.receptive_fields().shape == (5, 14, 14)


def test_bench_runs_and_reports(tmp_path):
    torch.manual_seed(0)
    lines = []
    out = bench_synthesis("cpu", image_size=32, n_sites=3, steps=6, seed=0, write=lines.append, check_every=2, precision="fp32")
    assert lines[-1].startswith("speedup_vs_lucent: ")
    assert float(lines[-1].split(": ")[1]) == pytest.approx(out["speedup"], rel=0.01)
    assert any(l.startswith("lucent render_vis") for l in lines) and any(l.startswith("synth:") for l in lines)
    assert len(out["lucent_objective"]) == 3 and all(math.isfinite(v) for v in out["lucent_objective"])
    assert 0 <= out["reached"] <= 3 and max(out["synth_steps"]) <= 6
