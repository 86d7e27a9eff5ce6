"""The closed loop, stage by stage; the only module that knows the order of stages.

record (target.natural) -> fit (surrogate) -> synthesize (stimulus set on disk)
-> follow-up (target.recorder on the saved PNGs) -> validate (report.json)

Stages talk through files in the run folder and small typed objects; each stage's output
is a checkpoint, so ``--resume`` redoes only what is missing.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from synth.config import Config, config_files, dump_config, load_config, resolve_path
from synth.data.recordings import Recording
from synth.errors import DataError, UserError
from synth.populations.base import NaturalData, Target
from synth.rundir import RunDir, atomic_write_text
from synth.runtime import derive_seed, file_sha256, resolve_device, resolve_precision, seed_everything, versions

log = logging.getLogger(__name__)

RESOLVED = "config.resolved.yaml"


@dataclass
class Splits:
    """Indices into the natural set (seeded permutation)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class Timer:
    """Seconds per stage."""

    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                log.info("stage %s ...", name)

            def __exit__(self, *exc):
                timer.seconds[name] = round(timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0, 3)
                if exc[0] is None:
                    log.info("stage %s done in %.1f s", name, timer.seconds[name])

        return _Ctx()


def make_splits(n: int, fractions: dict[str, float], seed: int) -> Splits:
    """Split ``n`` natural images into train/val/test by a seeded permutation.

    Raises:
        DataError: if a split would be empty.
    """
    rng = np.random.default_rng(derive_seed(seed, "split"))
    perm = rng.permutation(n)
    n_test = int(round(fractions["test"] * n))
    n_val = int(round(fractions["val"] * n))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    for name, idx in (("train", train), ("val", val), ("test", test)):
        if idx.size < 2:
            raise DataError(f"the {name} split of the natural set would have {idx.size} images ({n} images in all); adjust fit.split")
    return Splits(np.sort(train), np.sort(val), np.sort(test))


def check_natural(nat: NaturalData, cfg: Config, source: str) -> None:
    """Catch data problems before any work: sizes, modes, NaN/inf, id mismatches."""
    x = nat.images
    c = 1 if cfg.data.grayscale else 3
    if x.ndim != 4 or x.shape[1] != c or x.shape[2] != cfg.data.image_size or x.shape[3] != cfg.data.image_size:
        raise DataError(f"{source}: natural images have shape {tuple(x.shape)}, expected (N, {c}, {cfg.data.image_size}, {cfg.data.image_size})")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{source}: natural images must be finite values in [0, 1]")
    rec = nat.recording
    if list(rec.stimulus_id) != [str(s) for s in nat.stimulus_id]:
        raise DataError(f"{source}: recording stimulus ids do not match the natural images")
    if x.shape[0] != rec.n_stimuli:
        raise DataError(f"{source}: {x.shape[0]} images but responses for {rec.n_stimuli}")
    m = rec.mean()
    if not np.isfinite(m).all():
        bad = int((~np.isfinite(m)).sum())
        raise DataError(f"{source}: {bad} repeat-averaged responses are NaN/inf (every image needs at least one repeat)")


def _target_source(cfg: Config) -> str:
    return cfg.target.file


def load_target(cfg: Config, config_dir: str | None = None) -> Target:
    """Build the target named in the config."""
    from synth.targets import build_target

    path = resolve_path(cfg.target.file, relative_to=config_dir)
    if not path.exists():
        from synth.errors import ConfigError

        raise ConfigError(f"targets file not found: {cfg.target.file}", key="target.file")
    return build_target(path, root=cfg.target.root, session=cfg.target.session, overrides=cfg.target.params)


def input_checksums(cfg: Config, config_path: str | None, nat: NaturalData) -> dict[str, str]:
    """SHA-256 of every input file (config, targets file, data files named by the target)."""
    out: dict[str, str] = {}
    if config_path and os.path.exists(config_path):
        for f in config_files(config_path):  # the file and any base files it builds on
            out[f] = file_sha256(f)
    tfile = resolve_path(cfg.target.file, relative_to=os.path.dirname(config_path) if config_path else None)
    if tfile.exists():
        out[str(tfile)] = file_sha256(tfile)
    for k, v in (nat.info.get("checksums") or {}).items():
        out[str(k)] = str(v)
    return out


def _save_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _median_r(pred: np.ndarray, rec: Recording) -> tuple[float, np.ndarray]:
    from synth.validation.metrics import pearson_per_site

    r = pearson_per_site(pred.T, rec.mean())
    return float(np.nanmedian(r)), r


def run_pipeline(cfg: Config, *, config_path: str | None = None, out: str | None = None, resume: str | None = None) -> Path:
    """Run the closed loop; returns the finished run folder.

    Args:
        cfg: validated config.
        config_path: the file it came from (for checksums and relative paths).
        out: run folder to create (default ``outputs/<timestamp>_<name>``).
        resume: an unfinished ``*.partial`` run folder to complete instead.
    """
    timer = Timer()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(False)
    config_dir = os.path.dirname(os.path.abspath(config_path)) if config_path else None

    # ---- record: everything that can fail on bad input happens before the run folder exists
    with timer("record"):
        target = load_target(cfg, config_dir)
        nat, splits = load_natural(cfg, target)
        recipes = list(cfg.fit.members())  # the surrogate's recipe, then any ensemble members', then any judge
        n_members = len(recipes)
        if cfg.fit.judge is not None:
            recipes.append(cfg.fit.judge_recipe())
        fits = [resolve_twin_backbone(f, target) for f in recipes]
        core_plans = [plan_core_stage(cfg, target, fit) for fit in fits]
        recorder = target.recorder(device=device)

    run = RunDir.open_partial(resume) if resume else RunDir.create(cfg.name, out)
    _attach_log(run.path("run.log"))
    try:
        log.info("run folder (unfinished until renamed): %s", run.work)
        dump_config(cfg, run.path(RESOLVED))
        provenance = {
            "versions": versions(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "seed": cfg.seed,
            "derived_seeds": {k: derive_seed(cfg.seed, k) for k in ("natural", "split", "refit_split", "core", "fit", "followup", "bootstrap")},
            "target": {"name": target.name, "n_sites": int(len(target.site_ids))},
            "inputs_sha256": input_checksums(cfg, config_path, nat),
            "natural_info": {k: v for k, v in nat.info.items() if k != "checksums"},
            "torch_threads": torch.get_num_threads(),
            "synthesis_precision": resolve_precision(cfg.synthesis.precision, device),
        }
        _save_json(run.path("provenance.json"), provenance)
        core_reports: list[dict[str, Any] | None] = [None] * len(fits)
        if any(p is not None for p in core_plans):
            fits, core_reports = _core_stage(fits, core_plans, device, timer, cfg.fit.core_stage_minutes)
            provenance["core"] = core_reports[0]
            if n_members > 1:
                provenance["ensemble_cores"] = core_reports[1:n_members]
            if len(fits) > n_members:
                provenance["judge_core"] = core_reports[n_members]
            _save_json(run.path("provenance.json"), provenance)
        judge_fit = fits[n_members] if len(fits) > n_members else None
        report = _run_stages(cfg, fits[:n_members], run, target, nat, splits, recorder, device, timer, judge_fit=judge_fit)
        if core_reports[0] is not None:
            report["core"] = core_reports[0]
        if n_members > 1 and any(r is not None for r in core_reports[1:n_members]):
            report["ensemble_cores"] = core_reports[1:n_members]
        if judge_fit is not None and core_reports[n_members] is not None:
            report["judge_core"] = core_reports[n_members]
        report["timing"] = timer.seconds
        report["device"] = str(device)
        _save_json(run.path("report.json"), report)
        final = run.finish()
    except UserError:
        _detach_log()
        run.discard()
        raise
    except BaseException:
        log.error("run interrupted; unfinished folder kept at %s (resume: synth run --resume %s)", run.work, run.work)
        _detach_log()
        raise
    _detach_log()
    log.info("run complete: %s", final)
    return final


def plan_core_stage(cfg: Config, target: Target, fit=None):
    """The core plan when ``fit.weights: auto`` (None otherwise); validates it early.

    ``fit`` is the recipe to plan for (default ``cfg.fit``; an ensemble member's merged
    recipe otherwise). The core trains on the other sessions of the target's data root:
    never the evaluated session, never its digital twins (see :mod:`synth.surrogate.core`).
    """
    fit = cfg.fit if fit is None else fit
    if fit.weights.strip().lower() != "auto":
        return None
    from synth.errors import ConfigError
    from synth.surrogate.core import CoreConfig, plan_core

    sessions = getattr(target, "sessions", None)
    source = sessions(image_size=cfg.data.image_size, grayscale=cfg.data.grayscale) if sessions is not None else None
    session = getattr(target, "session", None)
    if source is None or session is None:
        raise ConfigError(
            f"weights auto trains a core on the other recording sessions under the target's data root; target {target.name} "
            "has none (use kind cowley2023, or kind recordings with {session} in params.images and params.responses, and set target.session)",
            key="fit.weights",
        )
    plan = plan_core(fit.core or CoreConfig(), evaluated=str(session), grayscale=cfg.data.grayscale, seed=derive_seed(cfg.seed, "core"), source=source)
    log.info(
        "core plan: sessions %s (evaluated %s excluded), distillation twins: %s, cache %s",
        ", ".join(plan.sessions), plan.evaluated, ", ".join(plan.teachers) or "none", plan.path,
    )
    return plan


def resolve_twin_backbone(fit, target: Target):
    """``fit`` with a ``cowley_twins`` backbone's ``root: auto`` / ``sessions: auto`` filled
    from the target (other recipes unchanged).

    ``root: auto`` is the target's data root (made absolute); ``sessions: auto`` every
    session with twins under it except the evaluated one. The evaluated session's twins
    are its follow-up recorder: listing it is refused.

    Raises:
        ConfigError: auto without a Cowley target, the evaluated session listed, no other
            session with twins.
    """
    if fit.backbone != "cowley_twins":
        return fit
    import dataclasses

    from synth.data import cowley
    from synth.errors import ConfigError

    kw = dict(fit.backbone_kwargs)
    key = "fit.backbone_kwargs"
    root, session = getattr(target, "root", None), getattr(target, "session", None)
    if kw.get("root", "auto") == "auto":
        if root is None:
            raise ConfigError(f"root auto takes the data root of a cowley2023 target; target {target.name} has none: give the Cowley 2023 data root", key=f"{key}.root")
        kw["root"] = str(root)
    kw["root"] = os.path.abspath(os.path.expanduser(str(kw["root"])))
    sessions = kw.get("sessions", "auto")
    if sessions == "auto":
        sessions = [s for s in cowley.twin_sessions(kw["root"]) if session is None or s != str(session)]
        if not sessions:
            raise ConfigError(f"sessions auto: no session other than the evaluated one ({session}) has digital twins under {kw['root']}", key=f"{key}.sessions")
    if isinstance(sessions, str) or not isinstance(sessions, (list, tuple)) or not sessions:
        raise ConfigError(f"expected auto or a list of session ids, got {sessions!r}", key=f"{key}.sessions")
    sessions = [str(s) for s in sessions]
    if session is not None and str(session) in sessions:
        raise ConfigError(
            f"session {session}'s own twins are its follow-up recorder and cannot be part of its surrogate; "
            "use other sessions' twins (sessions: auto)",
            key=f"{key}.sessions",
        )
    kw["sessions"] = sessions
    log.info("cowley_twins backbone: twins of session(s) %s under %s (evaluated session %s excluded)", ", ".join(sessions), kw["root"], session)
    return dataclasses.replace(fit, backbone_kwargs=kw)


def _core_stage(
    fits: list, plans: list, device: torch.device, timer: Timer, stage_minutes: float | None = None
) -> tuple[list, list[dict[str, Any] | None]]:
    """Train or reuse each recipe's shared core; returns the recipes with ``weights`` set
    to their core files, and a core summary per recipe (None where no core was needed).

    ``stage_minutes`` (``fit.core_stage_minutes``) limits the whole stage: each core to train
    gets the lesser of its own ``max_minutes`` and what is left of the stage (a cached core
    costs nothing). Students train first, then the other cores by their own limit, shortest
    first, so that a cut falls on the core given the most time.
    """
    import dataclasses

    from synth.surrogate.core import core_summary, ensure_core

    out, reports = list(fits), [None] * len(fits)
    todo = [i for i, p in enumerate(plans) if p is not None]

    def rank(i: int) -> tuple[bool, float]:
        # students first: their pass through the teachers for the maps also gives the
        # teachers' outputs, cached as labels, so a core distilled from the same twins on the
        # same images runs no twin of its own (the order changes nothing else: each core is
        # seeded by its plan)
        own = plans[i].config.max_minutes
        return (plans[i].config.objective != "teacher_maps", float("inf") if own is None else float(own))

    t0 = time.perf_counter()
    with timer("core"):
        for i in sorted(todo, key=rank):
            left = None if stage_minutes is None else max(0.0, float(stage_minutes) - (time.perf_counter() - t0) / 60.0)
            path, info = ensure_core(plans[i], device=device, limit_minutes=left, stage_minutes=stage_minutes)
            out[i] = dataclasses.replace(fits[i], weights=str(path), core=None)
            reports[i] = core_summary(info)
    return out, reports


def load_natural(cfg: Config, target: Target) -> tuple[NaturalData, Splits]:
    """The target's natural images and responses (checked) and their train/val/test split,
    exactly as ``synth run`` makes them from ``cfg``."""
    nat = target.natural(image_size=cfg.data.image_size, grayscale=cfg.data.grayscale, seed=derive_seed(cfg.seed, "natural"))
    check_natural(nat, cfg, _target_source(cfg))
    return nat, make_splits(nat.images.shape[0], _split_fractions(cfg), cfg.seed)


def member_files(i: int, suffix: str = "") -> tuple[str, str, str]:
    """File names of ensemble member ``i`` (0: the surrogate itself) in a run folder:
    checkpoint, fit report and the seed name of its fit; ``suffix`` ``_all`` for the refit."""
    stem = "" if i == 0 else f"_member{i}"
    return f"surrogate{stem}{suffix}.pt", f"fit{stem}{suffix}.json", f"fit{stem}{suffix}"


#: checkpoint, fit report and fit seed name of the judge (``fit.judge``) in a run folder
JUDGE_FILES = ("surrogate_judge.pt", "fit_judge.json", "fit_judge")


def synthesizing_surrogates(cfg: Config) -> list[str]:
    """Checkpoint names of the surrogates a run synthesized with (refitted ones with ``fit.refit: all``)."""
    suffix = "_all" if cfg.fit.refit == "all" else ""
    return [member_files(i, suffix)[0] for i in range(len(cfg.fit.members()))]


def _split_fractions(cfg: Config) -> dict[str, float]:
    sp = cfg.fit.split
    return {"train": float(sp.train), "val": float(sp.val), "test": float(sp.test)}


def _run_stages(
    cfg: Config, fits: list, run: RunDir, target: Target, nat: NaturalData, splits: Splits, recorder, device: torch.device, timer: Timer,
    judge_fit=None,
) -> dict[str, Any]:
    """fit -> synthesize -> follow-up -> validate. ``fits``: the surrogate's recipe (with
    its core resolved), then any ensemble members' (their predictions are averaged);
    ``judge_fit``: the judge's recipe (``fit.judge``), which rates the candidates only."""
    from synth.surrogate.fit import predict
    from synth.surrogate.model import SurrogateEnsemble

    site_ids = np.asarray(target.site_ids).astype(str)
    y = torch.as_tensor(nat.recording.mean().T, dtype=torch.float32)  # (N, S)
    x = nat.images

    # ---- fit
    with timer("fit"):
        members, infos = _fit_members(cfg, fits, run, x, y, splits.train, splits.val, site_ids, device)
        model = members[0] if len(members) == 1 else SurrogateEnsemble(members)
        fit_info = infos[0]
        pred_nat = predict(model, x, device=device)  # (N, S)
        test_rec = nat.recording.select(stimuli=nat.stimulus_id[splits.test])
        median_r, r_sites = _median_r(pred_nat[splits.test], test_rec)
        refit_report = None
        if cfg.fit.refit == "all":
            # The held-out figures above are the split surrogate's; synthesis uses the same
            # recipe refitted on every natural image (a lab's final model), so from here on
            # `model` and `pred_nat` are the refitted surrogate's.
            tr_all, va_all = refit_splits(x.shape[0], cfg.fit.split.val, derive_seed(cfg.seed, "refit_split"))
            log.info("refit on all natural images: %d train / %d val (early stopping)", tr_all.size, va_all.size)
            final, final_infos = _fit_members(cfg, fits, run, x, y, tr_all, va_all, site_ids, device, suffix="_all")
            model = final[0] if len(final) == 1 else SurrogateEnsemble(final)
            pred_nat = predict(model, x, device=device)
            refit_report = {
                "n_train_images": int(tr_all.size),
                "n_val_images": int(va_all.size),
                "val_median_r": [info.get("val_median_r") for info in final_infos],
                "note": "the surrogate used for synthesis and in natural.npz / stimuli.npz; median_r_test is the split surrogate's (this one saw the test images)",
            }
        np.savez(run.path("natural.npz"), stimulus_id=nat.stimulus_id, site_id=site_ids, predicted=pred_nat)
        judge = None
        if judge_fit is not None:
            log.info("judge: a surrogate that rates the candidates and never synthesizes")
            judge_model, judge_info = _fit_checkpointed(
                cfg, judge_fit, run, x, y, splits.train, splits.val, site_ids, device, *JUDGE_FILES
            )
            judge = (judge_model, predict(judge_model, x, device=device), judge_info)
    fit_report: dict[str, Any] = {
        "median_r_test": median_r,
        "n_sites": int(site_ids.size),
        "n_train_images": int(splits.train.size),
        "n_val_images": int(splits.val.size),
        "n_test_images": int(splits.test.size),
        "per_site_r_test": {s: float(v) for s, v in zip(site_ids, r_sites)},
        "details": fit_info,
    }
    if refit_report is not None:
        fit_report["refit"] = refit_report
    if judge is not None:
        fit_report["judge"] = {"median_r_test": _median_r(judge[1][splits.test], test_rec)[0], "details": judge[2]}
    if len(members) > 1:
        fit_report["ensemble"] = [
            {"median_r_test": _median_r(predict(m, x[splits.test], device=device), test_rec)[0], "details": info}
            for m, info in zip(members, infos)
        ]
    held_out = None
    if cfg.stimuli.held_out_surrogate:
        held_out = _fit_held_out(cfg, fits[0], run, x, y, splits, site_ids, device, timer)
        fit_report["held_out_median_r_test"] = _median_r(held_out[1][splits.test], test_rec)[0]
    ref = getattr(target, "reference_predictions", None)
    if callable(ref):
        ref_pred = ref(x[splits.test], nat.stimulus_id[splits.test])
        if ref_pred is not None:
            fit_report["reference_median_r_test"] = _median_r(np.asarray(ref_pred), test_rec)[0]

    # ---- synthesize
    with timer("synthesize"):
        starts = _natural_starts(cfg, site_ids, x, pred_nat, y.numpy(), nat.stimulus_id, model=model, device=device)
        stim_dir, guard, choice = _synthesize_stage(cfg, run, model, site_ids, x, pred_nat, device, held_out, starts, judge=judge)

    report: dict[str, Any] = {"fit": fit_report}
    if choice is not None:
        report["choice"] = choice
    if guard is not None:
        report["ensemble_guard"] = guard
    if recorder is None:
        log.warning(
            "this target has no simulated recorder: show %s/stimuli on the rig, then run "
            "`synth validate --predictions <run>/stimuli.npz --recordings REC --stimuli <run> --out DIR` "
            "(to rehearse first: `synth record <run> --subject TARGETS_YAML --out REC`, a simulated subject as the rig)",
            run.final,
        )
        report["followup"] = None
        return report

    # ---- follow-up recording of the saved PNGs (and the natural set)
    with timer("followup"):
        from synth.data.stimuli import read_stimulus_set
        from synth.populations.followup import record_followup

        stim = read_stimulus_set(stim_dir)
        ids = list(nat.stimulus_id) + list(stim.stimulus_id)
        followup, mean = record_followup(
            recorder, x, nat.stimulus_id, stim.images, stim.stimulus_id, n_repeats=cfg.followup.n_repeats,
            seed=followup_seed(cfg.seed), record_natural=cfg.followup.record_natural,
        )
        if not cfg.followup.record_natural:
            # The natural maxima and z-scores then come from the original natural recording.
            log.info("followup.record_natural is false: natural-set statistics from the original recording")
            followup = nat.recording.concat(followup)
        followup.save(run.path("followup.npz"))
        noise_info = getattr(recorder, "noise_info", None)
        if callable(noise_info):
            report["trial_noise"] = noise_info()

    # ---- validate (the same code as `synth validate`)
    with timer("validate"):
        from synth.validation.validate import closed_loop_report

        control = closed_loop_report(
            run.work,
            followup,
            natural_ids=list(nat.stimulus_id),
            n_bootstrap=cfg.validate.n_bootstrap,
            min_reliability=cfg.validate.min_reliability,
            seed=derive_seed(cfg.seed, "bootstrap"),
        )
        report.update(control)
        report["noise_free"] = _noise_free_figures(run, mean, ids, recorder.site_ids, list(nat.stimulus_id), cfg.followup.n_repeats)
    return report


def followup_seed(seed: int) -> int:
    """The seed of the follow-up recording of a run with seed ``seed`` (``synth run``, ``synth record``)."""
    return derive_seed(seed, "followup")


def _noise_free_figures(
    run: RunDir, mean: torch.Tensor, ids: list[str], site_ids: Sequence[str], natural_ids: list[str], n_repeats: int
) -> dict[str, Any]:
    """Stretch and one-hot figures from the simulated recorder's expected responses.

    With ``n_repeats`` noisy trials the natural maximum (the largest of a thousand noisy
    means) is inflated more than the best of a few synthetic images, which pulls the
    recorded figures down; these are the figures without trial noise (simulation only).
    """
    from synth.validation.io import read_manifest
    from synth.validation.redraw import noise_free_metrics

    m = noise_free_metrics(mean, ids, site_ids, read_manifest(run.work / "manifest.csv"), natural_ids)
    return {
        "stretch": {k: m["stretch"][k] for k in ("fraction_above_natural_max", "median_gain")},
        "one_hot": {k: m["one_hot"][k] for k in ("median_score_ratio", "fraction_beating_best_natural")},
        "note": f"the recorder's expected responses (no trial noise; the recorded figures use {n_repeats} repeats)",
    }


def _fit_held_out(cfg: Config, fit, run: RunDir, x: torch.Tensor, y: torch.Tensor, splits: Splits, site_ids: np.ndarray, device: torch.device, timer: Timer):
    """The ensemble guard's held-out surrogate: the recipe ``fit``, another train/val split.

    Returns ``(model, predictions on the natural set)``; saved as ``surrogate_heldout.pt``
    so ``--resume`` reuses it.
    """
    from synth.surrogate.fit import predict
    from synth.synthesis.scoring import held_out_splits

    with timer("fit_held_out"):
        tr, va = held_out_splits(splits.train, splits.val, derive_seed(cfg.seed, "held_out_split"))
        log.info("held-out surrogate (ensemble guard) on another split: %d train / %d val images", tr.size, va.size)
        model, _ = _fit_checkpointed(cfg, fit, run, x, y, tr, va, site_ids, device, "surrogate_heldout.pt", "fit_heldout.json", "fit_held_out")
        return model, predict(model, x, device=device)


def refit_splits(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices over all ``n`` natural images for ``fit.refit: all``.

    A seeded ``val_fraction`` of the images (at least 2) is kept back for early stopping;
    every other image, the test split's included, trains the refitted surrogate.
    """
    from synth.surrogate.fit import split_indices

    train, val = split_indices(n, val_fraction, seed)
    return train.numpy(), val.numpy()


def _fit_members(
    cfg: Config, fits: list, run: RunDir, x: torch.Tensor, y: torch.Tensor, train: np.ndarray, val: np.ndarray,
    site_ids: np.ndarray, device: torch.device, suffix: str = "",
) -> tuple[list, list[dict[str, Any]]]:
    """Fit (or, when resuming, load) the surrogate and each ensemble member on ``train``/``val``.

    Files: ``surrogate<suffix>.pt`` / ``fit<suffix>.json``, then ``surrogate_member<i><suffix>.pt``...
    """
    members, infos = [], []
    for i, fit in enumerate(fits):
        names = member_files(i, suffix)
        if len(fits) > 1:
            log.info("ensemble member %d of %d%s", i + 1, len(fits), " (refit on all images)" if suffix else "")
        m, info = _fit_checkpointed(cfg, fit, run, x, y, train, val, site_ids, device, *names)
        members.append(m)
        infos.append(info)
    return members, infos


def _fit_checkpointed(
    cfg: Config, fit, run: RunDir, x: torch.Tensor, y: torch.Tensor, train: np.ndarray, val: np.ndarray,
    site_ids: np.ndarray, device: torch.device, ckpt_name: str, info_name: str, seed_name: str,
):
    """Fit a surrogate by the recipe ``fit`` on ``train``/``val`` and save it, or load it when resuming."""
    from synth.surrogate.fit import fit_surrogate
    from synth.surrogate.model import Surrogate

    ckpt = run.work / ckpt_name
    if ckpt.exists():
        log.info("resume: loading fitted surrogate %s", ckpt)
        return Surrogate.load(ckpt, device=device), json.loads((run.work / info_name).read_text())
    model, info = fit_surrogate(
        fit, (x[train], y[train]), (x[val], y[val]), site_ids=site_ids, device=device, seed=derive_seed(cfg.seed, seed_name)
    )
    _save_json(run.path(info_name), info)
    model.save(run.path(ckpt_name + ".tmp"))
    os.replace(run.work / (ckpt_name + ".tmp"), ckpt)
    return model, info


def _natural_starts(cfg: Config, site_ids: np.ndarray, x_nat: torch.Tensor, pred_nat: np.ndarray, recorded: np.ndarray, natural_ids: np.ndarray,
                    model=None, device: torch.device | None = None):
    """``stimuli.start: natural``: a function from the jobs to their start images and the
    manifest columns naming them (``start_stimulus_id``; with a view search also
    ``start_view``); None for noise starts. Ranked by the surrogate's predictions or the
    recorded means (a site's missing means count as its mean); a view search
    (``stimuli.start_zooms``, ``start_flips``) rates the views with ``model``."""
    if cfg.stimuli.start != "natural":
        return None
    from synth.synthesis.starts import rank_natural_starts, search_natural_starts, start_views

    ids = np.asarray(natural_ids).astype(str)
    if cfg.stimuli.searches_views:
        from synth.surrogate.fit import predict

        views = start_views(cfg.stimuli.start_zooms, cfg.stimuli.start_flips)

        def search(jobs):
            t0 = time.perf_counter()
            src, view, images = search_natural_starts(
                jobs, pred_nat, lambda x: predict(model, x, device=device), x_nat, site_ids=site_ids, views=views,
                candidates=cfg.stimuli.start_candidates, aliases=cfg.synthesis.objectives,
            )
            log.info("start views chosen for %d images in %.1f s", len(jobs), time.perf_counter() - t0)
            return images, {"start_stimulus_id": ids[src], "start_view": np.array([views[int(v)].label() for v in view])}

        log.info(
            "synthesis starts from the best of %d views (zooms %s%s) of each target's %d best natural images, rated by the surrogate",
            len(views), ", ".join(f"{z:g}" for z in cfg.stimuli.start_zooms), ", mirrored" if cfg.stimuli.start_flips else "",
            cfg.stimuli.start_candidates,
        )
        return search

    if cfg.stimuli.start_rank_by == "recorded":
        resp = np.asarray(recorded, dtype=np.float64)
        if np.isnan(resp).any():
            resp = np.where(np.isnan(resp), np.nanmean(resp, axis=0, keepdims=True), resp)
        resp = np.nan_to_num(resp)
    else:
        resp = np.asarray(pred_nat, dtype=np.float64)

    def starts(jobs):
        idx = rank_natural_starts(jobs, resp, site_ids=site_ids, images=x_nat, aliases=cfg.synthesis.objectives)
        return x_nat[torch.as_tensor(idx)], {"start_stimulus_id": ids[idx]}

    log.info("synthesis starts from the natural images ranked by the %s", "recorded responses" if cfg.stimuli.start_rank_by == "recorded" else "surrogate's predictions")
    return starts


def _synthesize_stage(
    cfg: Config, run: RunDir, model, site_ids: np.ndarray, x_nat: torch.Tensor, pred_nat: np.ndarray, device: torch.device, held_out=None,
    starts=None, judge=None,
) -> tuple[Path, dict[str, Any] | None, dict[str, Any] | None]:
    """Synthesize all jobs in checkpointed batches, then write the stimulus set.

    With a ``judge`` (``(model, natural predictions, fit info)``), each (objective, target)
    gets ``stimuli.candidates_per_target`` images; the judge scores the saved images as the
    validation will score the recording (:func:`synth.synthesis.scoring.candidate_scores`)
    and the best ``stimuli.seeds_per_target`` are kept (their judge predictions in the
    manifest and ``stimuli.npz``); the third value returned summarizes the choice.

    With a held-out surrogate, every saved image is also scored by it (the ensemble
    guard): its predictions and a ``models_agree`` flag go into the manifest and
    ``stimuli.npz``, and the returned summary into ``report.json``. With ``starts``
    (:func:`_natural_starts`), each image starts from its natural image, whose stimulus
    id goes into the manifest (``start_stimulus_id``).
    """
    from synth.data.stimuli import write_stimulus_set
    from synth.surrogate.fit import predict
    from synth.synthesis import Job, ObjectiveContext, synthesize
    from synth.synthesis.jobs import stimulus_id_of

    sites = list(site_ids) if cfg.stimuli.sites is None else list(cfg.stimuli.sites)
    unknown = [s for s in sites if s not in set(site_ids)]
    if unknown:
        from synth.errors import ConfigError

        raise ConfigError(f"unknown site id '{unknown[0]}'; the target has {len(site_ids)} sites, e.g. {site_ids[0]}", key="stimuli.sites")
    index = {s: i for i, s in enumerate(site_ids)}
    jobs: list[Job] = []
    for kind, on in (("stretch", cfg.stimuli.stretch), ("one_hot", cfg.stimuli.one_hot)):
        if not on:
            continue
        for s in sites:
            for k in range(cfg.stimuli.n_candidates):
                sid = stimulus_id_of(kind, s, k)
                jobs.append(Job(stimulus_id=sid, objective=kind, target_site=index[s], seed=derive_seed(cfg.seed, "synth", sid)))
    rf = None
    if hasattr(model, "receptive_fields"):
        with torch.no_grad():
            rf = model.receptive_fields().detach().cpu()
    context = ObjectiveContext.from_predictions(site_ids, pred_nat, natural_images=x_nat, rf_masks=rf)
    channels = 1 if cfg.data.grayscale else 3
    start_images, start_cols = starts(jobs) if starts is not None else (None, {})
    bs = cfg.stimuli.batch_size
    batches = [jobs[i : i + bs] for i in range(0, len(jobs), bs)]
    ck_dir = run.path("checkpoints", "x").parent
    from synth.runtime import progress

    parts = []
    for b, batch in enumerate(progress(batches, desc="synthesize batches", total=len(batches))):
        ck = ck_dir / f"synthesis_batch_{b:04d}.npz"
        if ck.exists():
            log.info("resume: batch %d from %s", b, ck)
            with np.load(ck, allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
            continue
        init = None if start_images is None else start_images[b * bs : b * bs + len(batch)]
        res = synthesize(
            model, batch, cfg.synthesis, context=context, image_size=cfg.data.image_size, channels=channels, device=device, init_images=init
        )
        part = {
            "stimulus_id": np.array([j.stimulus_id for j in batch]),
            "images": res.images,
            "luminance": np.asarray(res.luminance),
            "contrast": np.asarray(res.contrast),
            "steps": np.asarray(res.steps),
            "objective_value": np.asarray(res.objective_value),
        }
        for k, h in (res.history or {}).items():
            part[f"history_{k}"] = _pad_steps(np.asarray(h, dtype=np.float32), cfg.synthesis.steps)
        _save_npz_atomic(ck, **part)
        parts.append(part)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert list(merged["stimulus_id"]) == [j.stimulus_id for j in jobs]
    images_u8 = merged["images"]
    history = {k[len("history_"):]: v for k, v in merged.items() if k.startswith("history_")}
    if history:
        # loss, objective and target response per image and step (NaN after an image stopped)
        _save_npz_atomic(run.work / "synthesis_history.npz", stimulus_id=merged["stimulus_id"], **history)
    extra: dict[str, np.ndarray] = {
        "luminance": merged["luminance"],
        "contrast": merged["contrast"],
        "steps": merged["steps"],
        "objective_value": merged["objective_value"],
    }
    extra.update(start_cols)
    choice = None
    if judge is not None:
        jobs, images_u8, extra, choice = _choose(cfg, judge, jobs, images_u8, extra, device)
    # Predictions from the 8-bit images exactly as saved (PNG is lossless), of the kept images only.
    x_saved = torch.as_tensor(images_u8).permute(0, 3, 1, 2).float() / 255.0
    predicted = predict(model, x_saved, device=device)
    guard = None
    if held_out is not None:
        from synth.synthesis.scoring import ensemble_guard

        ho_model, ho_nat = held_out
        fields = ensemble_guard(ho_model, images_u8, np.array([j.target_site for j in jobs]), predicted, pred_nat, ho_nat, device=device)
        extra.update(fields)
        agree = fields["models_agree"].astype(bool)
        guard = {
            "n_images": int(agree.size),
            "fraction_models_agree": float(agree.mean()) if agree.size else None,
            "disagreeing_stimulus_ids": [j.stimulus_id for j, a in zip(jobs, agree) if not a],
        }
        log.info("ensemble guard: the held-out surrogate agrees on %d of %d images", int(agree.sum()), agree.size)
    stim_dir = run.work
    write_stimulus_set(stim_dir, images_u8, jobs, site_ids, predicted, extra=extra)
    return stim_dir, guard, choice


def _choose(cfg: Config, judge, jobs: list, images_u8: np.ndarray, extra: dict[str, np.ndarray], device: torch.device):
    """Keep each (objective, target)'s ``stimuli.seeds_per_target`` candidates the judge scores best."""
    from synth.synthesis.scoring import candidate_scores, choose_candidates, score_with

    model, natural, _ = judge
    t0 = time.perf_counter()
    judged = score_with(model, images_u8, device=device)
    objectives, targets = [j.objective for j in jobs], np.array([j.target_site for j in jobs])
    scores = candidate_scores(objectives, targets, judged, natural)
    keep = choose_candidates(objectives, targets, scores, cfg.stimuli.seeds_per_target)
    kept = set(keep.tolist())
    choice = {
        "candidates_per_target": cfg.stimuli.n_candidates,
        "kept_per_target": cfg.stimuli.seeds_per_target,
        "n_candidates": len(jobs),
        "n_kept": int(keep.size),
        "scores": {j.stimulus_id: float(v) for j, v in zip(jobs, scores)},
        "dropped_stimulus_ids": [j.stimulus_id for i, j in enumerate(jobs) if i not in kept],
    }
    log.info("judge kept %d of %d candidates (%d per target) in %.1f s", keep.size, len(jobs), cfg.stimuli.seeds_per_target, time.perf_counter() - t0)
    extra = {k: np.asarray(v)[keep] for k, v in extra.items()}
    extra["judge_predicted"] = judged[keep]
    extra["judge_score"] = scores[keep]
    return [jobs[i] for i in keep], images_u8[keep], extra, choice


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _pad_steps(h: np.ndarray, steps: int) -> np.ndarray:
    """NaN-pad (or cut) a per-step history ``(N, T)`` to ``(N, steps)`` so batches concatenate."""
    if h.ndim != 2:
        return h
    out = np.full((h.shape[0], steps), np.nan, dtype=np.float32)
    out[:, : min(steps, h.shape[1])] = h[:, :steps]
    return out


_LOG_HANDLER: logging.Handler | None = None


def _attach_log(path: Path) -> None:
    global _LOG_HANDLER
    _detach_log()
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.DEBUG)
    logging.getLogger("synth").addHandler(h)
    _LOG_HANDLER = h


def _detach_log() -> None:
    global _LOG_HANDLER
    if _LOG_HANDLER is not None:
        logging.getLogger("synth").removeHandler(_LOG_HANDLER)
        _LOG_HANDLER.close()
        _LOG_HANDLER = None


def finished_run(run_dir: str | os.PathLike, *also: str) -> tuple[Path, Path]:
    """``(run, run / config.resolved.yaml)`` of a finished run folder.

    Raises:
        UserError: ``config.resolved.yaml`` or one of ``also`` is not in it.
    """
    run = Path(run_dir)
    for need in (RESOLVED, *also):
        if not (run / need).is_file():
            raise UserError(f"{run_dir}: no {need} in it; not a finished synth run folder")
    return run, run / RESOLVED


def resume_config(partial: str | os.PathLike) -> tuple[Config, str]:
    """The resolved config saved in an unfinished run folder."""
    p = Path(partial) / RESOLVED
    if not p.exists():
        raise UserError(f"--resume {partial}: no {RESOLVED} in it; not a synth run folder")
    return load_config(p), str(p)
