"""Objectives: what each synthesized image should do to the predicted responses.

An :class:`Objective` maps the model's responses to a batch (and the images) to one
value per image, to be **maximized**. Objectives compose like lucent's: ``a + b``,
``a - b``, ``2 * a``, ``-a``, ``a / 2``. Each image has its own target site, so a batch
mixes all targets (and seeds) in one optimization.

Registered objectives (z-scored responses ``z = (r - natural_mean) / natural_std`` by
default, so values are in units of the natural-image spread of each site):

``stretch``    ``z[target]``: drive the target site as high as possible
``suppress``   ``-z[target]``: drive the target site down
``one_hot``    ``log softmax(z / temperature)[target]`` (or ``softmax`` with ``log: false``):
               raise the target while holding the other sites down (Bashivan et al. 2019)
``pattern``    match (``mode: match``, minus mean squared error) or raise (``mode: raise``,
               weighted mean) a target pattern over several sites
``diversity``  minus the mean cosine similarity between an image and the other images of
               the same objective and target (other seeds) in the run, taken from the
               previous step (so it couples only images of one group)

In YAML an objective is a name, a mapping ``{name: ..., **kwargs}`` with an optional
``weight``, or a list of those (summed), e.g.
``[{name: stretch}, {name: diversity, weight: 0.1}]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from synth.errors import ConfigError
from synth.registry import Registry

#: name -> builder(**kwargs) -> Objective
OBJECTIVES: Registry = Registry("objective")


@dataclass
class ObjectiveInputs:
    """Everything an objective may look at, for a batch of B images.

    Attributes:
        responses: (B, S) predicted responses (to the transformed images during
            optimization; to the clean images for final values).
        images: (B, C, H, W) displayed images (before transforms).
        target: (B,) long target site index per image.
        natural_mean, natural_std: (S,) natural-image statistics (z-scoring).
        site_ids: (S,) site id strings (to resolve sites given by id).
        background: (B,) background grey level.
        group: (B,) long, images with equal group share objective and target (diversity).
        snapshot: (N, C, H, W) detached images of the whole run at the previous step, or None.
        snapshot_group: (N,) long groups of the snapshot images.
        index: (B,) long row of each image in the snapshot.
    """

    responses: torch.Tensor
    images: torch.Tensor
    target: torch.Tensor
    natural_mean: torch.Tensor
    natural_std: torch.Tensor
    site_ids: Sequence[str]
    background: torch.Tensor
    group: torch.Tensor | None = None
    snapshot: torch.Tensor | None = None
    snapshot_group: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def z(self) -> torch.Tensor:
        """(B, S) z-scored responses."""
        r = self.responses.float()
        return (r - self.natural_mean.to(r)) / self.natural_std.to(r)

    def site_index(self, site: int | str) -> int:
        """Index of a site given by index or id (ConfigError if unknown)."""
        if isinstance(site, str):
            ids = [str(s) for s in self.site_ids]
            if site not in ids:
                raise ConfigError(f"unknown site id '{site}' in an objective; the model has {len(ids)} sites, e.g. {ids[0]}")
            return ids.index(site)
        n = self.responses.shape[1]
        if not -n <= int(site) < n:
            raise ConfigError(f"site index {site} out of range for {n} sites")
        return int(site) % n


class Objective:
    """A per-image value to maximize, composable with + - * / and scalars.

    Args:
        fn: ``ObjectiveInputs -> (B,)``.
        name: short description (shown in logs).
    """

    def __init__(self, fn: Callable[[ObjectiveInputs], torch.Tensor], name: str = "objective") -> None:
        self.fn = fn
        self.name = name

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return self.fn(inputs)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other: "Objective | float | int") -> "Objective":
        if isinstance(other, (int, float)):
            return Objective(lambda i: self(i) + other, f"{self.name} + {other}")
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(lambda i: self(i) + other(i), f"{self.name} + {other.name}")

    __radd__ = __add__

    def __neg__(self) -> "Objective":
        return Objective(lambda i: -self(i), f"-({self.name})")

    def __sub__(self, other: "Objective | float | int") -> "Objective":
        return self + (-other)

    def __rsub__(self, other: float | int) -> "Objective":
        return (-self) + other

    def __mul__(self, other: float | int) -> "Objective":
        if not isinstance(other, (int, float)):
            raise TypeError(f"objectives multiply only with numbers, got {type(other).__name__}")
        return Objective(lambda i: other * self(i), f"{other} * {self.name}")

    __rmul__ = __mul__

    def __truediv__(self, other: float | int) -> "Objective":
        if not isinstance(other, (int, float)):
            raise TypeError(f"objectives divide only by numbers, got {type(other).__name__}")
        return self * (1.0 / other)

    @staticmethod
    def sum(objectives: Sequence["Objective"]) -> "Objective":
        """Sum of several objectives."""
        objs = list(objectives)
        return Objective(lambda i: sum(o(i) for o in objs), " + ".join(o.name for o in objs))


def _responses(inputs: ObjectiveInputs, zscore: bool) -> torch.Tensor:
    return inputs.z() if zscore else inputs.responses.float()


def _target_or(inputs: ObjectiveInputs, site: int | str | None) -> torch.Tensor:
    if site is None:
        return inputs.target
    return torch.full_like(inputs.target, inputs.site_index(site))


@OBJECTIVES.register("stretch")
def stretch(site: int | str | None = None, zscore: bool = True) -> Objective:
    """Maximize one site (default: the job's target site)."""

    def fn(i: ObjectiveInputs) -> torch.Tensor:
        r = _responses(i, zscore)
        return r.gather(1, _target_or(i, site).view(-1, 1)).squeeze(1)

    return Objective(fn, "stretch")


@OBJECTIVES.register("suppress")
def suppress(site: int | str | None = None, zscore: bool = True) -> Objective:
    """Minimize one site (default: the job's target site)."""
    up = stretch(site, zscore)
    return Objective(lambda i: -up(i), "suppress")


@OBJECTIVES.register("one_hot")
def one_hot(temperature: float = 1.0, log: bool = True, zscore: bool = True, site: int | str | None = None) -> Objective:
    """Softmax over sites of z-scored responses / temperature; maximize the target's (log) share."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def fn(i: ObjectiveInputs) -> torch.Tensor:
        logits = _responses(i, zscore) / temperature
        lp = F.log_softmax(logits, dim=1) if log else F.softmax(logits, dim=1)
        return lp.gather(1, _target_or(i, site).view(-1, 1)).squeeze(1)

    return Objective(fn, f"one_hot(T={temperature})")


@OBJECTIVES.register("pattern")
def pattern(pattern: Sequence[float], sites: Sequence[int | str] | None = None, mode: str = "match", zscore: bool = True) -> Objective:
    """Match (``mode: match``) or raise (``mode: raise``, weights) a pattern over ``sites`` (default: all)."""
    if mode not in ("match", "raise"):
        raise ValueError(f"mode must be match or raise, got {mode!r}")
    target = torch.as_tensor(list(pattern), dtype=torch.float32)
    if target.ndim != 1 or target.numel() == 0:
        raise ValueError("pattern must be a non-empty list of numbers")
    if sites is not None and len(sites) != target.numel():
        raise ValueError(f"pattern has {target.numel()} values but sites has {len(sites)}")

    def fn(i: ObjectiveInputs) -> torch.Tensor:
        r = _responses(i, zscore)
        if sites is None:
            if r.shape[1] != target.numel():
                raise ConfigError(f"pattern has {target.numel()} values for {r.shape[1]} sites; give 'sites'")
            sel = r
        else:
            sel = r[:, [i.site_index(s) for s in sites]]
        t = target.to(sel)
        if mode == "match":
            return -(sel - t).pow(2).mean(1)
        return (sel * t).sum(1) / t.abs().sum().clamp_min(1e-12)

    return Objective(fn, f"pattern({mode})")


@OBJECTIVES.register("diversity")
def diversity() -> Objective:
    """Minus the mean cosine similarity to the other images of the same group (see module docstring)."""

    def fn(i: ObjectiveInputs) -> torch.Tensor:
        b = i.images.shape[0]
        if i.snapshot is None or i.group is None or i.index is None or i.snapshot_group is None:
            return i.images.new_zeros(b)
        bg = i.background.to(i.images).view(-1, 1, 1, 1)
        a = F.normalize((i.images - bg).flatten(1).float(), dim=1)
        s = F.normalize((i.snapshot.to(i.images) - bg[:1]).flatten(1).float(), dim=1)
        sim = a @ s.T  # (B, N)
        same = i.group.view(-1, 1) == i.snapshot_group.view(1, -1).to(i.group.device)
        same &= i.index.view(-1, 1) != torch.arange(s.shape[0], device=i.index.device).view(1, -1)
        n = same.sum(1)
        val = (sim * same).sum(1) / n.clamp_min(1)
        return torch.where(n > 0, -val, torch.zeros_like(val))

    return Objective(fn, "diversity")


#: names whose values couple images within a run (see diversity)
COUPLING = ("diversity",)


def spec_key(spec: Any) -> str:
    """A canonical string for an objective spec (groups images with the same objective)."""
    return json.dumps(spec, sort_keys=True, default=str)


def _items(spec: Any, key: str) -> list[tuple[str, dict[str, Any], float]]:
    if isinstance(spec, str):
        return [(spec, {}, 1.0)]
    if isinstance(spec, Mapping):
        if not isinstance(spec.get("name"), str):
            raise ConfigError(f"expected an objective mapping with 'name', got {spec!r}", key=key)
        kw = {k: v for k, v in spec.items() if k not in ("name", "weight")}
        w = spec.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"expected a number for weight, got {w!r}", key=f"{key}.weight")
        return [(spec["name"], kw, float(w))]
    if isinstance(spec, (list, tuple)) and spec:
        out = []
        for j, s in enumerate(spec):
            if isinstance(s, (list, tuple)):
                raise ConfigError("nested lists are not allowed in an objective", key=f"{key}[{j}]")
            out += _items(s, f"{key}[{j}]")
        return out
    raise ConfigError(f"expected an objective name, a mapping with 'name' or a list of them, got {spec!r}", key=key)


def resolve_spec(spec: Any, aliases: Mapping[str, Any] | None = None) -> Any:
    """Replace a top-level alias name (``SynthesisConfig.objectives``) by its spec."""
    if isinstance(spec, str) and aliases and spec in aliases:
        return aliases[spec]
    return spec


def check_objective_spec(spec: Any, *, key: str = "objective") -> None:
    """ConfigError if a spec names unknown objectives or arguments."""
    for name, kw, _ in _items(spec, key):
        OBJECTIVES.get(name, key=key)
        OBJECTIVES.check_kwargs(name, kw, key=key)


def build_objective(spec: Any, aliases: Mapping[str, Any] | None = None, *, key: str = "objective") -> Objective:
    """Build an objective from a spec (name, mapping with optional weight, or list: summed)."""
    spec = resolve_spec(spec, aliases)
    parts = []
    for name, kw, w in _items(spec, key):
        obj = OBJECTIVES.build({"name": name, **kw}, key=key)
        parts.append(obj if w == 1.0 else w * obj)
    return parts[0] if len(parts) == 1 else Objective.sum(parts)


def uses_coupling(spec: Any, aliases: Mapping[str, Any] | None = None) -> bool:
    """Whether a spec includes an objective that couples images (diversity)."""
    return any(name in COUPLING for name, _, _ in _items(resolve_spec(spec, aliases), "objective"))
