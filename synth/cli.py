"""The ``synth`` command line: argument parsing only; the work is in synth.pipeline etc.

Exit status: 0 success, 2 usage/config/data errors (one line on stderr, no traceback),
1 runtime failures, 130 interrupted. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from synth.errors import UserError

log = logging.getLogger("synth")

EPILOG = "Docs: README.md. Errors exit with status 2 (bad input) or 1 (runtime failure)."


def _parser() -> argparse.ArgumentParser:
    def flags(default):
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logging")
        parser.add_argument("--quiet", "-q", action="store_true", default=default, help="no progress bars, warnings and errors only")
        return parser

    # --debug/--quiet work before or after the subcommand: the subcommands' copies
    # default to SUPPRESS, so they do not reset a flag given before the subcommand.
    top_flags, common = flags(False), flags(argparse.SUPPRESS)

    p = argparse.ArgumentParser(
        prog="synth",
        description="Closed-loop neural control image synthesis: fit a brain-mapped CNN surrogate of recorded sites, "
        "synthesize stretch and one-hot population images, write a stimulus set, validate against follow-up recordings.",
        epilog=EPILOG,
        parents=[top_flags],
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", parents=[common], help="run a closed-loop experiment from a YAML config", epilog=EPILOG,
                       description="Run record -> fit -> synthesize -> follow-up -> validate; writes one run folder.")
    r.add_argument("config", nargs="?", help="experiment YAML (e.g. configs/demo.yaml or RUN_DIR/config.resolved.yaml)")
    r.add_argument("--out", metavar="DIR", help="run folder to create (default outputs/<timestamp>_<name>); never overwritten")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set synthesis.steps=50 (repeatable; validated like the file)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")
    r.add_argument("--resume", metavar="RUN_DIR", help="complete an interrupted run (its .partial folder)")

    c = sub.add_parser("check", parents=[common], help="validate a config (and its target) without running",
                       description="Validate a config file and overrides; prints the resolved config.")
    c.add_argument("config", help="experiment YAML")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    c.add_argument("--print", dest="print_resolved", action="store_true", help="print the fully resolved config")

    v = sub.add_parser("validate", parents=[common], help="score predictions against follow-up recordings",
                       description="Join predictions and recordings on stimulus_id/site_id; write report.json and report.html.")
    v.add_argument("--predictions", required=True, metavar="PRED", help=".npz with stimulus_id, site_id, predicted (N, S)")
    v.add_argument("--recordings", required=True, action="append", metavar="REC",
                   help=".npz with stimulus_id, site_id, responses (S, N, R) NaN-padded, or long CSV stimulus_id,site_id,repeat,response; "
                   "repeat it to join files, e.g. the follow-up and the natural set's original recording (each image from one file)")
    v.add_argument("--out", required=True, metavar="DIR", help="report folder to create")
    v.add_argument("--stimuli", metavar="RUN_DIR", help="run folder: adds control outcomes (stretch, one-hot) and a stimulus montage")
    v.add_argument("--min-reliability", type=float, default=None, help="exclude sites with split-half reliability below this")
    v.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    v.add_argument("--seed", type=int, default=0, help="seed for split halves and bootstrap")
    v.add_argument("--n-splits", type=int, default=20, help="random split-halves for reliability (>= 10)")

    rc = sub.add_parser("record", parents=[common], help="a simulated subject records a finished run's images (a dry run of the rig)",
                        epilog=EPILOG,
                        description="Show a finished run's natural images and stimuli to a simulated subject (a targets file whose "
                        "target simulates its sites: a Cowley 2023 session's digital twins, the virtual population) and write its "
                        "recording as synth validate --recordings reads it, with trial noise. A lab rehearses Monday's path on a run "
                        "of its own recordings: synth run, synth record, synth validate. The subject must have every site of the run.")
    rc.add_argument("run_dir", help="a finished run folder (config.resolved.yaml, natural.npz, manifest.csv, stimuli/)")
    rc.add_argument("--out", required=True, metavar="FILE", help="recording to create, .npz or .csv (never overwritten); FILE.json beside it says how it was made")
    rc.add_argument("--subject", metavar="TARGETS_YAML", help="the simulated subject (default: the run's own target, if it is simulated)")
    rc.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE",
                    help="the subject's params, e.g. --set root=data/cowley2023_v4 --set session=190923 (repeatable)")
    rc.add_argument("--repeats", type=int, default=None, metavar="N", help="trials per image (default: the run's followup.n_repeats)")
    rc.add_argument("--seed", type=int, default=None, help="the recording's seed (default: the run's; then a simulated run's followup.npz is repeated)")
    rc.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the subject computes (default: the run's device)")

    b = sub.add_parser("bench", parents=[common], help="benchmarks that print figures")
    bsub = b.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    bs = bsub.add_parser("synthesis", parents=[common], help="synth vs lucent render_vis on the same 64-site surrogate")
    bs.add_argument("--device", default="cpu", help="cpu or cuda")
    bs.add_argument("--image-size", type=int, default=224)
    bs.add_argument("--n-sites", type=int, default=64)
    bs.add_argument("--steps", type=int, default=256, help="lucent's steps per target")
    bs.add_argument("--seed", type=int, default=0)

    bc = bsub.add_parser("ceiling", parents=[common], help="stimuli synthesized on the twins themselves: the recipe's ceiling",
                         description="Synthesize each site's stretch images on its own digital twin (or its one-hot images on "
                         "all the session's twins) with the config's synthesis recipe and score them on the twins (no trial "
                         "noise): what a perfect surrogate would reach. With stimuli.start: natural each image starts from a natural "
                         "image the twins rate best for its objective, and with stimuli.start_zooms / start_flips from the best view of it, "
                         "rated by the twins. Needs a target with twins (cowley2023 sessions "
                         "201025, 190923). One-hot images cost every twin at every step: about S times a stretch image.")
    bc.add_argument("config", help="experiment YAML (its target, synthesis, stimuli.seeds_per_target and start, seed, device)")
    bc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    bc.add_argument("--sites", type=int, default=None, metavar="N", help="only the first N sites (a quick check)")
    bc.add_argument("--objective", choices=("stretch", "one_hot"), default="stretch", help="which images (default stretch)")

    bg = bsub.add_parser("gradients", parents=[common], help="do the surrogate's input gradients point where the simulated sites' do?",
                         description="For a finished run whose target simulates its sites with differentiable models (digital "
                         "twins, the virtual population): per site, the cosine between each surrogate's input gradient and the "
                         "site's own, at held-out natural images (or the run's own synthesized images), in pixel space and in "
                         "the synthesis parameterization's space (what synthesis follows). Sites whose gradients agree are the "
                         "ones synthesis can drive.")
    bg.add_argument("run_dir", help="a finished run folder (config.resolved.yaml and its surrogate checkpoints)")
    bg.add_argument("--images", type=int, default=32, metavar="N", help="held-out test images to take gradients at (default 32)")
    bg.add_argument("--sites", type=int, default=None, metavar="N", help="only the first N sites (a quick check)")
    bg.add_argument("--at", choices=("natural", "stretch", "one_hot"), default="natural",
                    help="where to take the gradients: held-out natural test images (default) or N of the run's own "
                    "stretch or one-hot images (spread over the set), where synthesis goes")
    bg.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the run's device")

    br = bsub.add_parser("redraw", parents=[common], help="the run's recorded control figures over fresh recordings of the same images",
                         description="For a finished run with a simulated follow-up recorder (digital twins, the virtual "
                         "population): record the same images (natural and synthesized) again N times with fresh trial noise "
                         "and print the mean, sd and 5-95%% range of the stretch and one-hot figures, and where the run's own "
                         "recording fell among them. One recording is one draw; this says how much of its figures is luck. "
                         "--set target.params.followup_noise=measured redraws with the trial noise measured on recorded single "
                         "trials (cowley2023) instead of Poisson.")
    br.add_argument("run_dir", help="a finished run folder (config.resolved.yaml, manifest.csv, stimuli/, report.json)")
    br.add_argument("--draws", type=int, default=20, metavar="N", help="fresh recordings to draw (default 20)")
    br.add_argument("--target-sites", metavar="ID[,ID...]",
                    help="only the images made for these sites (their manifest target_site): the figures of that subset, "
                    "one-hot scores still against every site; to compare runs on the sites they share")
    br.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the run's config (e.g. the target's trial noise)")
    br.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the run's device")

    bj = bsub.add_parser("choice", parents=[common], help="did the judge choose well among a run's candidates?",
                         description="For a finished run with a judge (fit.judge, stimuli.candidates_per_target) and a simulated "
                         "follow-up recorder: every candidate (checkpoints/) is scored on the recorder's expected responses as the "
                         "validation scores a recording; prints how well the judge's scores rank each target's candidates "
                         "(Spearman, median over targets) and the control figures, noise-free and over N fresh recordings, of four "
                         "choices of the same number of images per target: the first ones (what the run would have shown without "
                         "a judge), the judge's (the stimulus set), the recorder's own best (the limit of any choice) and all.")
    bj.add_argument("run_dir", help="a finished run folder with a judge (report.json choice block, checkpoints/)")
    bj.add_argument("--draws", type=int, default=20, metavar="N", help="fresh recordings per choice (default 20)")
    bj.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the run's device")

    bt = bsub.add_parser("teachers", parents=[common], help="what the teachers' feature targets cost: outputs, features, one pass",
                         description="Time a session's digital twins on N of its images three ways: their outputs alone (a "
                         "distillation teacher's labels), their hidden layers pooled over a grid alone (fit.core.distill_features "
                         "targets), and both from one pass through their layers (what the core's data step does), in rounds.")
    bt.add_argument("root", help="Cowley 2023 data root")
    bt.add_argument("--session", required=True, help="a session with twins (e.g. 190923)")
    bt.add_argument("--images", type=int, default=400, metavar="N", help="the session's first N images (default 400)")
    bt.add_argument("--layers", default="layers3-4", help="twin layers of the features (default layers3-4)")
    bt.add_argument("--grid", type=int, default=3, help="cells per side (default 3)")
    bt.add_argument("--rounds", type=int, default=2, metavar="K", help="rounds of the three passes (default 2)")
    bt.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the twins compute (default auto)")

    d = sub.add_parser("data", parents=[common], help="data sets: download, write in a lab's layout")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    f = dsub.add_parser("fetch", parents=[common], help="download a public data set with SHA-256 checks")
    f.add_argument("dataset", choices=["cowley2023"], help="data set name")
    f.add_argument("--root", default="data/cowley2023_v4", help="destination folder (default data/cowley2023_v4)")
    f.add_argument("--mirror", metavar="DIR", help="copy from a local mirror folder instead of the internet")
    f.add_argument("--base-url", help="alternative base URL with the same layout")
    e = dsub.add_parser("export", parents=[common], help="write a data set's sessions in a lab's layout (images/ + responses.npz)",
                        description="Write the sessions as <OUT>/<session>/images/<stimulus_id>.png (8-bit RGB, as recorded) and "
                        "<OUT>/<session>/responses.npz (single trials where the source has them, else repeat-averaged): the layout of configs/lab_sessions.yaml, to rehearse a "
                        "lab's path on real V4 data (synth run, synth record with a session's twins, synth validate). GPL-3.0 like "
                        "the source: keep the copies out of any repository.")
    e.add_argument("dataset", choices=["cowley2023"], help="data set name")
    e.add_argument("--root", required=True, help="the data set's folder (as synth data fetch wrote it)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder to create (never overwritten)")
    e.add_argument("--sessions", nargs="+", metavar="ID", help="only these sessions (default: all under --root)")
    return p


def _setup_logging(debug: bool, quiet: bool) -> None:
    from synth.runtime import set_quiet

    set_quiet(quiet)
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logger = logging.getLogger("synth")
    logger.setLevel(logging.DEBUG)
    for h in list(logger.handlers):
        if getattr(h, "_synth_console", False):
            logger.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h._synth_console = True  # type: ignore[attr-defined]
    h.setLevel(level)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(h)
    logger.propagate = False


def _in_config(fn, config: str | None):
    """Run ``fn``; a ConfigError that names a key but no file gets the config file."""
    from synth.errors import ConfigError

    try:
        return fn()
    except ConfigError as err:
        if err.file is None and err.key and config:
            raise err.at(file=str(config)) from None
        raise


def _cmd_run(a: argparse.Namespace) -> int:
    from synth.config import load_config
    from synth.pipeline import resume_config, run_pipeline

    overrides = list(a.overrides)
    if a.device:
        overrides.append(f"device={a.device}")
    if a.resume:
        if a.config or a.out:
            raise UserError("--resume takes the run folder only (no CONFIG or --out)")
        from synth.rundir import RunDir

        RunDir.open_partial(a.resume)  # refuse finished or foreign folders before any work
        cfg, path = resume_config(a.resume)
        if overrides:
            raise UserError("--resume repeats the saved config; --set/--device are not allowed with it")
        final = _in_config(lambda: run_pipeline(cfg, config_path=path, resume=a.resume), path)
    else:
        if not a.config:
            raise UserError("synth run: CONFIG is required (or --resume RUN_DIR)")
        cfg = load_config(a.config, overrides)
        final = _in_config(lambda: run_pipeline(cfg, config_path=a.config, out=a.out), a.config)
    sys.stdout.write(f"{final}\n")
    return 0


def _cmd_check(a: argparse.Namespace) -> int:
    import yaml

    from synth.config import config_to_dict, load_config
    from synth.pipeline import load_target

    cfg = load_config(a.config, a.overrides)
    target = _in_config(lambda: load_target(cfg, os.path.dirname(os.path.abspath(a.config))), a.config)
    if a.print_resolved:
        sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    sys.stdout.write(f"{a.config}: OK ({target.name}: {len(target.site_ids)} sites)\n")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from synth.validation.validate import run_validate

    report = run_validate(
        a.predictions, a.recordings, a.out, a.stimuli,
        min_reliability=a.min_reliability, n_bootstrap=a.n_bootstrap, seed=a.seed, n_splits=a.n_splits,
    )
    keys = ("median_pearson_r", "median_r2_er", "median_split_half_reliability")

    def fmt(v) -> str:
        return "nan" if v is None else f"{v:.3f}"

    sys.stdout.write(" ".join(f"{k}={fmt(report.get(k))}" for k in keys) + f"\n{a.out}\n")
    return 0


def _cmd_record(a: argparse.Namespace) -> int:
    from synth.record import record_run, summary_line

    info = record_run(a.run_dir, a.out, subject=a.subject, params=a.params, n_repeats=a.repeats, seed=a.seed, device=a.device)
    sys.stdout.write(summary_line(info, a.out) + "\n")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    if a.bench == "ceiling":
        return _bench_ceiling(a, write)
    if a.bench == "gradients":
        return _bench_gradients(a, write)
    if a.bench == "redraw":
        return _bench_redraw(a, write)
    if a.bench == "choice":
        return _bench_choice(a, write)
    if a.bench == "teachers":
        return _bench_teachers(a, write)
    from synth.synthesis.bench import bench_synthesis

    bench_synthesis(device=a.device, image_size=a.image_size, n_sites=a.n_sites, steps=a.steps, seed=a.seed, write=write)
    return 0


def _recorder_of(target, device):
    """The target's simulated recorder on ``device``, or None (a lab's target records on the rig)."""
    make = getattr(target, "recorder", None)
    return make(device=device) if callable(make) else None


def _bench_ceiling(a: argparse.Namespace, write) -> int:
    from synth.config import load_config
    from synth.pipeline import load_natural, load_target
    from synth.populations.oracle import twin_ceiling
    from synth.populations.twins import TwinRecorder
    from synth.runtime import derive_seed, resolve_device
    from synth.synthesis.starts import start_views

    if a.sites is not None and a.sites < 1:
        raise UserError(f"--sites: expected a positive number, got {a.sites}")
    cfg = load_config(a.config, a.overrides)
    target = _in_config(lambda: load_target(cfg, os.path.dirname(os.path.abspath(a.config))), a.config)
    device = resolve_device(cfg.device)
    recorder = _recorder_of(target, device)
    if not isinstance(recorder, TwinRecorder):
        raise UserError(f"{a.config}: target '{target.name}' has no digital twins to synthesize on (bench ceiling needs e.g. a cowley2023 session with twins)")
    nat, _ = load_natural(cfg, target)
    sites = None if a.sites is None else list(range(min(a.sites, len(recorder.site_ids))))
    st = cfg.stimuli
    views = start_views(st.start_zooms, st.start_flips) if st.searches_views else ()
    starts = f"natural starts from the best of {len(views)} views of {st.start_candidates} images" if views else f"{st.start} starts"
    write(f"{target.name}: {len(recorder.site_ids)} twins, {nat.images.shape[0]} natural images, device {device}, "
          f"{cfg.synthesis.steps} steps, {st.seeds_per_target} images per site, {starts}")
    out = twin_ceiling(recorder, nat.images, cfg.synthesis, objective=a.objective, seeds_per_target=st.seeds_per_target,
                       seed=derive_seed(cfg.seed, "ceiling"), sites=sites, device=device, write=write, start=st.start,
                       views=views, candidates=st.start_candidates)
    if a.objective == "one_hot":
        write(f"ceiling_one_hot_ratio: {out['median_score_ratio']:.3f}")
    else:
        write(f"ceiling_stretch_fraction: {out['fraction_above_natural_max']:.3f}")
    return 0


def _bench_teachers(a: argparse.Namespace, write) -> int:
    from synth.data import cowley
    from synth.errors import ConfigError
    from synth.populations.twinbench import bench_twin_passes
    from synth.populations.twins import load_twins
    from synth.runtime import resolve_device
    from synth.surrogate.twin_backbone import parse_twin_layers

    for flag, v in (("--images", a.images), ("--grid", a.grid), ("--rounds", a.rounds)):
        if v < 1:
            raise UserError(f"{flag}: expected a positive number, got {v}")
    try:
        layers = parse_twin_layers(a.layers)
    except (ConfigError, ValueError) as err:
        raise UserError(f"--layers: {err}") from None
    device = resolve_device(a.device)
    ens = load_twins(a.root, a.session, device=device)
    _, x, _ = cowley.load_session(a.root, a.session)
    x = x[: a.images].to(device)
    write(f"twins of {a.session}: {ens.n_twins}, on {x.shape[0]} of its images, device {device}; features: {a.layers}, "
          f"{a.grid} x {a.grid} cells")
    bench_twin_passes(ens, x, layers=layers, grid=a.grid, repeats=a.rounds, write=write)
    return 0


def _bench_gradients(a: argparse.Namespace, write) -> int:
    import json

    import numpy as np

    from synth.config import load_config
    from synth.pipeline import finished_run, load_natural, load_target, synthesizing_surrogates
    from synth.populations.alignment import gradient_alignment
    from synth.runtime import resolve_device
    from synth.surrogate.model import Surrogate
    from synth.synthesis.params import PARAMS

    if a.images < 1:
        raise UserError(f"--images: expected a positive number, got {a.images}")
    if a.sites is not None and a.sites < 1:
        raise UserError(f"--sites: expected a positive number, got {a.sites}")
    run, resolved = finished_run(a.run_dir)
    cfg = load_config(resolved)
    device = resolve_device(a.device or cfg.device)
    files = [run / f for f in synthesizing_surrogates(cfg)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{a.run_dir}: surrogate checkpoint {missing[0]} missing (the run's config names {len(files)})")
    target = _in_config(lambda: load_target(cfg, str(run)), str(resolved))
    recorder = _recorder_of(target, device)
    if not callable(getattr(recorder, "site_model", None)):
        raise UserError(f"{resolved}: target '{target.name}' has no differentiable model of its sites "
                        "(bench gradients needs digital twins or the virtual population)")
    if a.at == "natural":
        nat, splits = load_natural(cfg, target)
        images, where = nat.images[splits.test[: a.images]], "held-out test images"
    else:
        from synth.data.stimuli import read_stimulus_set

        stim = read_stimulus_set(run)
        rows = np.flatnonzero(np.asarray(stim.column("objective")) == a.at)
        if rows.size == 0:
            raise UserError(f"{a.run_dir}: no {a.at} images in its stimulus set")
        rows = rows[np.unique(np.linspace(0, rows.size - 1, min(a.images, rows.size)).round().astype(int))]
        images, where = stim.images[rows], f"of the run's {a.at} images"
    models = {f.name: Surrogate.load(f, device=device) for f in files}
    n_sites = len(target.site_ids)
    sites = list(range(n_sites if a.sites is None else min(a.sites, n_sites)))
    param = PARAMS.build(cfg.synthesis.param, key="synthesis.param", channels=1 if cfg.data.grayscale else 3, size=cfg.data.image_size)
    pname = cfg.synthesis.param if isinstance(cfg.synthesis.param, str) else cfg.synthesis.param.get("name")
    write(f"{target.name}: {len(sites)} of {n_sites} sites, {images.shape[0]} {where}, device {device}, parameterization {pname}")
    out = gradient_alignment(models, recorder.site_model, images, sites=sites, param=param, device=device)
    for name in out.param:
        write(f"{name}: median over sites of the median cosine: pixel {out.median(name, 'pixel'):.3f}, parameter {out.median(name):.3f}")
    used = "ensemble" if len(models) > 1 else next(iter(models))  # what synthesized
    report = run / "report.json"
    if report.is_file():  # split the sites by the run's recorded stretch outcome
        per = (json.loads(report.read_text()).get("stretch") or {}).get("per_target") or []
        above = {str(t["target_site"]): bool(t["above_natural_max"]) for t in per if "above_natural_max" in t}
        for label, want in (("driven above their natural max", True), ("not driven above it", False)):
            sel = np.array([above.get(str(target.site_ids[s])) is want for s in sites])
            if sel.any():
                write(f"stretch outcome in report.json: {int(sel.sum())} sites {label}: {used} parameter alignment "
                      f"{float(np.median(out.param[used][sel])):.3f}")
    write(f"gradient_alignment: {out.median(used):.3f}")
    return 0


def _bench_redraw(a: argparse.Namespace, write) -> int:
    import json

    import numpy as np
    import torch

    from synth.config import load_config
    from synth.data.stimuli import read_stimulus_set
    from synth.pipeline import finished_run, load_natural, load_target
    from synth.runtime import derive_seed, resolve_device
    from synth.validation.io import read_manifest
    from synth.validation.redraw import FIGURES, headline_figures, manifest_of_sites, redraw_figures

    if a.draws < 2:
        raise UserError(f"--draws: expected at least 2, got {a.draws}")
    run, resolved = finished_run(a.run_dir, "manifest.csv", "report.json")
    cfg = load_config(resolved, a.overrides)
    device = resolve_device(a.device or cfg.device)
    target = _in_config(lambda: load_target(cfg, str(run)), str(resolved))
    recorder = _recorder_of(target, device)
    if recorder is None:
        raise UserError(f"{resolved}: target '{target.name}' records on the rig (no simulated recorder to redraw)")
    nat, _ = load_natural(cfg, target)
    stim = read_stimulus_set(run)
    natural_ids = [str(s) for s in nat.stimulus_id]
    manifest = read_manifest(run / "manifest.csv")
    stim_images, stim_ids = stim.images, [str(s) for s in stim.stimulus_id]
    if a.target_sites is not None:
        sites = [s.strip() for s in a.target_sites.split(",") if s.strip()]
        known = set(str(s) for s in recorder.site_ids)
        unknown = [s for s in sites if s not in known]
        if not sites or unknown:
            raise UserError(f"--target-sites: {unknown[0] if unknown else repr(a.target_sites)} is not a site of target "
                            f"'{target.name}' (expected comma-separated site ids such as {recorder.site_ids[0]})")
        try:
            manifest = manifest_of_sites(manifest, sites)
        except ValueError as e:
            raise UserError(f"--target-sites: {e} in {run / 'manifest.csv'}") from None
        keep = {str(r["stimulus_id"]) for r in manifest}
        rows = [i for i, s in enumerate(stim_ids) if s in keep]
        stim_images, stim_ids = stim_images[rows], [stim_ids[i] for i in rows]
    images = torch.cat([nat.images, stim_images], dim=0)
    ids = natural_ids + stim_ids
    original = None if cfg.followup.record_natural else nat.recording  # natural statistics from the original recording
    noise = getattr(recorder, "noise_info", lambda: None)()
    write(f"{target.name}: {len(recorder.site_ids)} sites, {len(natural_ids)} natural + {len(stim_ids)} synthesized images"
          + (f" (made for {len(sites)} of the sites)" if a.target_sites is not None else "")
          + f", {cfg.followup.n_repeats} repeats, {a.draws} fresh recordings" + (f", trial noise {noise['model']}" if noise else ""))
    out = redraw_figures(recorder, images, ids, natural_ids, manifest, n_repeats=cfg.followup.n_repeats,
                         draws=a.draws, seed=derive_seed(cfg.seed, "redraw"), original=original)
    if a.target_sites is None:
        own_figures = headline_figures(json.loads((run / "report.json").read_text()))
    elif (run / "followup.npz").is_file():  # the run's own recording, scored on the same subset
        from synth.data.recordings import Recording
        from synth.validation.control import closed_loop_metrics

        rec = Recording.load(run / "followup.npz")
        own_figures = headline_figures(closed_loop_metrics(rec.select(stimuli=ids), None, manifest, natural_ids, n_bootstrap=0))
    else:
        own_figures = {}
    for f in FIGURES:
        own = own_figures.get(f, float("nan"))
        sm = out.summary(f)
        line = (f"{f}: redrawn mean {sm['mean']:.3f} sd {sm['sd']:.3f} [5%: {sm['p5']:.3f}, 95%: {sm['p95']:.3f}]; "
                f"noise-free {out.expected[f]:.3f}")
        if np.isfinite(own):
            line += f"; the run's recording {own:.3f} (above {out.rank(f, float(own)):.0%} of the draws)"
        write(line)
    return 0


def _bench_choice(a: argparse.Namespace, write) -> int:
    import json

    import numpy as np
    import torch

    from synth.config import load_config
    from synth.pipeline import finished_run, load_natural, load_target
    from synth.runtime import derive_seed, resolve_device
    from synth.synthesis.scoring import candidate_scores
    from synth.validation.choice import SELECTIONS, judge_scores_of, read_candidates, selections, within_target_spearman
    from synth.validation.redraw import FIGURES, redraw_figures

    if a.draws < 2:
        raise UserError(f"--draws: expected at least 2, got {a.draws}")
    run, resolved = finished_run(a.run_dir, "manifest.csv", "report.json")
    report = json.loads((run / "report.json").read_text())
    choice = report.get("choice")
    if not isinstance(choice, dict) or not isinstance(choice.get("scores"), dict):
        raise UserError(f"{run / 'report.json'}: no 'choice' block (expected a run with fit.judge and stimuli.candidates_per_target)")
    cfg = load_config(resolved, [])
    device = resolve_device(a.device or cfg.device)
    target = _in_config(lambda: load_target(cfg, str(run)), str(resolved))
    recorder = _recorder_of(target, device)
    if recorder is None:
        raise UserError(f"{resolved}: target '{target.name}' records on the rig (no simulated recorder to score the candidates)")
    site_ids = [str(s) for s in recorder.site_ids]
    try:
        cands = read_candidates(run, site_ids)
        judge = judge_scores_of(choice, cands.stimulus_id)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    except KeyError as e:
        raise UserError(f"{run / 'report.json'}: choice.scores has no score for candidate {e.args[0]}") from None
    keep = int(choice.get("kept_per_target", cfg.stimuli.seeds_per_target))
    nat, _ = load_natural(cfg, target)
    natural_ids = [str(s) for s in nat.stimulus_id]
    n_nat = len(natural_ids)
    with torch.no_grad():
        mean = recorder.expected(torch.cat([nat.images, cands.images])).cpu()
    truth = candidate_scores(cands.objective, cands.target_index, mean[n_nat:].numpy(), mean[:n_nat].numpy())
    write(f"{target.name}: {len(cands.stimulus_id)} candidates ({choice.get('candidates_per_target', '?')} per target, the run "
          f"kept {keep}), {len(site_ids)} sites, {n_nat} natural images, {cfg.followup.n_repeats} repeats, {a.draws} fresh "
          f"recordings per choice")
    rho = within_target_spearman(cands, judge, truth)
    write("judge against the recorder's expected responses, Spearman within each target (median over targets): "
          + ", ".join(f"{o} {np.nanmedian(v):.3f} ({np.isfinite(v).sum()} targets)" if np.isfinite(v).any() else f"{o} n/a"
                      for o, v in rho.items()))
    original = None if cfg.followup.record_natural else nat.recording
    picks = selections(cands, judge, truth, keep)
    for name in SELECTIONS:
        rows = torch.as_tensor(picks[name])
        ids = natural_ids + [cands.stimulus_id[i] for i in rows.tolist()]
        out = redraw_figures(recorder, torch.cat([nat.images, cands.images[rows]]), ids, natural_ids, cands.manifest(rows.tolist()),
                             n_repeats=cfg.followup.n_repeats, draws=a.draws, seed=derive_seed(cfg.seed, "redraw"),
                             original=original, mean=torch.cat([mean[:n_nat], mean[n_nat + rows]]))
        figs = "; ".join(f"{f} noise-free {out.expected[f]:.3f} redrawn {out.summary(f)['mean']:.3f} sd {out.summary(f)['sd']:.3f}"
                         for f in FIGURES)
        write(f"{name} ({len(rows)} images): {figs}")
    return 0


def _cmd_data(a: argparse.Namespace) -> int:
    from synth.data.fetch import fetch_dataset

    if a.data_command == "export":
        from synth.data.cowley import write_lab_layout

        done = write_lab_layout(a.root, a.out, sessions=a.sessions)
        sys.stdout.write(f"{len(done)} sessions written to {a.out}: {', '.join(done)}\n")
        return 0
    paths = fetch_dataset(a.dataset, a.root, base_url=a.base_url, mirror=a.mirror)
    sys.stdout.write(f"{len(paths)} files verified in {a.root}\n")
    return 0


def _sigterm_as_interrupt() -> None:
    import signal

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        pass


def main(argv: Sequence[str] | None = None) -> int:
    _sigterm_as_interrupt()
    parser = _parser()
    a = parser.parse_args(argv)
    _setup_logging(a.debug, a.quiet)
    handler = {"run": _cmd_run, "check": _cmd_check, "validate": _cmd_validate, "record": _cmd_record, "bench": _cmd_bench, "data": _cmd_data}[a.command]
    try:
        return handler(a)
    except UserError as err:
        if a.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f"synth {a.command}: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"synth {a.command}: interrupted\n")
        return 130
    except Exception as err:  # runtime failure: short message, traceback with --debug
        if a.debug:
            raise
        log.debug("traceback", exc_info=True)
        sys.stderr.write(f"synth {a.command}: failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (rerun with --debug for the traceback)\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
