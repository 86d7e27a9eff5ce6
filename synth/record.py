"""``synth record``: a simulated subject records a finished run's images, as the rig would.

A run on a lab's own recordings (``configs/lab_recordings.yaml``, ``configs/lab_sessions.yaml``)
stops at the stimulus set: the monkey is its follow-up recorder. ``synth record`` lets a
lab rehearse the rest of Monday's path first: a *subject* with a simulated recorder (a
``targets/*.yaml`` file: the digital twins of a Cowley 2023 session, the virtual
population) views the run's natural images and its saved PNGs, and writes the recording
in the format ``synth validate --recordings`` reads, exactly as the rig's file would be.

The subject must hold every site of the run (the recording is joined to the predictions
by ``site_id``). The natural set is always recorded (the natural maxima and z-scores in the
subject's units). Without ``subject`` it is the run's own target, which a run with a
simulated target has already recorded into ``followup.npz``: with the run's seed and
repeats (and ``followup.record_natural: true``, the default) the file comes out identical.

Example:
    >>> info = record_run("outputs/run", "followup.npz", subject="targets/cowley2023.yaml",
    ...                   params=["root=data/cowley2023_v4", "session=190923"])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from synth.config import apply_overrides, load_config, resolve_path
from synth.errors import DataError, UserError
from synth.runtime import file_sha256, resolve_device, versions

log = logging.getLogger(__name__)

#: file endings ``--out`` may have (the formats ``synth validate`` reads)
FORMATS = (".npz", ".csv")


def _out_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--out {out}: expected a file name ending in .npz or .csv (the formats synth validate reads)")
    side = path.with_name(path.name + ".json")
    for p in (path, side):
        if p.exists():
            raise UserError(f"--out {out}: {p} exists; synth never overwrites a recording (choose a new name)")
    return path, side


def _subject(cfg, run: Path, run_target, subject: str | None, params: dict[str, Any]):
    """The subject Target and how it was named: ``(target, {"file", "name", "params"})``."""
    from synth.targets import build_target

    if subject is None:
        named = {"root": cfg.target.root, "session": cfg.target.session, **cfg.target.params, **params}
        file = resolve_path(cfg.target.file, relative_to=str(run))
        if params:  # the run's target with other params
            rest = {k: v for k, v in named.items() if k not in ("root", "session")}
            target = build_target(file, root=named["root"], session=named["session"], overrides=rest)
        else:
            target = run_target
    else:
        file = Path(subject)
        if not file.is_file():
            raise UserError(f"--subject {subject}: no such targets file (expected e.g. targets/cowley2023.yaml)")
        target = build_target(file, overrides=params)
        named = dict(params)
    if named.get("session") is not None:
        named["session"] = str(named["session"])
    return target, {"file": str(file), "name": target.name, "params": {k: v for k, v in named.items() if v is not None}}


def _checked_natural(cfg, run: Path, run_sites_from: Path):
    """The run's target and natural images as it gives them now, checked against the run,
    and the run's sites."""
    from synth.pipeline import load_natural, load_target
    from synth.validation.io import Predictions

    target = load_target(cfg, str(run))
    nat, _ = load_natural(cfg, target)
    pred = Predictions.load(run_sites_from)
    have, want = set(map(str, nat.stimulus_id)), set(pred.stimulus_id.tolist())
    if have != want:
        gone = sorted(want - have) or sorted(have - want)
        raise DataError(
            f"{run_sites_from}: the run predicted {len(want)} natural images, its target now gives {len(have)} "
            f"(e.g. {gone[0]!r} differs); the natural data changed since the run"
        )
    prov = run / "provenance.json"
    if prov.is_file():
        then = json.loads(prov.read_text()).get("inputs_sha256") or {}
        for path, digest in (nat.info.get("checksums") or {}).items():
            if path in then and then[path] != digest:
                log.warning("%s: its SHA-256 differs from the run's (provenance.json); the natural data changed since the run", path)
    return target, nat, pred.site_id


def record_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    subject: str | None = None,
    params: Sequence[str] = (),
    n_repeats: int | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Record a finished run's natural images and stimuli with a simulated subject.

    Args:
        run_dir: a finished run folder (``config.resolved.yaml``, ``natural.npz``,
            ``manifest.csv``, ``stimuli/``).
        out: the recording file to create (``.npz`` or ``.csv``); never overwritten. A
            ``<out>.json`` beside it records the run, subject, repeats, seed, trial-noise
            model, device, versions and the recording's SHA-256.
        subject: a ``targets/*.yaml`` file whose target has a simulated recorder (None:
            the run's own target).
        params: ``KEY=VALUE`` overrides of the subject's params (e.g. ``root=DIR``,
            ``session=190923``, ``followup_noise=none``).
        n_repeats: trials per image (None: the run's ``followup.n_repeats``).
        seed: the recording's seed (None: the run's seed); trials are drawn with
            ``followup_seed(seed)``, as ``synth run`` draws its follow-up.
        device: where the subject computes (None: the run's ``device``).

    Returns:
        the ``<out>.json`` contents.

    Raises:
        UserError: not a finished run, an existing ``out``, a subject without a simulated
            recorder or without one of the run's sites, a natural set changed since the run.
    """
    from synth.data.stimuli import read_stimulus_set
    from synth.pipeline import finished_run, followup_seed
    from synth.populations.followup import record_followup
    from synth.validation.io import write_recording_csv

    path, side = _out_paths(out)
    run, resolved = finished_run(run_dir, "natural.npz", "manifest.csv")
    cfg = load_config(resolved)
    n_repeats = cfg.followup.n_repeats if n_repeats is None else int(n_repeats)
    if n_repeats < 1:
        raise UserError(f"--repeats: expected a positive number, got {n_repeats}")
    seed = cfg.seed if seed is None else int(seed)
    if seed < 0:
        raise UserError(f"--seed: expected a number >= 0, got {seed}")
    dev = resolve_device(device or cfg.device)

    run_target, nat, run_sites = _checked_natural(cfg, run, run / "natural.npz")
    stim = read_stimulus_set(run, image_size=cfg.data.image_size, channels=1 if cfg.data.grayscale else 3)
    target, named = _subject(cfg, run, run_target, subject, apply_overrides({}, list(params)))
    recorder = target.recorder(device=dev)
    where = subject or str(resolved)
    if recorder is None:
        raise UserError(
            f"{where}: target '{target.name}' records on the rig, not in simulation; give --subject "
            "targets/<file>.yaml with a simulated recorder (kind cowley2023 with twins, or virtual)"
        )
    own = set(map(str, recorder.site_ids))
    missing = [str(s) for s in run_sites if str(s) not in own]
    if missing:
        raise UserError(
            f"{where}: subject '{target.name}' has no site {missing[0]!r} ({len(missing)} of the run's {len(run_sites)} sites "
            f"are not among its {len(own)}); it must record the run's sites"
        )
    log.info("subject %s records %d natural + %d synthesized images, %d sites, %d repeats", target.name,
             nat.images.shape[0], stim.images.shape[0], len(run_sites), n_repeats)
    rec, _ = record_followup(recorder, nat.images, nat.stimulus_id, stim.images, stim.stimulus_id,
                             n_repeats=n_repeats, seed=followup_seed(seed))
    rec = rec.select(sites=run_sites)

    noise = getattr(recorder, "noise_info", None)
    info = {
        "run": str(run),
        "subject": named,
        "n_natural": int(nat.images.shape[0]),
        "n_stimuli": int(stim.images.shape[0]),
        "n_sites": int(rec.n_sites),
        "n_repeats": n_repeats,
        "seed": seed,
        "trial_noise": noise() if callable(noise) else None,
        "device": str(dev),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix.lower()}")  # np.savez wants .npz
    tmp_side = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() == ".csv":
            write_recording_csv(rec, tmp)
        else:
            rec.save(tmp)
        info["sha256"] = file_sha256(tmp)
        tmp_side.write_text(json.dumps(info, indent=2, default=str) + "\n")
        os.replace(tmp_side, side)
        os.replace(tmp, path)
    finally:
        for t in (tmp, tmp_side):
            if t.exists():
                t.unlink()
    return info


def summary_line(info: dict[str, Any], out: str | os.PathLike) -> str:
    """One line for the terminal: what was recorded, where."""
    return (f"{info['subject']['name']} recorded {info['n_natural']} natural + {info['n_stimuli']} synthesized images x "
            f"{info['n_sites']} sites x {info['n_repeats']} repeats: {out}")

