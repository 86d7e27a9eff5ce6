"""Fixtures for the validation tests: simulated recordings, a run folder, the real data root."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.data.recordings import Recording
from synth.validation.io import Predictions

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _synth_logs_reach_caplog():
    """`synth.cli.main` (run in-process by other test files) sets propagate=False on the
    "synth" logger; caplog listens on the root logger, so restore propagation here."""
    logger = logging.getLogger("synth")
    before = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = before


def cowley_root() -> Path | None:
    """SYNTH_COWLEY_ROOT or ../shared/data/cowley2023_v4 relative to the repo root."""
    env = os.environ.get("SYNTH_COWLEY_ROOT")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "cowley2023_v4"
    return root if root.is_dir() else None


@pytest.fixture
def raw_210325() -> np.ndarray:
    root = cowley_root()
    f = None if root is None else root / "data_V4_responses" / "responses_raw" / "responses_210325.npy"
    if f is None or not f.exists():
        pytest.skip("Cowley 2023 V4 data not found (set SYNTH_COWLEY_ROOT or put it at ../shared/data/cowley2023_v4)")
    return np.load(f)


def simulate(n_sites=6, n_images=80, n_repeats=6, noise=1.0, seed=0):
    """Signal (S, N) and trial responses (S, N, R) = signal + Gaussian noise."""
    rng = np.random.default_rng(seed)
    signal = rng.gamma(2.0, 1.5, size=(n_sites, n_images))
    resp = signal[:, :, None] + rng.normal(0, noise, size=(n_sites, n_images, n_repeats))
    return signal, resp


def make_run(tmp_path: Path, *, n_sites=5, n_natural=40, n_repeats=5, noise=0.3, seed=0, grow=1.6):
    """A run folder (manifest.csv, natural.npz, stimuli.npz, stimuli/*.png) and its follow-up recording.

    Sites 0..n-1 have gamma-distributed natural responses; the stretch image of site t
    drives t to ``grow`` x (odd t) or 0.6 x (even t) its natural maximum; the one-hot image
    of t drives t to its natural max and the others to their means.
    """
    rng = np.random.default_rng(seed)
    sites = [f"site{i:02d}" for i in range(n_sites)]
    nat_ids = [f"nat{i:03d}" for i in range(n_natural)]
    nat_sig = rng.gamma(3.0, 2.0, size=(n_sites, n_natural)) + 1.0
    nmax, mu = nat_sig.max(1), nat_sig.mean(1)
    syn_ids, rows, syn_cols = [], [], []
    for t, s in enumerate(sites):
        st = np.array(mu)
        st[t] = nmax[t] * (grow if t % 2 else 0.6)
        oh = np.array(mu)
        oh[t] = nmax[t] * 1.05
        for kind, col in (("stretch", st), ("one_hot", oh)):
            sid = f"{kind}_{s}_s0"
            syn_ids.append(sid)
            syn_cols.append(col)
            rows.append({"stimulus_id": sid, "file": f"{sid}.png", "objective": kind, "target_site": s, "seed": "0"})
    syn_sig = np.stack(syn_cols, axis=1)
    signal = np.concatenate([nat_sig, syn_sig], axis=1)
    ids = nat_ids + syn_ids
    resp = signal[:, :, None] + rng.normal(0, noise, size=signal.shape + (n_repeats,))
    rec = Recording(stimulus_id=np.array(ids), site_id=np.array(sites), responses=resp)
    run = tmp_path / "run"
    (run / "stimuli").mkdir(parents=True)
    with open(run / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["stimulus_id", "file", "objective", "target_site", "seed"])
        w.writeheader()
        w.writerows(rows)
    for j, sid in enumerate(syn_ids):
        img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        img[: 4 + j % 20, :, 0] = 255
        Image.fromarray(img).save(run / "stimuli" / f"{sid}.png")
    # model predictions: the signal, rescaled (a model in other units) plus a little error
    pred_nat = Predictions(stimulus_id=np.array(nat_ids), site_id=np.array(sites),
                           predicted=(2.0 * nat_sig + rng.normal(0, 0.2, nat_sig.shape)).T)
    pred_syn = Predictions(stimulus_id=np.array(syn_ids), site_id=np.array(sites),
                           predicted=(2.0 * syn_sig + rng.normal(0, 0.2, syn_sig.shape)).T)
    pred_nat.save(run / "natural.npz")
    pred_syn.save(run / "stimuli.npz")
    return {"run": run, "recording": rec, "manifest": rows, "natural_ids": nat_ids, "syn_ids": syn_ids,
            "sites": sites, "pred_nat": pred_nat, "pred_syn": pred_syn, "signal": signal}
