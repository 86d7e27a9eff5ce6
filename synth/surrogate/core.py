"""The core stage: a shared core trained on a lab's *other* recording sessions, cached.

A lab fits today's session with a core trained on its past sessions (one readout per
session, :func:`synth.surrogate.fit.fit_core`) and only a readout on today's natural
images. With ``fit.backbone: pretrained_core`` and ``fit.weights: auto`` the pipeline
calls :func:`ensure_core`, which

1. plans the core (:func:`plan_core`): the sessions under the data root (a Cowley
   release, or a lab's own sessions found through ``{session}`` in a ``kind: recordings``
   target's paths; :mod:`synth.data.sessions`) minus the evaluated session (and ``fit.core.exclude``), the digital-twin "teachers" used for
   distillation (never the evaluated session's own twins: those are its follow-up
   recorder), and a cache key = SHA-256 of the data files' checksums, the core config
   (less its time limit, less ``distill_images`` when there is no teacher, and less
   ``distill_noise_images``, ``distill_synth_*``, ``distill_jacobian*`` and
   ``adversarial_eps`` when there is none or they are 0), the image mode and the seed;
2. loads ``<cache>/cores/<key>/core.pt`` when it exists (a second run reuses it; a core
   cut short by its time limit is retrained when this run's limit is higher), else
   trains the core and writes it there atomically, with ``core.json`` (sessions, twins,
   validation r, train time).

Distillation (optional): each teacher session's twins, calibrated to their own neurons
on their own session's natural images, label ``distill_images`` images drawn (seeded)
from the core sessions, plus ``distill_noise_images`` seeded 1/f-noise images like the
synthesized stimuli (:func:`noise_images`), plus ``distill_synth_images`` stretch images
synthesized on the teachers' own twins (:func:`teacher_stimuli`: what past sessions'
recorded synthetic stimuli give a lab); those labels enter ``fit_core`` as one extra
"session" per teacher (``twins:<session>``). Twins are other neurons than the evaluated ones, used
like any pretrained model. With ``distill_jacobian`` > 0 the core also learns the teachers'
input gradients (Jacobian matching, :func:`jacobian_targets`): on each distillation image,
the direction in which one of the teacher's twins would change, as synthesis sees it.

The cache lives outside the repository: ``fit.core.cache_dir``, else
``$SYNTH_CACHE_DIR/cores``, else ``~/.cache/synth/cores``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from synth.errors import ConfigError, DataError
from synth.runtime import derive_seed, file_sha256

log = logging.getLogger(__name__)

#: Bump when the core training changes in a way that invalidates cached cores.
CORE_CACHE_VERSION = 1
CORE_FILE = "core.pt"
CORE_INFO = "core.json"


@dataclass(frozen=True, kw_only=True)
class CoreConfig:
    """The ``fit.core`` section: how the shared core is trained (``weights: auto``).

    The core is a ``small_cnn`` (``backbone_kwargs``) trained with one readout per
    session; early stopping on the mean over sessions of the validation median r.
    """

    sessions: tuple[str, ...] | None = field(
        default=None, metadata={"help": "sessions to train on (default: every session under target.root except the evaluated one)"}
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "further sessions to leave out"})
    distill_twins: str | tuple[str, ...] = field(
        default="none",
        metadata={"help": "sessions whose digital twins label extra images: none, auto (all with twins but the evaluated one) or a list"},
    )
    distill_images: int = field(default=6000, metadata={"min": 2, "help": "images (from the core sessions) each teacher labels (at most all of them)"})
    distill_noise_images: int = field(
        default=0,
        metadata={"min": 0, "help": "seeded 1/f-noise images (half of them blended with natural ones), like synthesized "
                  "stimuli, that each teacher labels too: responses off the natural-image manifold (0: none)"},
    )
    distill_synth_images: int = field(
        default=0,
        metadata={"min": 0, "help": "images synthesized by gradient ascent on the teachers' own twins (stretch of one twin "
                  "each, the closed-loop recipe: TEACHER_SYNTHESIS), then labelled by every teacher: responses to stimuli "
                  "like those the loop makes, as past sessions' recorded synthetic images would give (0: none; "
                  "1000 on 201025 gave no gain: docs/cowley2023.md)"},
    )
    distill_jacobian: float = field(
        default=0.0,
        metadata={"min": 0.0, "help": "Jacobian matching: weight of 1 - cosine between the core's input gradient for one "
                  "teacher twin per distillation image and that twin's own, both seen through the fourier "
                  "preconditioner (distill_jacobian_decay); the teachers' batches then take about 7x as long (0: off; "
                  "on 201025 and 190923 it did not improve control: docs/cowley2023.md)"},
    )
    distill_jacobian_decay: float = field(
        default=2.5, metadata={"min": 0.0, "help": "decay_power of the fourier view in which Jacobians are compared (the synthesis param's)"}
    )
    distill_jacobian_from_epoch: int = field(
        default=1, metadata={"min": 1, "help": "first epoch (1-based) with Jacobian matching, after plain training; the kept epoch "
                             "(early stopping) is then one of the matched epochs"}
    )
    distill_synth_steps: int = field(default=64, metadata={"min": 1, "max": 10000, "help": "gradient steps per teacher-synthesized image"})
    distill_features: str = field(
        default="none",
        metadata={"help": "feature distillation: the teachers' hidden layers (layer2, layer3, layer4 or layersA-B, as for "
                  "backbone cowley_twins), each channel averaged over the cells of a distill_features_grid x "
                  "distill_features_grid grid, are extra targets of the core on the distillation images (one pseudo-site "
                  "per channel and cell, with their own readout: 'twinfeatures:<session>'); none: off"},
    )
    distill_features_grid: int = field(default=3, metadata={"min": 1, "max": 28, "help": "cells per side over which distill_features are averaged"})
    distill_features_readout: str = field(
        default="cells",
        metadata={"choices": ("cells", "factorized"), "help": "the core's readout of the feature targets: cells (channel weights "
                  "over the target's own cell of the core's features: cheap) or factorized (a learned mask per target, like "
                  "the sessions': about 2.2x the time per epoch (the cell readout: 1.5x) with layers3-4 on a 3 x 3 grid)"},
    )
    objective: str = field(
        default="responses",
        metadata={"choices": ("responses", "teacher_maps"), "help": "responses: the core learns the core sessions' recorded "
                  "responses (one readout each) and the teachers' labels; teacher_maps: a student core whose output (a 1x1 "
                  "head after its last layer) reproduces the distill_twins teachers' hidden maps (teacher_layers) on "
                  "distill_images images of the core sessions: twin-like features for a readout at a small CNN's cost "
                  "(synth.surrogate.student; mean squared error on the maps, the best epoch by validation R^2 kept: "
                  "loss, readout and patience are not used)"},
    )
    teacher_layers: str = field(
        default="layers2-4",
        metadata={"help": "objective teacher_maps: the teachers' layers whose 28 x 28 maps the student reproduces (layer2, "
                  "layer3, layer4 or layersA-B, as for backbone cowley_twins)"},
    )
    teacher_components: int = field(
        default=256,
        metadata={"min": 0, "help": "objective teacher_maps: principal components of the teachers' standardized channels "
                  "the student reproduces (its head's channels; 0: every channel, e.g. 502 for 190923's 33 twins' layers 2-4)"},
    )
    backbone_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "small_cnn arguments (channels, n_layers, first_kernel, ...)"}
    )
    input_size: int = field(default=64, metadata={"min": 16, "max": 1024, "help": "core input size (images are resized once)"})
    readout: dict[str, Any] | str = field(default_factory=lambda: {"name": "factorized"}, metadata={"help": "per-session readout"})
    loss: str = field(default="poisson", metadata={"choices": ("poisson", "mse")})
    epochs: int = field(default=30, metadata={"min": 1, "max": 100000})
    batch_size: int = field(default=64, metadata={"min": 2, "max": 65536})
    lr: float = field(default=3e-3, metadata={"min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    patience: int = field(default=6, metadata={"min": 1})
    lr_schedule: str = field(default="cosine", metadata={"choices": ("plateau", "cosine")})
    augment_shift: int = field(default=0, metadata={"min": 0, "max": 64, "help": "random shifts (pixels at input_size)"})
    precision: str = field(
        default="fp32",
        metadata={
            "choices": ("auto", "fp32", "bf16"),
            "help": "bf16: autocast the core's training passes to bfloat16 (about 2x faster on CPUs with native bf16, "
            "AVX512-BF16/AMX, and on CUDA; slower where it is emulated); weights stay float32. auto: bf16 where native, "
            "else fp32 (the precision used is in the core's report)",
        },
    )
    adversarial_eps: float = field(
        default=0.0,
        metadata={"min": 0.0, "help": "adversarial training: each training image moved one L2 step of this length "
                  "([0, 1] pixels at input_size) up the loss gradient, about 1.6x the time per epoch (0: off; "
                  "on 201025's member core, 0.15 and 0.5 lowered the stretch figures: docs/cowley2023.md)"},
    )
    val_fraction: float = field(default=0.1, metadata={"min": 0.01, "max": 0.5, "help": "per-session images for early stopping"})
    max_minutes: float | None = field(default=55.0, metadata={"min": 0.0, "help": "time limit of the whole core stage (data, twin labelling, training): no epoch is started that would end past it; the best epoch is kept"})
    cache_dir: str | None = field(default=None, metadata={"help": "where cores are cached (default $SYNTH_CACHE_DIR or ~/.cache/synth)"})

    def __post_init__(self) -> None:
        if isinstance(self.readout, str):
            object.__setattr__(self, "readout", {"name": self.readout})
        if isinstance(self.distill_twins, str) and self.distill_twins not in ("none", "auto"):
            raise ConfigError(f"expected none, auto or a list of session ids, got {self.distill_twins!r}", key="distill_twins")
        if self.distill_features != "none":
            from synth.surrogate.twin_backbone import parse_twin_layers

            try:
                parse_twin_layers(self.distill_features)
            except ConfigError:
                raise ConfigError(
                    f"unknown layer {self.distill_features!r}; expected none, layer2, layer3, layer4 or layersA-B with 2 <= A <= B <= 4",
                    key="distill_features",
                ) from None
        if self.objective == "teacher_maps":
            self._check_student()
        self.fit_config()  # validates backbone_kwargs and readout

    def _check_student(self) -> None:
        """``objective: teacher_maps`` takes teachers and none of the response-training options."""
        from synth.surrogate.twin_backbone import parse_twin_layers

        if self.distill_twins == "none" or self.distill_twins == ():
            raise ConfigError("objective teacher_maps needs teachers: set distill_twins to auto or a list of other sessions", key="distill_twins")
        try:
            parse_twin_layers(self.teacher_layers)
        except ConfigError:
            raise ConfigError(
                f"unknown layer {self.teacher_layers!r}; expected layer2, layer3, layer4 or layersA-B with 2 <= A <= B <= 4", key="teacher_layers"
            ) from None
        if "head" in self.backbone_kwargs:
            raise ConfigError("the student's head is set by teacher_components, not backbone_kwargs", key="backbone_kwargs.head")
        unused = {
            "augment_shift": (self.augment_shift, 0, "shifts would move the images but not the teachers' maps"),
            "distill_noise_images": (self.distill_noise_images, 0, "a response-training option"),
            "distill_synth_images": (self.distill_synth_images, 0, "a response-training option"),
            "distill_jacobian": (self.distill_jacobian, 0.0, "a response-training option"),
            "distill_features": (self.distill_features, "none", "use teacher_layers"),
            "adversarial_eps": (self.adversarial_eps, 0.0, "a response-training option"),
            "lr_schedule": (self.lr_schedule, "cosine", "the student's rate is annealed on a cosine, the best epoch kept"),
        }
        for key, (value, default, why) in unused.items():
            if value != default:
                raise ConfigError(f"objective teacher_maps takes {key}: {default} ({why}), got {value!r}", key=key)

    def fit_config(self):
        """The :class:`~synth.surrogate.fit.FitConfig` handed to ``fit_core``."""
        from synth.configtools import from_dict
        from synth.surrogate.fit import FitConfig

        val = float(self.val_fraction)
        return from_dict(
            FitConfig,
            {
                "backbone": "small_cnn",
                "weights": "none",
                "backbone_kwargs": dict(self.backbone_kwargs),
                "readout": dict(self.readout),
                "loss": self.loss,
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "lr": self.lr,
                "weight_decay": self.weight_decay,
                "patience": self.patience,
                "lr_schedule": self.lr_schedule,
                "augment_shift": self.augment_shift,
                "input_size": self.input_size,
                # fit_core splits train : val; the test share is unused here
                "split": {"train": round(0.99 - val, 6), "val": val, "test": 0.01},
            },
        )


def cache_root(cc: CoreConfig | None = None) -> Path:
    """Folder holding cached cores (outside the repository)."""
    if cc is not None and cc.cache_dir:
        return Path(os.path.expanduser(cc.cache_dir))
    from synth.populations.twins import cache_dir

    return cache_dir() / "cores"


@dataclass(frozen=True)
class CorePlan:
    """What a core stage will use, decided before any training.

    Attributes:
        root: data root.
        source: where the sessions are read from (:mod:`synth.data.sessions`).
        evaluated: the evaluated session (never in ``sessions``; its twins never in ``teachers``).
        sessions: sessions whose recordings train the core.
        teachers: sessions whose digital twins label extra images.
        grayscale: image mode of the core (that of the experiment).
        seed: training seed.
        key: cache key (SHA-256 hex).
        path: the cached core file.
        checksums: data file -> SHA-256 that entered the key.
    """

    root: str
    evaluated: str
    sessions: tuple[str, ...]
    teachers: tuple[str, ...]
    grayscale: bool
    seed: int
    key: str
    path: Path
    checksums: Mapping[str, str]
    config: CoreConfig
    source: Any


def plan_core(cc: CoreConfig, *, root: str | os.PathLike | None = None, evaluated: str, grayscale: bool, seed: int, source=None) -> CorePlan:
    """Decide the core's sessions, teachers and cache key (cheap; validates the config).

    Args:
        cc: the ``fit.core`` section.
        root: a Cowley et al. (2023) data root (when ``source`` is not given).
        evaluated: the evaluated session (never trains the core).
        grayscale: the experiment's image mode.
        seed: the core's training seed.
        source: the sessions (:class:`~synth.data.sessions.SessionSource`; default
            :class:`~synth.data.sessions.CowleySessions` of ``root``).

    Raises:
        ConfigError: the evaluated session (or its twins) requested for the core, an
            unknown session, no session left, a teacher without twins.
    """
    from synth.data.sessions import CowleySessions

    if source is None:
        source = CowleySessions(str(root))
    root = str(source.root)
    evaluated = str(evaluated)
    present = source.list_sessions()
    excluded = {evaluated, *(str(s) for s in cc.exclude)}
    if cc.sessions is None:
        sessions = [s for s in present if s not in excluded]
    else:
        sessions = [str(s) for s in cc.sessions]
        if evaluated in sessions:
            raise ConfigError(
                f"lists the evaluated session {evaluated}; the core must be trained on other sessions", key="fit.core.sessions"
            )
        unknown = [s for s in sessions if s not in present]
        if unknown:
            raise ConfigError(f"no session '{unknown[0]}' under {root}; sessions present: {', '.join(present)}", key="fit.core.sessions")
        sessions = [s for s in dict.fromkeys(sessions) if s not in excluded]
    if not sessions:
        raise ConfigError(f"no session left to train the core on under {root} (evaluated {evaluated}, excluded {sorted(excluded)})", key="fit.core.sessions")
    with_twins = source.twin_sessions()
    if cc.distill_twins == "none":
        teachers: list[str] = []
    elif cc.distill_twins == "auto":
        teachers = [s for s in with_twins if s != evaluated]
    else:
        teachers = [str(s) for s in cc.distill_twins]
        if evaluated in teachers:
            raise ConfigError(
                f"lists the evaluated session {evaluated}: its own twins are its follow-up recorder and never train its surrogate",
                key="fit.core.distill_twins",
            )
        missing = [s for s in teachers if s not in with_twins]
        if missing:
            raise ConfigError(f"session '{missing[0]}' has no digital twins under {root} (sessions with twins: {', '.join(with_twins) or 'none'})", key="fit.core.distill_twins")
        teachers = list(dict.fromkeys(teachers))
    checksums: dict[str, str] = {}
    for s in sorted(set(sessions) | set(teachers)):
        for name, p in source.checksum_files(s).items():
            checksums[name] = file_sha256(p)
    for t in teachers:
        for name, p in source.twin_files(t).items():
            checksums[name] = file_sha256(p)
    from synth.configtools import to_dict

    cfg_d = to_dict(cc)
    cfg_d.pop("cache_dir", None)
    cfg_d.pop("max_minutes", None)  # a time limit does not change what is trained, only how long
    if not teachers:
        cfg_d.pop("distill_images", None)  # no teacher labels any image: the count changes nothing
    if not teachers or not cfg_d.get("distill_noise_images"):
        cfg_d.pop("distill_noise_images", None)  # keeps the keys of cores trained before the option existed
    if not teachers or not cfg_d.get("distill_synth_images"):
        cfg_d.pop("distill_synth_images", None)  # likewise
        cfg_d.pop("distill_synth_steps", None)
    else:
        cfg_d["teacher_synthesis"] = TEACHER_SYNTHESIS  # the recipe of those images is part of what is trained
    if not teachers or not cfg_d.get("distill_jacobian"):
        cfg_d.pop("distill_jacobian", None)  # likewise
        cfg_d.pop("distill_jacobian_decay", None)
        cfg_d.pop("distill_jacobian_from_epoch", None)
    elif cfg_d.get("distill_jacobian_from_epoch") == 1:
        cfg_d.pop("distill_jacobian_from_epoch", None)  # keeps the keys of cores trained before the option
    else:
        cfg_d["jacobian_epoch_selection"] = "matched epochs only"  # since 2026-12-05 (was: any epoch)
    if cfg_d.get("objective") == "responses":
        for k in ("objective", "teacher_layers", "teacher_components"):
            cfg_d.pop(k, None)  # keeps the keys of cores trained before the option existed
    elif not teachers:
        raise ConfigError(
            f"objective teacher_maps needs other sessions' digital twins under {root}; none found but the evaluated session's "
            f"(sessions with twins: {', '.join(with_twins) or 'none'})",
            key="fit.core.distill_twins",
        )
    if not cfg_d.get("adversarial_eps"):
        cfg_d.pop("adversarial_eps", None)  # likewise
    if not teachers or cfg_d.get("distill_features") == "none":
        cfg_d.pop("distill_features", None)  # likewise
        cfg_d.pop("distill_features_grid", None)
        cfg_d.pop("distill_features_readout", None)
    keyed = {
        "version": CORE_CACHE_VERSION,
        "config": cfg_d,
        "sessions": sessions,
        "teachers": teachers,
        "grayscale": bool(grayscale),
        "seed": int(seed),
        "checksums": checksums,
    }
    if source.kind != "cowley2023":
        keyed["source"] = source.kind  # (the Cowley cores' keys predate other sources)
    blob = json.dumps(keyed, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()
    path = cache_root(cc) / key[:24] / CORE_FILE
    return CorePlan(root, evaluated, tuple(sessions), tuple(teachers), bool(grayscale), int(seed), key, path, checksums, cc, source)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The resize ``Backbone.preprocess`` would apply (bilinear, antialiased), done once."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = []
    for i in range(0, x.shape[0], 256):
        xb = x[i : i + 256]
        down = xb.shape[-1] > size
        out.append(F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False, antialias=down).clamp_(0, 1))
    return torch.cat(out)


def training_sets(plan: CorePlan, *, device: torch.device | str = "cpu") -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str], dict[str, Any]]:
    """Load the core's datasets: one per session, plus one per teacher's twins.

    Args:
        plan: from ``plan_core``.
        device: where the teachers' twins compute their labels (the datasets stay on the CPU).

    Returns:
        (datasets, names, info): datasets of (images at ``input_size`` in the plan's
        image mode, responses (N, S)); names ``"<session>"`` / ``"twins:<session>"``.

    Raises:
        DataError: if the evaluated session would enter (a guard; ``plan_core`` excludes it).
    """
    if plan.evaluated in plan.sessions or plan.evaluated in plan.teachers:
        raise DataError(f"core plan includes the evaluated session {plan.evaluated}")
    cc = plan.config
    source = plan.source
    size = int(cc.input_size)
    datasets: list[tuple[torch.Tensor, torch.Tensor]] = []
    names: list[str] = []
    native: dict[str, torch.Tensor] = {}
    counts: dict[str, dict[str, int]] = {}
    for s in plan.sessions:
        x, y = source.load(s)
        if plan.teachers:
            native[s] = x
        datasets.append((_resize(source.in_mode(x, plan.grayscale), size), y))
        names.append(s)
        counts[s] = {"images": int(x.shape[0]), "sites": int(y.shape[1])}
        log.info("core data: session %s, %d images, %d sites", s, x.shape[0], y.shape[1])
    teacher_info: dict[str, Any] = {}
    if plan.teachers:
        x_sel, image_sessions = distill_selection(plan, native)
        # the whole pool again only where noise or synthesized images are drawn from it
        pool = torch.cat([native[s] for s in plan.sessions]) if cc.distill_noise_images or cc.distill_synth_images else x_sel
        n = x_sel.shape[0]
        if cc.distill_noise_images:
            x_sel = torch.cat([x_sel, noise_images(int(cc.distill_noise_images), pool, derive_seed(plan.seed, "core-distill-noise"))])
        recs = {t: source.teacher(t, device) for t in plan.teachers}
        n_synth: dict[str, int] = {}
        synth_seconds: dict[str, float] = {}
        if cc.distill_synth_images:
            parts = []
            for j, t in enumerate(plan.teachers):  # the images are shared among the teachers
                k = int(cc.distill_synth_images) // len(plan.teachers) + (j < int(cc.distill_synth_images) % len(plan.teachers))
                t0 = time.perf_counter()
                parts.append(teacher_stimuli(recs[t], pool, k, seed=derive_seed(plan.seed, "core-distill-synth", t), steps=int(cc.distill_synth_steps), device=device))
                n_synth[t], synth_seconds[t] = k, round(time.perf_counter() - t0, 1)
                log.info("core data: %d images synthesized on the twins of %s (%.0f s)", k, t, synth_seconds[t])
        x_syn = torch.cat(parts) if cc.distill_synth_images else x_sel[:0]
        x_all = torch.cat([x_sel, x_syn]) if x_syn.shape[0] else x_sel
        x_core = _resize(source.in_mode(x_all, plan.grayscale), size)  # one copy for every teacher
        for t in plan.teachers:
            rec_t = recs[t]
            t0 = time.perf_counter()
            # labelled apart, so the natural (and noise) images' labels come from the twins'
            # cache of an earlier core whatever the synthesized images are; with feature
            # targets, the labels come from the same pass through the twins as the features
            parts_y, parts_f = [], []
            for xs in (x_sel, x_syn) if x_syn.shape[0] else (x_sel,):
                if cc.distill_features != "none":
                    y_p, f_p = teacher_targets(rec_t, xs, cc.distill_features, int(cc.distill_features_grid))
                    parts_f.append(f_p)
                else:
                    y_p = rec_t.expected(xs)
                parts_y.append(y_p.float())
            y_t = torch.cat(parts_y)
            datasets.append((x_core, y_t))
            names.append(f"twins:{t}")
            teacher_info[t] = {
                "n_twins": int(y_t.shape[1]),
                "n_images": int(n),
                "n_noise_images": int(cc.distill_noise_images),
                "n_synth_images": int(sum(n_synth.values())),
                "synthesized_on_own_twins": int(n_synth.get(t, 0)),
                "synth_seconds": synth_seconds.get(t, 0.0),
                "image_sessions": image_sessions,
                "calibration_median_r": rec_t.info.get("median_r"),
                "label_seconds": round(time.perf_counter() - t0, 1),
            }
            log.info("core data: twins of %s labelled %d images (%d noise and %d synthesized images among them; %.0f s)",
                     t, y_t.shape[0], int(cc.distill_noise_images), x_syn.shape[0], time.perf_counter() - t0)
            if parts_f:
                f_t = torch.cat(parts_f)
                datasets.append((x_core, f_t))
                names.append(f"twinfeatures:{t}")
                teacher_info[t]["feature_targets"] = int(f_t.shape[1])
                log.info("core data: twins of %s gave %d feature targets (%s, %d x %d cells) on %d images, in the labels' pass",
                         t, f_t.shape[1], cc.distill_features, cc.distill_features_grid, cc.distill_features_grid, f_t.shape[0])
    return datasets, names, {"sessions": counts, "teachers": teacher_info}


def student_set(plan: CorePlan, *, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A student core's data (``objective: teacher_maps``): the distillation images and the
    teachers' maps on them (:func:`~synth.surrogate.student.teacher_map_targets`).

    Returns:
        ``(images, maps, info)``: images at ``input_size`` in the plan's image mode, the
        maps ``(N, K, 28, 28)`` bfloat16, and what they are (for the core's info).
    """
    from synth.surrogate.student import teacher_map_targets
    from synth.surrogate.twin_backbone import parse_twin_layers

    if plan.evaluated in plan.sessions or plan.evaluated in plan.teachers:
        raise DataError(f"core plan includes the evaluated session {plan.evaluated}")
    cc = plan.config
    native = {s: plan.source.load(s)[0] for s in plan.sessions}
    x_sel, image_sessions = distill_selection(plan, native)
    del native
    x_mode = plan.source.in_mode(x_sel, plan.grayscale)  # the teachers see what the student sees
    t0 = time.perf_counter()
    recorders = [plan.source.teacher(t, device) for t in plan.teachers]
    ensembles = [r.ensemble for r in recorders]
    targets = teacher_map_targets(ensembles, x_mode, parse_twin_layers(cc.teacher_layers), int(cc.teacher_components))
    # the twins' outputs came with the maps: cached as labels, a core distilled from the same
    # teachers on the same images (trained after the student, ``_core_stage``) reads them
    for r, y in zip(recorders, targets.outputs):
        r.remember(x_mode, y)
    seconds = round(time.perf_counter() - t0, 1)
    log.info(
        "core data: the twins of %s gave %d channels (%s) on %d images, kept as %d components (%.0f%% of their variance; %.0f s)",
        ", ".join(plan.teachers), targets.n_channels, cc.teacher_layers, x_sel.shape[0], targets.maps.shape[1], 100 * targets.explained, seconds,
    )
    info = {
        "teachers": {t: {"n_twins": int(e.n_twins)} for t, e in zip(plan.teachers, ensembles)},
        "n_images": int(x_sel.shape[0]),
        "image_sessions": image_sessions,
        "teacher_layers": cc.teacher_layers,
        "teacher_channels": targets.n_channels,
        "components": int(targets.maps.shape[1]),
        "explained_variance": round(targets.explained, 4),
        "map_seconds": seconds,
    }
    return _resize(x_mode, int(cc.input_size)), targets.maps, info


def distill_selection(plan: CorePlan, native: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """The distillation images: ``distill_images`` of the core sessions' natural images, a
    seeded choice (at most all of them).

    Args:
        plan: from ``plan_core``.
        native: session -> its images at the native size (RGB, the twins' input).

    Returns:
        ``(images, sessions)``: ``(n, 3, H, W)`` and the sessions they come from (sorted).
    """
    pool = torch.cat([native[s] for s in plan.sessions])
    origin = np.concatenate([[s] * native[s].shape[0] for s in plan.sessions])
    rng = np.random.default_rng(derive_seed(plan.seed, "core-distill"))
    n = min(int(plan.config.distill_images), pool.shape[0])
    idx = np.sort(rng.choice(pool.shape[0], size=n, replace=False))
    return pool[torch.as_tensor(idx)], sorted({str(o) for o in origin[idx]})


def teacher_targets(recorder, images: torch.Tensor, layers: str, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's labels and its hidden layers as feature-distillation targets, in one pass.

    The labels are ``recorder.expected(images)`` (cached like them); the features, every
    twin's channels in ``layers`` (:func:`~synth.surrogate.twin_backbone.parse_twin_layers`),
    each averaged over the cells of a ``grid`` x ``grid`` grid: column ``k`` is cell
    ``k % grid ** 2`` (row-major) of one channel.

    Args:
        recorder: the teacher's calibrated :class:`~synth.populations.twins.TwinRecorder`.
        images: ``(N, 3, H, W)`` in [0, 1].
        layers: twin layer name (``layer4``, ``layers3-4``...).
        grid: cells per side.

    Returns:
        ``(labels, features)``: ``(N, T)`` and ``(N, K)`` float32 on the CPU (the features
        >= 0: averages of ReLU maps).
    """
    from synth.surrogate.twin_backbone import parse_twin_layers

    y, f = recorder.expected_and_features(images, parse_twin_layers(layers), grid)
    return y.float().cpu(), f.float().cpu()


def noise_images(n: int, natural: torch.Tensor, seed: int, decay_power: float = 2.5) -> torch.Tensor:
    """Seeded images with the statistics of synthesized stimuli, for teachers to label.

    Random spectra scaled by ``1/f ** decay_power`` (the synthesis' Fourier
    parameterization, decorrelated colour) at RMS contrasts spread from low to high, shifted
    to the natural images' mean luminance; the second half is blended (weights 0.3-0.7) with
    random natural images, so the set spans the way from natural to synthetic.

    Args:
        n: number of images.
        natural: ``(N, C, H, W)`` natural images in [0, 1] (size, channels, luminance, blends).
        seed: drives every draw.

    Returns:
        ``(n, C, H, W)`` images in [0, 1].
    """
    from synth.synthesis.params import FourierParam

    _, c, h, w = natural.shape
    if h != w:
        raise ValueError(f"noise_images expects square natural images, got {h} x {w}")
    g = torch.Generator().manual_seed(int(seed))
    param = FourierParam(decay_power=decay_power, channels=c, size=h, output="sigmoid", decorrelate=True, init_sd=1.0)
    amp = torch.empty(n, 1, 1, 1, 1).uniform_(1.0, 5.0, generator=g)
    with torch.no_grad():
        x = param(torch.randn((n, *param.param_shape), generator=g) * amp)
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True) + natural.mean()).clamp(0.0, 1.0)
    half = n // 2
    pick = torch.randint(0, natural.shape[0], (n - half,), generator=g)
    a = torch.empty(n - half, 1, 1, 1).uniform_(0.3, 0.7, generator=g)
    x[half:] = (1 - a) * natural[pick] + a * x[half:]
    return x


#: The synthesis recipe of the teachers' own stimuli (that of configs/cowley2023_closed_loop.yaml).
TEACHER_SYNTHESIS: dict[str, Any] = {
    "param": {"name": "fourier", "decay_power": 2.5},
    "transforms": [{"name": "jitter", "pixels": 6}, {"name": "scale", "min": 0.9, "max": 1.1}, {"name": "rotate", "degrees": 10}],
    "priors": [{"name": "tv", "weight": 5.0}],
    "constraints": {"luminance": "natural", "contrast": None},
    "precision": "auto",
}


def teacher_stimuli(recorder, natural: torch.Tensor, n: int, *, seed: int, steps: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stretch images synthesized on a teacher's own twins, for the teachers to label.

    Image ``i`` maximizes twin ``perm[i % T]`` alone (a seeded permutation of the ``T``
    twins, so every twin gets ``n // T`` or one more images) with ``TEACHER_SYNTHESIS`` and
    ``steps`` steps (:func:`synth.populations.oracle.stretch_on_twin`, one batch per twin).

    Args:
        recorder: the teacher's calibrated ``TwinRecorder``.
        natural: ``(N, 3, H, W)`` natural images in [0, 1] (z-scoring on up to 2000 of
            them, mean luminance, size).
        n: number of images.
        seed: drives the permutation, the z-scoring images and every image's seed.
        steps: gradient steps per image.
        device: where to synthesize.

    Returns:
        ``(n, 3, H, W)`` images in [0, 1] (8-bit levels), on the CPU.
    """
    from synth.configtools import from_dict
    from synth.populations.oracle import stretch_on_twin
    from synth.progress import progress
    from synth.synthesis.config import SynthesisConfig

    _, c, h, w = natural.shape
    if n <= 0:
        return natural.new_empty((0, c, h, w))
    t_count = int(recorder.ensemble.n_twins)
    rng = np.random.default_rng(int(seed))
    perm = rng.permutation(t_count)
    sites = perm[np.arange(n) % t_count]
    nat = natural[torch.as_tensor(np.sort(rng.choice(natural.shape[0], size=min(2000, natural.shape[0]), replace=False)))]
    nat_y = recorder.expected(nat)
    cfg = from_dict(SynthesisConfig, {**TEACHER_SYNTHESIS, "steps": int(steps)}, key="TEACHER_SYNTHESIS")
    out = natural.new_empty((n, c, h, w))
    groups = sorted(set(sites.tolist()))
    for site in progress(groups, desc="teacher stimuli", total=len(groups)):
        rows = np.flatnonzero(sites == site)
        seeds = [derive_seed(seed, "image", int(i)) for i in rows]
        out[torch.as_tensor(rows)] = stretch_on_twin(recorder, site, seeds, cfg, natural=nat, natural_y=nat_y, device=device)
    return out


def jacobian_targets(plan: CorePlan, datasets: Sequence[tuple[torch.Tensor, torch.Tensor]], names: Sequence[str], *, device: torch.device | str = "cpu", batch_size: int = 64):
    """Each teacher's input gradients on its distillation images, for Jacobian matching.

    Per image one twin, drawn (seeded) uniformly among the teacher's twins; its calibrated
    response's gradient with respect to the image as the core sees it (``input_size``,
    the plan's image mode), in the ``fourier`` view of ``distill_jacobian_decay``.

    Returns:
        ``{"twins:<session>": JacobianTargets}`` for :func:`~synth.surrogate.fit.fit_core`
        (empty when ``distill_jacobian`` is 0 or there are no teachers).
    """
    from synth.progress import progress
    from synth.surrogate.fit import JacobianTargets, spectral_view

    cc = plan.config
    if not cc.distill_jacobian or not plan.teachers:
        return {}
    out = {}
    for t in plan.teachers:
        name = f"twins:{t}"
        x, y = datasets[list(names).index(name)]
        rec = plan.source.teacher(t, device)
        rng = np.random.default_rng(derive_seed(plan.seed, "core-jacobian", t))
        sites = torch.as_tensor(rng.integers(0, y.shape[1], size=x.shape[0]), dtype=torch.int64)
        grads = torch.empty(x.shape, dtype=torch.float16)
        t0 = time.perf_counter()
        drawn = sites.unique().tolist()
        for site in progress(drawn, desc=f"teacher gradients {t}", total=len(drawn)):
            model = rec.site_model(site)
            rows = torch.nonzero(sites == site).flatten()
            for k in range(0, rows.numel(), batch_size):
                r = rows[k : k + batch_size]
                xb = x[r].to(device).requires_grad_(True)
                (g,) = torch.autograd.grad(model(xb).sum(), xb)
                v = spectral_view(g, cc.distill_jacobian_decay)
                grads[r] = (v / v.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, 1, 1, 1)).cpu().half()
        log.info("core data: twins of %s gave %d input gradients for Jacobian matching (%.0f s)", t, x.shape[0], time.perf_counter() - t0)
        out[name] = JacobianTargets(sites=sites, grads=grads, weight=float(cc.distill_jacobian), decay_power=float(cc.distill_jacobian_decay))
    return out


def feature_readouts(cc: CoreConfig, names: Sequence[str]) -> dict[str, Callable[[tuple[int, int, int], int], Any]]:
    """The readout builders of the feature-distillation datasets (``twinfeatures:<session>``)
    for :func:`~synth.surrogate.fit.fit_core`: :class:`~synth.surrogate.readouts.CellReadout`
    with ``distill_features_readout: cells`` (none otherwise: they get the core's readout)."""
    if cc.distill_features == "none" or cc.distill_features_readout != "cells":
        return {}
    from synth.surrogate.readouts import CellReadout

    g = int(cc.distill_features_grid)

    def build(in_shape: tuple[int, int, int], n_sites: int) -> CellReadout:
        return CellReadout(in_shape, torch.arange(n_sites) % (g * g), g)

    return {n: build for n in names if n.startswith("twinfeatures:")}


def read_cached(plan: CorePlan, stage_minutes: float | None = None) -> dict[str, Any] | None:
    """The cached core's info (None when absent, unreadable, or cut short by a time limit
    that ``plan`` raises or lifts: the limit is not part of the key, so such a core would
    otherwise be reused when a lab raises the limit after a slow day). A core cut short by
    the core stage's limit (``fit.core_stage_minutes``, less than its own) is likewise
    retrained when ``stage_minutes`` raises or lifts that limit."""
    info_path = plan.path.with_name(CORE_INFO)
    if not (plan.path.exists() and info_path.exists()):
        return None
    try:
        info = json.loads(info_path.read_text())
        obj = torch.load(plan.path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged cache entry: retrain
        log.warning("ignoring unreadable cached core %s (%s)", plan.path, err)
        return None
    from synth.surrogate.backbones import CORE_FORMAT

    if not isinstance(obj, Mapping) or obj.get("format") != CORE_FORMAT or info.get("key") != plan.key:
        log.warning("ignoring cached core %s (wrong format or key)", plan.path)
        return None
    limit = plan.config.max_minutes
    if info.get("stopped_by_time_limit"):
        old = (info.get("config") or {}).get("max_minutes")
        if limit is None or (old is not None and float(limit) > float(old)):
            log.info(
                "core: the cached core %s stopped at its time limit (%s min, %s of %s epochs) and this run allows %s: retraining",
                plan.path, old, info.get("epochs_run"), plan.config.epochs, "no limit" if limit is None else f"{limit:g} min",
            )
            return None
        old_stage = info.get("stage_minutes")
        if info.get("limited_by_stage") and (stage_minutes is None or (old_stage is not None and float(stage_minutes) > float(old_stage))):
            log.info(
                "core: the cached core %s stopped at the core stage's time limit (%s min) and this run allows %s: retraining",
                plan.path, old_stage, "no stage limit" if stage_minutes is None else f"{stage_minutes:g} min",
            )
            return None
    return info


def _fmt_r(r: Any) -> str:
    return f"{float(r):.3f}" if isinstance(r, (int, float)) else "unknown"


def ensure_core(
    plan: CorePlan, *, device: torch.device | str = "cpu", limit_minutes: float | None = None, stage_minutes: float | None = None
) -> tuple[Path, dict[str, Any]]:
    """The cached core of ``plan``, trained first if it is not cached yet.

    Args:
        plan: the core to reuse or train.
        device: where to train it.
        limit_minutes: what is left of the core stage's time limit: training stops at the
            lesser of this and the core's own ``max_minutes`` (None: its own only).
        stage_minutes: the core stage's whole limit (``fit.core_stage_minutes``), recorded
            with the core and compared at reuse (see :func:`read_cached`).

    Returns:
        (path, info): the core file (``weights`` for ``pretrained_core``) and a JSON-ready
        dict: ``cache`` (``hit``/``miss``), ``key``, ``sessions``, ``excluded_session``,
        ``distill_twins``, ``mean_val_median_r``, ``train_seconds``...
    """
    info = read_cached(plan, stage_minutes)
    if info is not None:
        log.info("core: reusing cached core %s (sessions %s; twins %s)", plan.path, ", ".join(plan.sessions), ", ".join(plan.teachers) or "none")
        if info.get("stopped_by_time_limit"):
            # a slow or busy day's core is what this limit gives; say so at every reuse
            log.warning(
                "core: the cached core %s was cut short by its time limit (%s of %s epochs, mean val median r %s); "
                "raise fit.core.max_minutes (or delete %s) to train it fully",
                plan.path, info.get("epochs_run"), plan.config.epochs,
                _fmt_r(info.get("mean_val_median_r")), plan.path.parent,
            )
        return plan.path, {**info, "cache": "hit", "path": str(plan.path)}
    from synth.surrogate.fit import fit_core, save_core

    log.info(
        "core: training on sessions %s (evaluated %s excluded; distillation twins: %s); cache %s",
        ", ".join(plan.sessions), plan.evaluated, ", ".join(plan.teachers) or "none", plan.path,
    )
    t0 = time.perf_counter()
    cc = plan.config
    student = cc.objective == "teacher_maps"
    if student:
        images, maps, data_info = student_set(plan, device=device)
    else:
        datasets, names, data_info = training_sets(plan, device=device)
        jacobians = jacobian_targets(plan, datasets, names, device=device)
    load_s = time.perf_counter() - t0
    # The limit is for the whole stage: what loading and labelling took comes off training.
    limits = [float(m) for m in (cc.max_minutes, limit_minutes) if m is not None]
    limit = min(limits) if limits else None
    by_stage = limit_minutes is not None and (cc.max_minutes is None or float(limit_minutes) < float(cc.max_minutes))
    if by_stage:
        log.info("core: %.1f min left of the core stage's %s min (its own limit: %s)", limit, stage_minutes, cc.max_minutes)
    max_s = None if limit is None else max(0.0, limit * 60.0 - load_s)
    if student:
        from synth.surrogate.student import fit_student

        core, rep = fit_student(images, maps, cc, in_channels=images.shape[1], device=device, seed=plan.seed, max_seconds=max_s)
        rep = {**rep, "mean_val_median_r": None, "val_median_r": {}}
    else:
        core, rep = fit_core(
            datasets, cc.fit_config(), device=device, seed=plan.seed, names=names, max_seconds=max_s, precision=cc.precision,
            adversarial_eps=cc.adversarial_eps, jacobians=jacobians, jacobian_from_epoch=cc.distill_jacobian_from_epoch,
            readouts=feature_readouts(cc, names),
        )
    from synth.configtools import to_dict

    info = {
        "key": plan.key,
        "sessions": list(plan.sessions),
        "excluded_session": plan.evaluated,
        "excluded": sorted({plan.evaluated, *cc.exclude}),
        "distill_twins": list(plan.teachers),
        "data": data_info,
        "config": {k: v for k, v in to_dict(cc).items() if k != "cache_dir"},
        "grayscale": plan.grayscale,
        "seed": plan.seed,
        "checksums": dict(plan.checksums),
        "objective": cc.objective,
        "mean_val_median_r": rep["mean_val_median_r"],
        "val_median_r": rep["val_median_r"],
        **({"val_r2": rep["val_r2"], "val_r2_history": rep["val_r2_history"]} if student else {}),
        "epochs_run": rep["epochs_run"],
        "best_epoch": rep["best_epoch"],
        "stopped_by_time_limit": rep.get("stopped_by_time_limit", False),
        "limit_minutes": limit,
        "stage_minutes": stage_minutes,
        "limited_by_stage": bool(by_stage and rep.get("stopped_by_time_limit", False)),
        "schedule_epochs": rep.get("schedule_epochs"),
        "precision": rep.get("precision"),
        "adversarial_eps": rep.get("adversarial_eps", 0.0),
        "jacobian_cosine": rep.get("jacobian_cosine", []),
        "data_seconds": round(load_s, 1),
        "train_seconds": rep["train_seconds"],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    folder = plan.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CORE_FILE}.{os.getpid()}.tmp"
    save_core(core, str(tmp))
    os.replace(tmp, plan.path)
    tmp_info = folder / f".{CORE_INFO}.{os.getpid()}.tmp"
    tmp_info.write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    os.replace(tmp_info, plan.path.with_name(CORE_INFO))
    fit_s = f"val R^2 of the teachers' maps {info['val_r2']:.3f}" if student else f"mean val median r {info['mean_val_median_r']:.3f}"
    log.info("core: trained in %.0f s (%s), cached at %s", info["total_seconds"], fit_s, plan.path)
    return plan.path, {**info, "cache": "miss", "path": str(plan.path)}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    return str(o)


def core_summary(info: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a core's info that goes into report.json / provenance.json."""
    keys = (
        "cache", "path", "key", "sessions", "excluded_session", "excluded", "distill_twins", "objective", "val_r2", "mean_val_median_r",
        "val_median_r", "epochs_run", "best_epoch", "stopped_by_time_limit", "limit_minutes", "limited_by_stage", "schedule_epochs", "precision", "adversarial_eps", "jacobian_cosine", "train_seconds",
        "total_seconds", "data",
    )
    return {k: info.get(k) for k in keys if k in info}

