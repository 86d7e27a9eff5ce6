"""Fits on realistic data (minutes on CPU): run with ``pytest -m slow tests/surrogate``."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from synth.configtools import from_dict
from synth.runtime import derive_seed
from synth.surrogate.fit import FitConfig, fit_surrogate, pearson_columns, predict

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def cowley_root() -> Path | None:
    for p in (os.environ.get("SYNTH_COWLEY_ROOT"), REPO.parent / "shared" / "data" / "cowley2023_v4"):
        if p and (Path(p) / "data_V4_responses").is_dir():
            return Path(p)
    return None


def test_default_fit_on_virtual_population():
    """The default config (small_cnn from scratch) on the built-in virtual V4/IT population."""
    virtual = pytest.importorskip("synth.populations.virtual")
    tgt = virtual.build_virtual_target()
    nat = tgt.natural(image_size=112, grayscale=True, seed=derive_seed(0, "natural"))
    x = nat.images
    y = torch.as_tensor(nat.recording.mean().T, dtype=torch.float32)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    n_test, n_val = int(0.2 * len(perm)), int(0.1 * len(perm))
    te, va, tr = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    model, rep = fit_surrogate(from_dict(FitConfig, {}), (x[tr], y[tr]), (x[va], y[va]), site_ids=tgt.site_ids, seed=0)
    r = pearson_columns(predict(model, x[te]), y[te].numpy())
    assert np.nanmedian(r) >= 0.6, f"median test r {np.nanmedian(r):.3f}"
    # The readout masks find the hidden receptive fields (centres in image fractions).
    rf = model.receptive_fields().numpy()
    g = (np.arange(rf.shape[-1]) + 0.5) / rf.shape[-1]
    err = []
    for i, s in enumerate(tgt.site_ids):
        if not s.startswith("v4"):
            continue
        cx, cy, _ = tgt.rf(s)
        m = rf[i] ** 2 / (rf[i] ** 2).sum()
        err.append(np.hypot((m.sum(0) * g).sum() - cx, (m.sum(1) * g).sum() - cy))
    assert np.median(err) < 0.08


@pytest.mark.skipif(cowley_root() is None, reason="Cowley et al. 2023 data not found (set SYNTH_COWLEY_ROOT or put it at ../shared/data/cowley2023_v4)")
def test_small_cnn_on_cowley_session():
    """Real V4 data: fit on half of session 201025's images, test on the other half."""
    from synth.data.cowley import load_session

    _, x, rec = load_session(cowley_root(), "201025", image_size=112, grayscale=False)
    y = torch.as_tensor(rec.mean().T, dtype=torch.float32)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    half = x.shape[0] // 2
    tr, va, te = perm[: half - 100], perm[half - 100 : half], perm[half:]
    model, rep = fit_surrogate(from_dict(FitConfig, {}), (x[tr], y[tr]), (x[va], y[va]), site_ids=rec.site_id, seed=0)
    r = pearson_columns(predict(model, x[te]), y[te].numpy())
    assert np.nanmedian(r) >= 0.35, f"median test r {np.nanmedian(r):.3f}"
