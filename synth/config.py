"""The experiment config: YAML -> frozen, validated dataclasses -> resolved YAML.

One file describes one closed-loop experiment. Sections (each a frozen dataclass):

``name``, ``seed``, ``device``  top-level
``target``     which site population (a ``targets/*.yaml`` file) and data root/session
``data``       display size and colour mode of all images
``fit``        surrogate backbone/core, layer(s), readout, training (synth.surrogate)
``stimuli``    which control images to make (stretch, one-hot), how many seeds each
``synthesis``  parameterization, transforms, priors, constraints, steps (synth.synthesis)
``followup``   how the follow-up recording is made (repeats)
``validate``   bootstrap and reliability settings for the report

Every error is one line naming the file and the dotted key, e.g.
``configs/demo.yaml: synthesis.steps: expected a value >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from synth.configtools import deep_merge, from_dict, to_dict
from synth.errors import ConfigError
from synth.surrogate.fit import FitConfig
from synth.synthesis.config import SynthesisConfig
from synth.synthesis.starts import STARTS

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True, kw_only=True)
class TargetSection:
    """Which population to control.

    ``file`` is a ``targets/*.yaml`` definition (its ``kind`` picks the builder);
    ``root``/``session`` override the file's data root and session; ``params`` override
    any other of its params.
    """

    file: str = field(default="targets/virtual_v4.yaml", metadata={"help": "targets/*.yaml population definition"})
    root: str | None = field(default=None, metadata={"help": "data root (real-data targets)"})
    session: str | None = field(default=None, metadata={"help": "recording session id (real-data targets)"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "overrides of the target file's params"})


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Display format shared by natural images, synthesis and the saved stimuli."""

    image_size: int = field(default=112, metadata={"min": 16, "max": 1024, "help": "display size in pixels (square)"})
    grayscale: bool = field(default=True, metadata={"help": "grayscale (Bashivan et al. 2019) or RGB images"})


@dataclass(frozen=True, kw_only=True)
class StimuliSection:
    """Which control images to synthesize."""

    stretch: bool = field(default=True, metadata={"help": "one stretch image per target site and seed"})
    one_hot: bool = field(default=True, metadata={"help": "one one-hot population image per target site and seed"})
    sites: tuple[str, ...] | None = field(default=None, metadata={"help": "target site ids (default: all sites)"})
    seeds_per_target: int = field(default=1, metadata={"min": 1, "max": 1000, "help": "images per target site and objective in the stimulus set"})
    candidates_per_target: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "max": 1000,
            "help": "images synthesized per target and objective when more than seeds_per_target: fit.judge rates them "
            "and the best seeds_per_target are kept (null: seeds_per_target, no choice)",
        },
    )
    batch_size: int = field(default=64, metadata={"min": 1, "help": "images per synthesis batch (one checkpoint each)"})
    held_out_surrogate: bool = field(
        default=False, metadata={"help": "fit a second surrogate on another split and report its predictions too"}
    )
    start: str = field(
        default="noise",
        metadata={
            "choices": STARTS,
            "help": "noise: each image starts from its parameterization's random values; natural: from the natural image "
            "that does best on its objective (a target's k-th seed from the k-th best), random values added",
        },
    )
    start_rank_by: str = field(
        default="surrogate",
        metadata={
            "choices": ("surrogate", "recorded"),
            "help": "start: natural ranks the natural images by the surrogate's predictions or by the recorded responses",
        },
    )
    start_zooms: tuple[float, ...] = field(
        default=(1.0,),
        metadata={
            "min": 1.0,
            "max": 8.0,
            "help": "start: natural also rates views of each target's best natural images: each zoom z > 1 enlarges a "
            "window of 1/z of the side at 3 x 3 positions; a job starts from the best view ([1] = whole images only)",
        },
    )
    start_flips: bool = field(default=False, metadata={"help": "the view search also rates every view mirrored left-right"})
    start_candidates: int = field(
        default=16, metadata={"min": 1, "max": 10000, "help": "natural images per (objective, target) whose views are rated"}
    )

    def __post_init__(self) -> None:
        if not (self.stretch or self.one_hot):
            raise ConfigError("at least one of stretch, one_hot must be true", key="stretch")
        if not self.start_zooms:
            raise ConfigError("expected at least one zoom (1 = the whole image)", key="start_zooms")
        if self.searches_views and self.start != "natural":
            raise ConfigError("start_zooms / start_flips choose views of natural starts; set start: natural", key="start_zooms")
        if self.searches_views and self.start_rank_by != "surrogate":
            raise ConfigError("views of natural images have no recorded responses to rank them by; set start_rank_by: surrogate", key="start_zooms")

    @property
    def n_candidates(self) -> int:
        """Images synthesized per (objective, target): ``candidates_per_target`` or ``seeds_per_target``."""
        return self.seeds_per_target if self.candidates_per_target is None else self.candidates_per_target

    @property
    def searches_views(self) -> bool:
        """Whether natural starts are chosen among views (zooms, mirror images), not whole images."""
        return self.start_flips or any(z != 1.0 for z in self.start_zooms)


@dataclass(frozen=True, kw_only=True)
class FollowupSection:
    """The follow-up recording of natural and synthesized images."""

    n_repeats: int = field(default=4, metadata={"min": 1, "max": 1000})
    record_natural: bool = field(
        default=True, metadata={"help": "re-record the natural set in the follow-up (natural maxima, z-scores); false: take them from the original natural recording"}
    )


@dataclass(frozen=True, kw_only=True)
class ValidateSection:
    """Report settings."""

    n_bootstrap: int = field(default=200, metadata={"min": 0, "max": 100000})
    min_reliability: float | None = field(default=None, metadata={"min": -1.0, "max": 1.0})


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole closed-loop experiment (see module docstring)."""

    name: str = "experiment"
    seed: int = field(default=0, metadata={"min": 0, "max": 2**31 - 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    target: TargetSection = field(default_factory=TargetSection)
    data: DataSection = field(default_factory=DataSection)
    fit: FitConfig = field(default_factory=FitConfig)
    stimuli: StimuliSection = field(default_factory=StimuliSection)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    followup: FollowupSection = field(default_factory=FollowupSection)
    validate: ValidateSection = field(default_factory=ValidateSection)

    def __post_init__(self) -> None:
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"unknown device '{self.device}'; expected auto, cpu, cuda or cuda:N", key="device")
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise ConfigError(f"expected letters, digits, '_', '-', '.' only, got {self.name!r}", key="name")
        n, keep = self.stimuli.n_candidates, self.stimuli.seeds_per_target
        if n < keep:
            raise ConfigError(f"expected at least seeds_per_target ({keep}) candidates, got {n}", key="stimuli.candidates_per_target")
        if n > keep and self.fit.judge is None:
            raise ConfigError(
                f"{n} candidates per target for {keep} kept need fit.judge, the surrogate that rates them", key="stimuli.candidates_per_target"
            )
        if self.fit.judge is not None and n == keep:
            raise ConfigError(
                f"fit.judge rates candidates, but stimuli.candidates_per_target ({n}) is not above seeds_per_target ({keep})", key="fit.judge"
            )


def read_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file; ConfigError (one line, naming the file) on any problem."""
    path = str(path)
    if not os.path.exists(path):
        raise ConfigError("file not found", file=path)
    if os.path.isdir(path):
        raise ConfigError("is a directory, expected a YAML file", file=path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not a text file (invalid UTF-8); expected YAML", file=path) from None
    if "\x00" in text:
        raise ConfigError("not a text file (contains NUL bytes); expected YAML", file=path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"YAML syntax error at {where}{problem}", file=path) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", key):
        raise ConfigError(f"--set expects dotted.key=value, got key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a plain mapping."""
    out = _deep_copy(data)
    for item in overrides or ():
        parts, value = _parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
                node[p] = nxt
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def config_files(path: str | os.PathLike) -> list[str]:
    """The config file and the chain of files it builds on (``base:``), itself first."""
    return _read_chain(path)[1]


def read_config_data(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's mapping, with ``base: other.yaml`` (relative to this file) resolved:
    the base file's mapping with this file's keys deep-merged over it (mappings merge, a
    component naming another ``name`` and any other value replace; lists replace whole).

    Raises:
        ConfigError: not a mapping, a missing or circular base (naming the file and key).
    """
    return _read_chain(path)[0]


def _read_chain(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """(the merged mapping, the files read: ``path`` first, then its bases)."""
    data = read_yaml(path)
    if data is None:
        raise ConfigError("empty file; expected a mapping of config sections", file=str(path))
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of config sections, got {type(data).__name__}", file=str(path))
    data = dict(data)
    if "base" not in data:
        return data, [str(path)]
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"expected the path of another config file (relative to this one), got {base!r}", file=str(path), key="base")
    p = Path(os.path.expanduser(base))
    bpath = p if p.is_absolute() else Path(path).parent / p
    here = os.path.abspath(path)
    if os.path.abspath(bpath) in _chain + (here,):
        raise ConfigError(f"circular base: {bpath} builds on this file", file=str(path), key="base")
    if not bpath.is_file():
        raise ConfigError(f"base config not found: {bpath}", file=str(path), key="base")
    merged, files = _read_chain(bpath, _chain + (here,))
    return deep_merge(merged, data), [str(path), *files]


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override and validate a config file.

    Args:
        path: the YAML file (``base: other.yaml`` in it: see :func:`read_config_data`).
        overrides: ``dotted.key=value`` strings (``--set``), validated like the file.

    Returns:
        A frozen Config. Relative paths in ``target.file`` are resolved later against
        the current directory first, then the config file's directory.

    Raises:
        ConfigError: one line naming the file and key.
    """
    data = read_config_data(path)
    try:
        if overrides:
            # Override the resolved config (defaults spelled out), so a dotted key can
            # change one argument of a defaulted component (e.g. synthesis.param.decay_power).
            try:
                data = to_dict(from_dict(Config, data))
            except ConfigError:
                pass  # the file alone is invalid; an override may fix it
        data = apply_overrides(data, overrides)
        return from_dict(Config, data)
    except ConfigError as err:
        raise err.at(file=str(path)) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The fully resolved config as plain data."""
    return to_dict(cfg)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (every default spelled out) as YAML."""
    text = "# Fully resolved synth config: `synth run <this file>` repeats the run.\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    Path(path).write_text(text)


def resolve_path(p: str, *, relative_to: str | os.PathLike | None = None) -> Path:
    """Resolve a path from a config: as given (cwd), else relative to ``relative_to``."""
    path = Path(os.path.expanduser(p))
    if path.is_absolute() or path.exists() or relative_to is None:
        return path
    alt = Path(relative_to) / path
    return alt if alt.exists() else path


def replace(cfg: Config, **changes: Any) -> Config:
    """dataclasses.replace, re-validated."""
    return dataclasses.replace(cfg, **changes)
