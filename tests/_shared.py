"""Helpers shared by test packages: where the licensed Cowley 2023 data live.

The data (GPL-3.0) are never part of the repository: tests read them from
``$SYNTH_COWLEY_ROOT`` or ``<repo>/../shared/data/cowley2023_v4`` and skip when absent.

Usage (from a test package under tests/, which puts tests/ on sys.path)::

    from _shared import cowley_root, requires_cowley

    @requires_cowley
    def test_something():
        root = cowley_root()
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COWLEY_ENV = "SYNTH_COWLEY_ROOT"


def cowley_root() -> Path | None:
    """The Cowley 2023 data root, or None when it is not present.

    ``$SYNTH_COWLEY_ROOT`` if set, else ``<repo>/../shared/data/cowley2023_v4``; a folder
    counts as present when it holds ``data_V4_responses/``.
    """
    env = os.environ.get(COWLEY_ENV)
    root = Path(env).expanduser() if env else REPO.parent / "shared" / "data" / "cowley2023_v4"
    return root.resolve() if (root / "data_V4_responses").is_dir() else None


#: Skip marker for tests that need the licensed data.
requires_cowley = pytest.mark.skipif(
    cowley_root() is None,
    reason=(
        f"Cowley 2023 V4 data not found (set {COWLEY_ENV} or place them at ../shared/data/cowley2023_v4; "
        "users get them with `synth data fetch cowley2023`)"
    ),
)


def random_twin_state(counts: list[int], seed: int, *, unit_bn: bool = False):
    """A compact-model (digital twin) state dict with random weights, float64 like the published ones.

    ``unit_bn``: BatchNorm running statistics 0 (mean) and 1 (variance) instead of random.
    """
    import torch

    from synth.populations import twins

    g = torch.Generator().manual_seed(seed)
    state = twins.CompactTwin(counts).double().state_dict()
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v
        elif unit_bn and k.endswith("running_var"):
            out[k] = torch.ones_like(v)
        elif unit_bn and k.endswith("running_mean"):
            out[k] = torch.zeros_like(v)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g, dtype=v.dtype) * 2.0 + 1e-3  # some tiny: eps matters
        elif k.endswith("_bn.weight"):
            out[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        elif k.endswith("bias"):
            out[k] = 0.3 + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        elif k.startswith("layers.layer0_conv"):
            out[k] = 0.005 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    return out


def closest_natural(images, natural):
    """Index of the natural image each image correlates with most (Pearson r over pixels).

    Args:
        images: ``(M, ...)`` array or tensor; natural: ``(N, ...)`` with the same pixels per image.
    """
    import numpy as np

    a = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    b = np.asarray(natural, dtype=np.float64).reshape(len(natural), -1)
    a = (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)
    b = (b - b.mean(1, keepdims=True)) / b.std(1, keepdims=True)
    return (a @ b.T).argmax(1)
