"""``synth validate``: score predictions against a follow-up recording; write a report folder.

``run_validate`` joins predictions and recordings on ``stimulus_id`` / ``site_id``,
computes per-site Pearson r, noise-corrected r^2 (Pospisil & Bair 2021) and split-half
reliability, their medians (optionally over reliable sites only) and, given a run folder,
the control outcomes of :mod:`synth.validation.control`; it writes ``DIR/report.json``
and ``DIR/report.html`` into a temporary sibling folder and renames it into place, so a
report folder is either complete or absent.

``closed_loop_report`` is the same computation for the pipeline (run folder in hand,
follow-up recording in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from synth.data.recordings import Recording
from synth.errors import DataError, UserError
from synth.validation.control import closed_loop_metrics
from synth.validation.io import Predictions, find_run_file, jsonable, load_recordings, read_manifest
from synth.validation.metrics import join, repeat_mean, site_metrics

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

METHODS = {
    "pearson_r": "Pearson r across images between the prediction and the repeat-mean response.",
    "r2_er": (
        "Noise-corrected r^2 (Pospisil & Bair 2021, PLoS Comput Biol 17:e1009212): "
        "((sum x y)^2 - s2/n sum x^2) / (sum x^2 sum y^2 - (m-1) s2/n sum x^2), x, y = mean-centred "
        "prediction and repeat mean over m images, s2 = mean over images of the across-repeat variance "
        "(ddof=1), n = median repeat count. Not clipped."
    ),
    "split_half_reliability": (
        "Pearson r across images between the means of two random halves of each image's repeats, "
        "Spearman-Brown corrected (2r/(1+r)), averaged over n_splits seeded splits."
    ),
    "medians": "Medians over included sites: pearson_r defined and, if min_reliability is set, reliability >= min_reliability.",
}


@dataclass
class FigureData:
    """What the HTML page plots beyond report.json (not serialized)."""

    site_id: np.ndarray
    predicted: np.ndarray  # (S, M)
    recorded: np.ndarray  # (S, M) repeat means
    run_dir: Path | None = None
    manifest: list[dict[str, str]] = field(default_factory=list)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _median(values: np.ndarray, mask: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)[mask]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def site_report(
    pred: Predictions,
    rec: Recording,
    *,
    min_reliability: float | None = None,
    n_splits: int = 20,
    seed: int = 0,
    pred_name: str = "predictions",
    rec_name: str = "recordings",
    unpredicted_ok: Sequence[str] = (),
) -> tuple[dict[str, Any], FigureData]:
    """Per-site metrics and their medians (the first half of report.json).

    ``unpredicted_ok``: recorded stimulus ids expected to lack a prediction (see
    :func:`~synth.validation.metrics.join`); they are counted but not warned about.

    Returns:
        (JSON-ready dict with ``matched``, ``median_pearson_r``, ``median_r2_er``,
        ``median_split_half_reliability``, ``n_sites_included``, ``excluded_sites``,
        ``per_site``, ...; the arrays the HTML page plots).
    """
    j = join(pred, rec, pred_name=pred_name, rec_name=rec_name, unpredicted_ok=unpredicted_ok)
    m = site_metrics(j.predicted, j.responses, n_splits=n_splits, seed=seed)
    r, rel = m["pearson_r"], m["split_half_reliability"]
    included = np.isfinite(r)
    reasons: list[str | None] = [None if ok else "pearson_r undefined (constant prediction or response, or < 2 images)" for ok in included]
    if min_reliability is not None:
        for i in range(r.size):
            if not included[i]:
                continue
            if not np.isfinite(rel[i]):
                included[i], reasons[i] = False, "split-half reliability undefined"
            elif rel[i] < min_reliability:
                included[i], reasons[i] = False, f"split-half reliability {rel[i]:.3f} < min_reliability {min_reliability:g}"
    per_site = [
        {
            "site_id": s,
            "pearson_r": r[i],
            "r2_er": m["r2_er"][i],
            "split_half_reliability": rel[i],
            "n_images": int(m["n_images"][i]),
            "median_repeats": m["median_repeats"][i],
            "included": bool(included[i]),
            "excluded_reason": reasons[i],
        }
        for i, s in enumerate(j.site_id)
    ]
    excluded = [{"site_id": p["site_id"], "reason": p["excluded_reason"]} for p in per_site if not p["included"]]
    if not included.any():
        log.warning("no site is in the medians (%d excluded: %s); the medians are undefined (null in report.json)",
                    len(excluded), excluded[0]["reason"] if excluded else "no sites")
    elif excluded:
        log.info("%d of %d sites excluded from the medians", len(excluded), len(per_site))
    out = {
        "matched": j.counts,
        "median_pearson_r": _median(r, included),
        "median_r2_er": _median(m["r2_er"], included),
        "median_split_half_reliability": _median(rel, included),
        "n_sites": len(per_site),
        "n_sites_included": int(included.sum()),
        "n_sites_excluded": len(excluded),
        "excluded_sites": excluded,
        "per_site": per_site,
    }
    fig = FigureData(site_id=j.site_id, predicted=j.predicted, recorded=repeat_mean(j.responses))
    return jsonable(out), fig


def load_run_predictions(run_dir: str | os.PathLike) -> tuple[Predictions, Predictions | None, list[dict[str, str]]]:
    """(natural.npz, stimuli.npz or None, manifest rows) of a run folder.

    Raises:
        UserError: the folder does not exist; DataError: natural.npz or manifest.csv missing/bad.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--stimuli {run}: not a folder (expected a synth run folder with manifest.csv, stimuli.npz, natural.npz)")
    man = find_run_file(run, "manifest.csv")
    if man is None:
        raise DataError(f"{run}: no manifest.csv (looked in {run} and {run / 'stimuli'})")
    nat = find_run_file(run, "natural.npz")
    if nat is None:
        raise DataError(f"{run}: no natural.npz (the model's predictions for the natural images)")
    stim = find_run_file(run, "stimuli.npz")
    if stim is None:
        log.warning("%s: no stimuli.npz; predicted control outcomes are left out", run)
    return Predictions.load(nat), (Predictions.load(stim) if stim else None), read_manifest(man)


def build_report(
    pred: Predictions,
    rec: Recording,
    *,
    run_dir: str | os.PathLike | None = None,
    natural_ids: Sequence[str] | None = None,
    min_reliability: float | None = None,
    n_bootstrap: int = 1000,
    n_splits: int = 20,
    seed: int = 0,
    pred_name: str = "predictions",
    rec_name: str = "recordings",
    unpredicted_ok: Sequence[str] = (),
) -> tuple[dict[str, Any], FigureData]:
    """Everything in report.json (plus the figure data), without writing files.

    With ``run_dir``, adds the control outcomes (``stretch``, ``one_hot``,
    ``synthetic_prediction``, ``natural``, ``bootstrap``) computed from the run's
    manifest, ``natural.npz`` + ``stimuli.npz`` predictions and ``rec``;
    ``natural_ids`` defaults to the ids in ``natural.npz``.
    """
    if n_bootstrap < 0:
        raise UserError(f"--n-bootstrap: expected an integer >= 0, got {n_bootstrap}")
    if n_splits < 10:
        raise UserError(f"n_splits: expected an integer >= 10 (split-half reliability averages over random splits), got {n_splits}")
    if min_reliability is not None and not (-1.0 <= float(min_reliability) <= 1.0):
        raise UserError(f"--min-reliability: expected a number in [-1, 1], got {min_reliability}")
    report, fig = site_report(pred, rec, min_reliability=min_reliability, n_splits=n_splits, seed=seed,
                              pred_name=pred_name, rec_name=rec_name, unpredicted_ok=unpredicted_ok)
    report["settings"] = {"min_reliability": min_reliability, "n_bootstrap": int(n_bootstrap), "n_splits": int(n_splits), "seed": int(seed)}
    report["methods"] = dict(METHODS)
    if run_dir is not None:
        nat_pred, stim_pred, manifest = load_run_predictions(run_dir)
        parts = [nat_pred] + ([stim_pred] if stim_pred is not None else [])
        both = Predictions.concat(parts) if len(parts) > 1 else nat_pred
        nat_ids = list(natural_ids) if natural_ids is not None else list(nat_pred.stimulus_id)
        control = closed_loop_metrics(rec, both, manifest, nat_ids, n_bootstrap=n_bootstrap, seed=seed)
        report.update(control)
        report["methods"]["control"] = (
            "stretch: target's best response to its stretch images vs its max over the natural set; one-hot: softmax over sites "
            "of natural-set z-scores, target's score vs the best natural image's; 95% CIs: percentile bootstrap over targets, "
            "repeats within images and natural images. Resampled repeats add noise to every natural image's mean, which "
            "raises the natural maximum in the bootstrap, so the intervals lean low (conservative) around the estimates."
        )
        fig.run_dir = Path(run_dir)
        fig.manifest = manifest
    return report, fig


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not an empty folder; synth never overwrites a report (choose a new path)")


def write_report(out: str | os.PathLike, report: Mapping[str, Any], fig: FigureData) -> Path:
    """Write report.json and report.html into ``out`` atomically (temp sibling + rename)."""
    from synth.validation.html import render_html

    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (tmp / REPORT_HTML).write_text(render_html(report, fig), encoding="utf-8")
        _check_out(out)
        os.replace(tmp, out)  # replaces an empty folder atomically on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_validate(
    predictions: str,
    recordings: str | os.PathLike | Sequence[str | os.PathLike],
    out: str,
    stimuli: str | None = None,
    *,
    min_reliability: float | None = None,
    n_bootstrap: int = 1000,
    n_splits: int = 20,
    seed: int = 0,
) -> dict:
    """``synth validate``: write ``out/report.json`` and ``out/report.html``.

    Args:
        predictions: ``.npz`` with ``stimulus_id`` (N,), ``site_id`` (S,), ``predicted`` (N, S).
        recordings: ``.npz`` (``stimulus_id``, ``site_id``, ``responses`` (S, M, R)
            NaN-padded) or long CSV ``stimulus_id,site_id,repeat,response``; or several such
            files, joined (:func:`~synth.validation.io.load_recordings`), e.g. the follow-up
            and the natural set's original recording.
        out: report folder to create (must not exist, or be empty).
        stimuli: a run folder (``manifest.csv``, ``natural.npz``, ``stimuli.npz``,
            ``stimuli/*.png``): adds the control outcomes and a stimulus montage.
        min_reliability: exclude sites with split-half reliability below this from the medians.
        n_bootstrap: bootstrap iterations for the control outcomes' 95% CIs.
        n_splits: random splits for the split-half reliability.
        seed: seed of splits and bootstrap.

    Returns:
        The report dict (as written to report.json; undefined values are None).

    Raises:
        UserError: ``out`` exists and is not empty, bad settings, missing run folder;
        DataError: unreadable or non-matching inputs.
    """
    out_p = Path(out)
    _check_out(out_p)
    pred = Predictions.load(predictions)
    files = [str(recordings)] if isinstance(recordings, (str, os.PathLike)) else [str(r) for r in recordings]
    rec = load_recordings(files)
    report, fig = build_report(
        pred, rec, run_dir=stimuli, min_reliability=min_reliability, n_bootstrap=n_bootstrap,
        n_splits=n_splits, seed=seed, pred_name=str(predictions), rec_name=" + ".join(files),
    )
    inputs = {"predictions": str(predictions), "recordings": files[0] if len(files) == 1 else files,
              "stimuli": None if stimuli is None else str(stimuli)}
    inputs["sha256"] = {str(p): _sha256(p) for p in (predictions, *files)}
    report = {"kind": "synth validate report", "inputs": inputs, **report}
    write_report(out_p, report, fig)
    def f3(v: float | None) -> str:
        return "undefined" if v is None else f"{v:.3f}"

    log.info("report written: %s (median r %s, median r2_er %s, median split-half reliability %s)", out_p / REPORT_HTML,
             f3(report["median_pearson_r"]), f3(report["median_r2_er"]), f3(report["median_split_half_reliability"]))
    return report


def closed_loop_report(
    run_dir: str | os.PathLike,
    followup: Recording,
    *,
    natural_ids: Sequence[str],
    n_bootstrap: int = 1000,
    min_reliability: float | None = None,
    seed: int = 0,
    n_splits: int = 20,
    html: bool = True,
) -> dict[str, Any]:
    """The pipeline's validate stage: the same figures as ``synth validate --predictions
    RUN/stimuli.npz --recordings FOLLOWUP --stimuli RUN``.

    Args:
        run_dir: the run folder being written (holds manifest.csv, stimuli.npz, natural.npz).
        followup: the follow-up recording (natural AND synthesized images).
        natural_ids: stimulus ids of the natural set.
        n_bootstrap, min_reliability, seed, n_splits: as in :func:`run_validate`.
        html: also write ``run_dir/report.html`` (atomically).

    Returns:
        JSON-ready dict to merge into the run's report.json: ``stretch``, ``one_hot``,
        ``synthetic_prediction``, ``natural``, ``bootstrap`` (as
        :func:`~synth.validation.control.closed_loop_metrics`) and ``validation`` (per-site
        r / r2_er / split-half reliability on the synthesized images and their medians).
    """
    run = Path(run_dir)
    stim = find_run_file(run, "stimuli.npz")
    if stim is None:
        raise DataError(f"{run}: no stimuli.npz")
    report, fig = build_report(
        Predictions.load(stim), followup, run_dir=run, natural_ids=natural_ids, min_reliability=min_reliability,
        n_bootstrap=n_bootstrap, n_splits=n_splits, seed=seed, pred_name=str(stim), rec_name="follow-up recording",
        unpredicted_ok=natural_ids,  # the follow-up also holds the natural set; stimuli.npz does not
    )
    control_keys = ("stretch", "one_hot", "synthetic_prediction", "natural", "bootstrap")
    out = {k: report[k] for k in control_keys if k in report}
    out["validation"] = {k: v for k, v in report.items() if k not in control_keys}
    if html:
        from synth.validation.html import render_html

        tmp = run / f".{REPORT_HTML}.tmp-{os.getpid()}"
        tmp.write_text(render_html(report, fig), encoding="utf-8")
        os.replace(tmp, run / REPORT_HTML)
    return out
