"""Did the judge choose well among a run's candidates? (``synth bench choice RUN_DIR``)

A run with a judge (``fit.judge``, ``stimuli.candidates_per_target``) synthesizes several
candidates per site and objective, keeps the ones the judge rates best, and leaves every
candidate in ``checkpoints/``. Where the follow-up recorder is simulated (digital twins,
the virtual population), its expected responses say how good each candidate really was.
This module reads the candidates back and names four choices of them, to be scored the
same way: the first ``keep`` of each target (what a run without a judge would have shown),
the judge's, the recorder's own best (the limit of any choice) and all candidates.
Simulation only: a real recording never shows the dropped candidates.

Example:
    >>> cands = read_candidates(run_dir, site_ids)                  # doctest: +SKIP
    >>> picks = selections(cands, judge_scores, true_scores, keep=3)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from synth.synthesis.jobs import parse_stimulus_id

#: the choices :func:`selections` names, in report order
SELECTIONS = ("first", "judge", "best", "all")


@dataclass(frozen=True)
class Candidates:
    """Every candidate image a run synthesized, in synthesis order.

    Attributes:
        stimulus_id: ``(N,)`` ids ``<objective>_<site>_s<rank>``.
        objective: ``(N,)`` ``"stretch"`` or ``"one_hot"``.
        target_site: ``(N,)`` the site each was made for.
        target_index: ``(N,)`` that site's index in the ``site_ids`` given to the reader.
        rank: ``(N,)`` the candidate's rank within its target (the ``k`` of ``_s<k>``).
        images: ``(N, C, H, W)`` float in [0, 1], exactly the saved 8-bit images.
    """

    stimulus_id: list[str]
    objective: list[str]
    target_site: list[str]
    target_index: np.ndarray
    rank: np.ndarray
    images: torch.Tensor

    def manifest(self, rows: Sequence[int]) -> list[dict[str, str]]:
        """Manifest rows (``stimulus_id``, ``objective``, ``target_site``) of the candidates ``rows``."""
        return [{"stimulus_id": self.stimulus_id[i], "objective": self.objective[i], "target_site": self.target_site[i]} for i in rows]


def read_candidates(run_dir: str | os.PathLike, site_ids: Sequence[str]) -> Candidates:
    """Every candidate of a finished run, from ``checkpoints/synthesis_batch_*.npz``.

    Args:
        run_dir: the run folder.
        site_ids: the run's sites (to parse the ids and index the targets).

    Raises:
        FileNotFoundError: no checkpoint files.
        ValueError: an id that is not a candidate id, or a repeated id.
    """
    files = sorted(Path(run_dir, "checkpoints").glob("synthesis_batch_*.npz"))
    if not files:
        raise FileNotFoundError(f"{Path(run_dir, 'checkpoints')}: no synthesis_batch_*.npz (the candidates)")
    ids: list[str] = []
    parts = []
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            ids.extend(str(s) for s in z["stimulus_id"])
            parts.append(z["images"])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{Path(run_dir, 'checkpoints')}: a candidate id appears twice")
    u8 = np.concatenate(parts)
    if u8.ndim == 3:  # grayscale saved without a channel axis
        u8 = u8[..., None]
    known = set(str(s) for s in site_ids)
    parsed = [parse_stimulus_id(s, known) for s in ids]
    index = {str(s): i for i, s in enumerate(site_ids)}
    return Candidates(
        stimulus_id=ids,
        objective=[p[0] for p in parsed],
        target_site=[p[1] for p in parsed],
        target_index=np.array([index[p[1]] for p in parsed], dtype=np.int64),
        rank=np.array([p[2] for p in parsed], dtype=np.int64),
        images=torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0,
    )


def selections(candidates: Candidates, judge_scores: np.ndarray, true_scores: np.ndarray, keep: int) -> dict[str, np.ndarray]:
    """The four choices of ``keep`` candidates per (objective, target), as candidate indices.

    Args:
        candidates: from :func:`read_candidates`.
        judge_scores: ``(N,)`` the judge's score of each candidate (``report.json → choice.scores``).
        true_scores: ``(N,)`` the same score on the recorder's expected responses
            (:func:`synth.synthesis.scoring.candidate_scores`).
        keep: images kept per target (``choice.kept_per_target``).

    Returns:
        ``{"first": ranks below keep, "judge": the judge's best, "best": the recorder's
        best, "all": every candidate}``, each sorted.
    """
    from synth.synthesis.scoring import choose_candidates

    n = len(candidates.stimulus_id)
    if np.shape(judge_scores) != (n,) or np.shape(true_scores) != (n,):
        raise ValueError(f"expected ({n},) judge and true scores, got {np.shape(judge_scores)} and {np.shape(true_scores)}")
    obj, tgt = candidates.objective, candidates.target_index
    return {
        "first": np.flatnonzero(candidates.rank < keep),
        "judge": choose_candidates(obj, tgt, judge_scores, keep),
        "best": choose_candidates(obj, tgt, true_scores, keep),
        "all": np.arange(n),
    }


def within_target_spearman(candidates: Candidates, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Spearman correlation of two scorings within each (objective, target), per objective.

    Returns:
        objective -> ``(targets,)`` correlations (NaN where a target has fewer than 3
        candidates or a constant scoring).
    """
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (o, t) in enumerate(zip(candidates.objective, candidates.target_index.tolist())):
        groups.setdefault((o, t), []).append(i)
    out: dict[str, list[float]] = {}
    for (o, _), idx in groups.items():
        x, y = np.asarray(a)[idx], np.asarray(b)[idx]
        ok = len(idx) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
        out.setdefault(o, []).append(float(spearmanr(x, y)[0]) if ok else float("nan"))
    return {o: np.asarray(v) for o, v in out.items()}


def judge_scores_of(choice: Mapping, ids: Sequence[str]) -> np.ndarray:
    """The judge's scores (``report.json → choice.scores``) in the order ``ids``.

    Raises:
        KeyError: a candidate the report has no score for (its first such id).
    """
    scores = choice["scores"]
    missing = [s for s in ids if s not in scores]
    if missing:
        raise KeyError(missing[0])
    return np.array([float(scores[s]) for s in ids])
