"""Timing of the teachers' passes: outputs, pooled hidden layers, both in one pass.

``synth bench teachers`` prints what feature distillation (``fit.core.distill_features``)
costs before the core trains: the twins' outputs alone (the labels), their pooled hidden
layers alone (the feature targets), and both from one pass through their layers (what
``TwinRecorder.expected_and_features`` does), on the same images.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from synth.populations.twins import TwinEnsemble


def bench_twin_passes(ensemble: TwinEnsemble, images: torch.Tensor, *, layers: Sequence[int], grid: int, repeats: int = 2,
                      write: Callable[[str], None] = lambda line: None) -> list[dict[str, Any]]:
    """Time the twins' outputs, features and both in one pass, ``repeats`` times in turn.

    Args:
        ensemble: the twins (on the device to time).
        images: ``(N, C, H, W)`` in [0, 1].
        layers, grid: the feature targets' layers and cells per side (``pooled_hidden``).
        repeats: rounds of the three passes.
        write: receives one line per round.

    Returns:
        one dict per round: ``outputs_s``, ``features_s``, ``one_pass_s``, ``ratio`` (the two
        passes' time over the one pass's) and ``max_abs_diff`` (the one pass's outputs
        against ``forward``'s: 0 when they are the same computation).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if ensemble._device().type == "cuda" else (lambda: None)

    def timed(f):
        sync()
        t0 = time.perf_counter()
        out = f()
        sync()
        return out, time.perf_counter() - t0

    rounds = []
    with torch.no_grad():
        for k in range(repeats):
            y, t_out = timed(lambda: ensemble(images))
            _, t_feat = timed(lambda: ensemble.pooled_hidden(images, layers, grid))
            (_, y1), t_both = timed(lambda: ensemble.pooled_hidden(images, layers, grid, with_outputs=True))
            r = {"outputs_s": t_out, "features_s": t_feat, "one_pass_s": t_both, "ratio": (t_out + t_feat) / t_both,
                 "max_abs_diff": float((y1 - y).abs().max()) if y.numel() else 0.0}
            rounds.append(r)
            write(f"round {k + 1}: outputs {t_out:.2f} s, features {t_feat:.2f} s, both in one pass {t_both:.2f} s; "
                  f"two passes / one pass = {r['ratio']:.2f}; one pass's outputs vs forward: max |diff| {r['max_abs_diff']:.3g}")
    return rounds
