"""Fitting a surrogate to recordings: config, training loop, layer choice, prediction.

``fit_surrogate`` trains a readout (and, for trainable cores, the backbone) on
repeat-averaged responses with a Poisson or MSE loss, Adam and early stopping on the
validation median Pearson r (restoring the best epoch). With several ``layers`` a
readout is fitted on each and the best by validation median r is kept. For frozen
backbones the features are computed once, which makes fitting fast.

Responses are fitted per site in units of their training standard deviation (the
model's ``output_scale`` restores the recording's units), so regularization strengths
mean the same for any response scale.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from synth.errors import ConfigError, DataError
from synth.runtime import autocast, derive_seed, progress, resolve_device, resolve_precision, torch_generator
from synth.surrogate.backbones import BACKBONES, CORE_FORMAT, _small_cnn_layer, build_backbone, default_layer
from synth.surrogate.core import CoreConfig
from synth.surrogate.model import Surrogate
from synth.surrogate.readouts import READOUTS, build_readout

log = logging.getLogger(__name__)

#: backbones trained from scratch when ``weights: none`` and ``train_backbone`` is unset
TRAINED_BY_DEFAULT = ("small_cnn",)
#: frozen backbones whose weights come with them (data files), used with ``weights: none``
OWN_WEIGHTS = ("cowley_twins",)

# --------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """Fractions of the natural set used to train, validate (early stopping) and test."""

    train: float = field(default=0.7, metadata={"min": 0.0, "max": 1.0, "help": "fraction of natural images to fit on"})
    val: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0, "help": "fraction for early stopping / layer choice"})
    test: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0, "help": "fraction held out for the fit report"})

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"expected a fraction between 0 and 1 (exclusive), got {v!r}", key=name)
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"train + val + test must add up to 1, got {total:g}", key="train")


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """The ``fit`` section: backbone/core, layer(s), readout and training.

    ``weights: none`` (random initialization) needs a trained backbone: ``small_cnn``
    (trained from scratch by default) or ``train_backbone: true``; other backbones are
    frozen unless ``train_backbone: true``.
    """

    backbone: str = field(
        default="small_cnn",
        metadata={"help": "small_cnn, pretrained_core, alexnet, resnet18, resnet50, vgg16, cowley_twins (other sessions' digital twins)"},
    )
    weights: str = field(default="none", metadata={"help": "none, a .pt/.pth file, or a torchvision weights name (IMAGENET1K_V1)"})
    layers: tuple[str, ...] | None = field(
        default=None, metadata={"help": "layer(s) to read from (alias like conv3/layer2 or FX node name); several: best on val"}
    )
    backbone_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra backbone arguments (small_cnn: channels, n_layers, first_kernel, ...)"}
    )
    train_backbone: bool | None = field(
        default=None, metadata={"help": "train the backbone too (default: only small_cnn with weights none)"}
    )
    readout: dict[str, Any] | str = field(
        default_factory=lambda: {"name": "factorized"}, metadata={"help": "readout name, or name + arguments (factorized, gaussian)"}
    )
    loss: str = field(default="poisson", metadata={"choices": ("poisson", "mse"), "help": "poisson or mse"})
    epochs: int = field(default=30, metadata={"min": 1, "max": 100000, "help": "maximum training epochs"})
    batch_size: int = field(default=32, metadata={"min": 2, "max": 65536})
    lr: float = field(default=3e-3, metadata={"min": 0.0, "help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0, "help": "L2 weight decay on trained backbone weights"})
    patience: int = field(default=8, metadata={"min": 1, "help": "epochs without val improvement before a lr drop / stop"})
    lr_schedule: str = field(
        default="cosine",
        metadata={"choices": ("plateau", "cosine"), "help": "plateau: cut the lr x0.3 after `patience` bad epochs; cosine: anneal to 0 over `epochs`"},
    )
    lr_decay_steps: int = field(default=1, metadata={"min": 0, "max": 10, "help": "plateau: times the lr is cut (from the best state) before stopping"})
    augment_shift: int = field(default=0, metadata={"min": 0, "max": 64, "help": "random shifts of up to this many pixels while training the backbone (0: off)"})
    input_size: int | None = field(default=None, metadata={"min": 0, "help": "resize images inside the model (default: 64 small_cnn, 224 torchvision; 0: never)"})
    max_twins: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "backbone cowley_twins: keep the twins with the largest share of the readout's drive, this many, "
            "and fit the readout again on them (synthesis runs only those; 0: every twin)",
        },
    )
    split: SplitConfig = field(default_factory=SplitConfig)
    refit: str = field(
        default="none",
        metadata={
            "choices": ("none", "all"),
            "help": "none: synthesize with the surrogate fitted on the train split; all: after the held-out test, refit it "
            "on all natural images (a split.val share kept for early stopping) and synthesize with that one",
        },
    )
    core: CoreConfig | None = field(
        default=None,
        metadata={"help": "shared core trained on the other sessions under target.root (with backbone pretrained_core, weights auto)"},
    )
    ensemble: tuple[dict[str, Any], ...] = field(
        default=(),
        metadata={
            "help": "more surrogates whose predictions are averaged with this one's (for synthesis and the report); "
            "each a partial fit section overriding this one's keys, e.g. {core: {input_size: 64}}"
        },
    )
    core_stage_minutes: float | None = field(
        default=None,
        metadata={
            "min": 0.0,
            "help": "time limit of the whole core stage, every member's core together (none: only each core's own "
            "core.max_minutes): a core to train gets the lesser of its own limit and what is left of the stage",
        },
    )
    judge: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "a surrogate that never synthesizes: it rates the stimuli.candidates_per_target candidates of each "
            "target and the best stimuli.seeds_per_target are kept; a partial fit section overriding this one's keys, "
            "as an ensemble entry"
        },
    )

    def __post_init__(self) -> None:
        auto = self.weights.strip().lower() == "auto"
        if auto and self.backbone != "pretrained_core":
            raise ConfigError(f"weights auto (a core trained on other sessions) needs backbone pretrained_core, got {self.backbone}", key="weights")
        if self.core is not None and not auto:
            raise ConfigError("fit.core settings are used only with backbone: pretrained_core and weights: auto", key="core")
        if isinstance(self.readout, str):
            object.__setattr__(self, "readout", {"name": self.readout})
        BACKBONES.get(self.backbone, key="backbone")
        BACKBONES.check_kwargs(self.backbone, self.backbone_kwargs, key="backbone_kwargs")
        name = self.readout.get("name") if isinstance(self.readout, Mapping) else None
        if not isinstance(name, str):
            raise ConfigError(f"expected a mapping with 'name' (one of {', '.join(READOUTS.names())}), got {self.readout!r}", key="readout")
        READOUTS.get(name, key="readout.name")
        READOUTS.check_kwargs(name, {k: v for k, v in self.readout.items() if k != "name"}, key="readout")
        for k in ("in_shape", "n_sites"):
            if k in self.readout:
                raise ConfigError(f"'{k}' is set from the data, not the config", key=f"readout.{k}")
        if self.layers is not None and len(self.layers) == 0:
            raise ConfigError("expected at least one layer name (or leave layers unset for the default)", key="layers")
        if self.backbone == "small_cnn" and self.layers:
            n_layers = int(self.backbone_kwargs.get("n_layers", 4))
            for layer in self.layers:
                _small_cnn_layer(layer, n_layers)
        if self.backbone == "cowley_twins" and self.layers:
            from synth.surrogate.twin_backbone import parse_twin_layers

            for layer in self.layers:
                parse_twin_layers(layer)
        if self.max_twins and (self.backbone != "cowley_twins" or name != "factorized"):
            raise ConfigError(
                f"max_twins ranks the twins of backbone cowley_twins by a factorized readout's weights; got backbone {self.backbone}, readout {name}",
                key="max_twins",
            )
        if self.backbone == "pretrained_core" and self.weights.strip().lower() == "none":
            raise ConfigError("backbone pretrained_core needs weights: /path/to/core.pt (saved by fit_core)", key="weights")
        if self.backbone in OWN_WEIGHTS and self.trains_backbone:
            raise ConfigError(f"backbone {self.backbone} is frozen (its weights are data files); remove train_backbone", key="train_backbone")
        if self.weights.strip().lower() == "none" and not self.trains_backbone and self.backbone not in OWN_WEIGHTS:
            raise ConfigError(
                f"weights none with a frozen {self.backbone}: its features would be random; give pretrained weights "
                "(a .pt/.pth file or a torchvision weights name such as IMAGENET1K_V1) or set train_backbone: true",
                key="weights",
            )

        self.members()  # validates every ensemble member now, with its key path
        self.judge_recipe()

    def members(self) -> tuple["FitConfig", ...]:
        """This surrogate's recipe, then one per ``ensemble`` entry (each deep-merged over it).

        Raises:
            ConfigError: naming ``ensemble[i].<key>`` for a bad member.
        """
        if not self.ensemble:
            return (self if self.judge is None else dataclasses.replace(self, judge=None),)
        out = [dataclasses.replace(self, ensemble=(), judge=None)]
        for i, override in enumerate(self.ensemble):
            if "ensemble" in override:
                raise ConfigError("ensemble members cannot have ensembles of their own", key=f"ensemble[{i}].ensemble")
            if "judge" in override:
                raise ConfigError("the judge rates the whole ensemble's candidates (set fit.judge instead)", key=f"ensemble[{i}].judge")
            for key in ("split", "refit"):
                if key in override:
                    raise ConfigError(f"every ensemble member is fitted on the same images (set fit.{key} instead)", key=f"ensemble[{i}].{key}")
            if "core_stage_minutes" in override:
                raise ConfigError("the core stage's time limit covers every member's core (set fit.core_stage_minutes instead)", key=f"ensemble[{i}].core_stage_minutes")
            out.append(self._merged(override, f"ensemble[{i}]"))
        return tuple(out)

    def judge_recipe(self) -> "FitConfig | None":
        """The judge's recipe (``judge`` deep-merged over this section), or None.

        Raises:
            ConfigError: naming ``judge.<key>`` for a bad recipe.
        """
        if self.judge is None:
            return None
        if not isinstance(self.judge, Mapping):
            raise ConfigError(f"expected a partial fit section (a mapping), got {self.judge!r}", key="judge")
        for key in ("ensemble", "judge", "split", "refit"):
            if key in self.judge:
                raise ConfigError(f"the judge is one surrogate fitted on the surrogate's images (set fit.{key} instead)", key=f"judge.{key}")
        if "core_stage_minutes" in self.judge:
            raise ConfigError("the core stage's time limit covers the judge's core too (set fit.core_stage_minutes instead)", key="judge.core_stage_minutes")
        return self._merged(self.judge, "judge")

    def _merged(self, override: Mapping[str, Any], key: str) -> "FitConfig":
        """A partial fit section ``override`` deep-merged over this recipe (without its ensemble and judge)."""
        from synth.configtools import deep_merge, from_dict, to_dict

        base = to_dict(self)
        base.pop("ensemble", None)
        base.pop("judge", None)
        return from_dict(FitConfig, deep_merge(base, override), key=key)

    @property
    def trains_backbone(self) -> bool:
        """Whether the backbone's weights are trained: ``train_backbone`` if set, else only
        a ``small_cnn`` with ``weights: none`` (trained from scratch)."""
        if self.train_backbone is not None:
            return bool(self.train_backbone)
        return self.backbone in TRAINED_BY_DEFAULT and self.weights.strip().lower() == "none"


# --------------------------------------------------------------------------- metrics
def pearson_columns(pred: np.ndarray | torch.Tensor, actual: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pearson r per column of two ``(N, S)`` arrays; NaN where a column is constant."""
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(actual, dtype=np.float64)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / den
    r[~np.isfinite(r)] = np.nan
    return r


def _median(r: np.ndarray) -> float:
    return float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan")


def _num(v: float) -> float | None:
    """JSON-safe float (None for NaN)."""
    return None if v is None or not np.isfinite(v) else float(v)


# --------------------------------------------------------------------------- helpers
def _check_pair(pair: tuple[torch.Tensor, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise DataError(f"{name}: expected (images, responses)")
    x = torch.as_tensor(pair[0], dtype=torch.float32)
    y = torch.as_tensor(pair[1], dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise DataError(f"{name}: images must be (N, 1 or 3, H, H), got shape {tuple(x.shape)}")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise DataError(f"{name}: responses must be (N, S) with N = {x.shape[0]} images, got shape {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise DataError(f"{name}: need at least 2 images, got {x.shape[0]}")
    if not torch.isfinite(y).all():
        raise DataError(f"{name}: responses contain NaN/inf ({int((~torch.isfinite(y)).sum())} values)")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{name}: images must be finite values in [0, 1]")
    return x, y


def _loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "poisson":
        return lambda p, y: (p - y * torch.log(p + 1e-6)).mean()
    if kind == "mse":
        return lambda p, y: (p - y).pow(2).mean()
    raise ConfigError(f"unknown loss '{kind}'; expected poisson or mse", key="loss")


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches of a seeded permutation; a last batch of < 2 is merged (BatchNorm)."""
    perm = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    out = list(torch.split(perm, batch_size))
    if len(out) > 1 and out[-1].numel() < 2:
        out[-2] = torch.cat([out[-2], out.pop()])
    return out


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (edge padding), seeded by ``gen`` (a CPU generator)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    return torch.stack([pad[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs)])


def l2_adversarial(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    eps: float,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images moved one step of L2 length ``eps`` up the gradient of the loss (fast gradient method).

    Training on them is adversarial training, reported to make a model's input gradients
    smoother and the images synthesized on it more transferable (on this project's V4
    data it did not help; docs/cowley2023.md).

    Args:
        model: images -> predictions.
        x: images in [0, 1].
        y: targets of ``loss_fn``.
        loss_fn: (prediction, target) -> scalar loss.
        eps: L2 length of each image's step, in [0, 1] pixel units at ``x``'s size.
        precision: autocast of the forward pass (``fp32`` or ``bf16``).
        device: the device ``x`` is on (for autocast).

    Returns:
        The perturbed images, clipped to [0, 1], detached.

    Shape:
        - x: (B, C, H, W); returns the same shape.
    """
    if x.ndim != 4:
        raise ValueError(f"l2_adversarial expects images (B, C, H, W), got shape {tuple(x.shape)}")
    xa = x.detach().clone().requires_grad_(True)
    with autocast(precision, device):
        pred = model(xa)
    (grad,) = torch.autograd.grad(loss_fn(pred.float(), y), xa)
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (xa + float(eps) * grad / norm).clamp(0.0, 1.0).detach()


@dataclass(frozen=True)
class JacobianTargets:
    """Input gradients a core's readout should follow on one dataset (Jacobian matching).

    For each image, one site (output column) and that site's gradient under a teacher
    (e.g. another session's digital twin), seen through the ``fourier`` preconditioner
    (:func:`spectral_view`): the space synthesis steps in, where the direction matters.

    Args:
        sites: ``(N,)`` int64, the column of each image's site.
        grads: ``(N, C, H, W)``, the teacher's gradients (any scale: only the direction
            counts), already passed through :func:`spectral_view` with ``decay_power``.
        weight: the loss weight of ``1 - cosine``.
        decay_power: the preconditioner's decay (the student's gradients get the same view).
    """

    sites: torch.Tensor
    grads: torch.Tensor
    weight: float
    decay_power: float

    def __post_init__(self) -> None:
        if self.sites.ndim != 1 or self.grads.ndim != 4 or self.sites.shape[0] != self.grads.shape[0]:
            raise DataError(f"Jacobian targets need sites (N,) and grads (N, C, H, W), got {tuple(self.sites.shape)} and {tuple(self.grads.shape)}")
        if not self.weight >= 0 or not self.decay_power >= 0:
            raise ConfigError(f"Jacobian weight and decay_power must be >= 0, got {self.weight} and {self.decay_power}", key="distill_jacobian")


def spectral_view(g: torch.Tensor, decay_power: float) -> torch.Tensor:
    """Pixel-space gradients as the ``fourier`` parameterization sees them, back in pixels.

    ``irfft2(rfft2(g) * fourier_scale)``: the cosine between two such views is (up to the
    half-spectrum weighting) the cosine of the gradients in the ``fourier`` space with this
    ``decay_power``, where low frequencies dominate and pixel noise counts little.

    Shape:
        g: ``(N, C, H, H)``; returns the same shape.
    """
    from synth.synthesis.params import fourier_scale

    if g.ndim != 4 or g.shape[-1] != g.shape[-2]:
        raise ValueError(f"spectral_view expects square images (N, C, H, H), got {tuple(g.shape)}")
    n = g.shape[-1]
    scale = fourier_scale(n, decay_power).to(g.device)
    return torch.fft.irfft2(torch.fft.rfft2(g.float(), norm="ortho") * scale, s=(n, n), norm="ortho")


def jacobian_loss(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, targets: JacobianTargets, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions on ``x`` and the mean ``1 - cosine`` between the model's input gradients
    and ``targets`` (rows ``idx``), both seen by :func:`spectral_view`.

    The gradient is taken with ``create_graph`` so the loss trains the model (a double
    backward pass: about 7x a plain training step of the 96 px core on 2 CPU cores).

    Returns:
        (predictions ``(B, S)``, scalar loss).
    """
    xg = x.detach().requires_grad_(True)
    pred = model(xg)
    sites = targets.sites[idx].to(pred.device).view(-1, 1)
    (g,) = torch.autograd.grad(pred.float().gather(1, sites).sum(), xg, create_graph=True)
    view = spectral_view(g, targets.decay_power).flatten(1)
    goal = targets.grads[idx].to(view.device, torch.float32).flatten(1)
    cos = torch.nn.functional.cosine_similarity(view, goal, dim=1, eps=1e-12)
    return pred, (1.0 - cos).mean()


@torch.no_grad()
def _compute_features(backbone: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    backbone.eval()
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(backbone(x[i : i + batch_size].to(device)))
    return torch.cat(outs)


def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128, device: torch.device | str | None = None) -> np.ndarray:
    """Predicted responses of every site, batched, without gradients.

    Args:
        model: a Surrogate (or any module mapping images to (N, S)).
        images: ``(N, C, H, W)`` in [0, 1] (any device).
        batch_size: images per forward pass.
        device: where to run (default: where the model's parameters are).

    Returns:
        ``(N, S)`` float64 array.
    """
    p = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                outs.append(model(images[i : i + batch_size].to(dev, dtype=torch.float32)).cpu())
    finally:
        model.train(was_training)
    if not outs:
        return np.zeros((0, getattr(model, "n_sites", 0)))
    return torch.cat(outs).double().numpy()


def _site_scale(y: torch.Tensor) -> torch.Tensor:
    """Per-site training std (floored), the unit responses are fitted in."""
    s = y.std(dim=0)
    floor = torch.maximum(s.max() * 1e-3, torch.tensor(1e-6))
    return torch.where(s > floor, s, torch.ones_like(s))


# --------------------------------------------------------------------------- training
def _cosine(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine annealing from the base lr to 0 over ``total_steps``.

    ``sched.total_steps[0]`` may change while training (a time limit fits the schedule
    to the epochs that fit, so that the last of them still ends at lr 0).
    """
    total = [max(1, int(total_steps))]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total[0]) / total[0])))
    sched.total_steps = total  # type: ignore[attr-defined]
    return sched


def _plan_epochs(
    durations: Sequence[float], elapsed: float, max_seconds: float, epochs: int, planned: int, what: str = "shared core"
) -> tuple[int, bool]:
    """How many epochs fit a training time limit, after ``len(durations)`` epochs.

    The estimate is the (lower) median of the last five epochs, so one slow epoch (a load spike)
    does not cut the schedule for good; the plan may grow back (never past ``epochs``)
    when epochs get faster. Training stops when the plan is reached or when the next
    epoch, judged by the slowest of the last five, would end past the limit.

    ``what`` names the model in the log line.

    Returns:
        (planned epochs, stop now)
    """
    done = len(durations)
    recent = sorted(durations[-5:])
    typical, slowest = recent[(len(recent) - 1) // 2], recent[-1]
    new = min(epochs, done + max(0, int((max_seconds - elapsed) // max(typical, 1e-9))))
    stop = new < epochs and (done >= new or elapsed + slowest > max_seconds)
    if stop:
        new = done
    if new != planned:
        log.log(
            logging.WARNING if new < planned else logging.INFO,
            "%s: %d of %d epochs fit in the time limit of %.0f s (%.0f s per epoch); the schedule now ends there (best epoch kept)",
            what, new, epochs, max_seconds, typical,
        )
    return new, stop


@dataclass
class _Run:
    model: Surrogate
    val_r: np.ndarray
    history: list[float]
    epochs: int
    best_epoch: int
    seconds: float
    feature_shape: tuple[int, int, int]
    notes: dict[str, Any] = field(default_factory=dict)


def _train(
    *,
    model: Surrogate,
    params: list[dict[str, Any]],
    forward_train: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    forward_val: Callable[[], torch.Tensor],
    train_modules: Sequence[nn.Module],
    y_tr: torch.Tensor,
    y_va: torch.Tensor,
    cfg: FitConfig,
    seed: int,
    desc: str,
    extra_reg: Callable[[], torch.Tensor] | None = None,
) -> tuple[list[float], int, int]:
    """Adam + early stopping on val median r; restores the best state. Returns (history, epochs, best)."""
    loss_fn = _loss_fn(cfg.loss)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    g_shuffle = torch_generator(derive_seed(seed, "shuffle"))
    g_aug = torch_generator(derive_seed(seed, "augment"))
    n = y_tr.shape[0]
    sched = _cosine(opt, cfg.epochs * len(_batches(n, cfg.batch_size, None))) if cfg.lr_schedule == "cosine" else None

    def snapshot() -> list[dict[str, torch.Tensor]]:  # only what is trained (a frozen backbone may be large)
        return [copy.deepcopy(m.state_dict()) for m in train_modules]

    def restore(state: list[dict[str, torch.Tensor]]) -> None:
        for m, sd in zip(train_modules, state):
            m.load_state_dict(sd)

    best_r, best_state, best_epoch = -math.inf, snapshot(), 0
    history: list[float] = []
    bad, decays = 0, 0
    epoch = 0
    bar = progress(range(cfg.epochs), desc=desc, total=cfg.epochs)
    for epoch in bar:
        for m in train_modules:
            m.train()
        for idx in _batches(n, cfg.batch_size, g_shuffle):
            pred = forward_train(idx, g_aug)
            loss = loss_fn(pred, y_tr[idx].to(pred.device)) + model.readout.regularizer()
            if extra_reg is not None:
                loss = loss + extra_reg()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        model.eval()
        with torch.no_grad():
            r = pearson_columns(forward_val().cpu().numpy(), y_va.numpy())
        med = _median(r)
        history.append(med)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(val_r=f"{med:.3f}")
        log.debug("%s epoch %d: loss %.4f, val median r %.4f", desc, epoch + 1, float(loss.detach()), med)
        if med > best_r + 1e-4:
            best_r, best_state, best_epoch, bad = med, snapshot(), epoch + 1, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                if sched is not None or decays >= cfg.lr_decay_steps:
                    break
                decays += 1
                bad = 0
                restore(best_state)
                for gr in opt.param_groups:
                    gr["lr"] *= 0.3
                log.debug("%s: lr cut to %.2g at epoch %d", desc, opt.param_groups[0]["lr"], epoch + 1)
    if hasattr(bar, "close"):
        bar.close()
    restore(best_state)
    model.eval()
    return history, epoch + 1, best_epoch


def _new_model(
    cfg: FitConfig, backbone: nn.Module, layer: str, y_tr: torch.Tensor, *, site_ids: np.ndarray, image_size: int, in_channels: int, device: torch.device, seed: int
) -> Surrogate:
    """A surrogate with a fresh readout (bias at the sites' mean training response) on ``backbone``."""
    in_shape = backbone.out_shape(image_size, in_channels)
    readout = build_readout(cfg.readout, in_shape=in_shape, n_sites=y_tr.shape[1], seed=derive_seed(seed, "readout", layer))
    scale = _site_scale(y_tr)
    readout.init_bias(y_tr.mean(dim=0) / scale)
    if hasattr(readout, "generator"):
        readout.generator = torch_generator(derive_seed(seed, "readout-noise", layer))
    return Surrogate(backbone, readout, site_ids=site_ids, image_size=image_size, in_channels=in_channels, output_scale=scale).to(device)


def _fit_readout_on_features(
    cfg: FitConfig, model: Surrogate, f_tr: torch.Tensor, f_va: torch.Tensor, y_tr: torch.Tensor, y_va: torch.Tensor, *, seed: int, layer: str, desc: str
) -> tuple[list[float], int, int]:
    """Train ``model``'s readout on precomputed backbone features (frozen backbone)."""
    readout = model.readout

    def forward_train(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return readout(f_tr[idx.to(f_tr.device)])

    def forward_val() -> torch.Tensor:
        return readout(f_va)

    scale = model.output_scale.to(y_tr.device)
    return _train(
        model=model, params=[{"params": list(readout.parameters())}], forward_train=forward_train, forward_val=forward_val,
        train_modules=[readout], y_tr=y_tr / scale, y_va=y_va / scale, cfg=cfg, seed=derive_seed(seed, "train", layer), desc=desc,
    )


def _prune_twins(
    cfg: FitConfig, model: Surrogate, layer: str, f_tr: torch.Tensor, f_va: torch.Tensor, y_tr: torch.Tensor, y_va: torch.Tensor,
    *, site_ids: np.ndarray, image_size: int, in_channels: int, device: torch.device, seed: int,
) -> tuple[Surrogate, tuple[list[float], int, int], dict[str, Any]]:
    """``max_twins``: keep the twins with the largest share of ``model``'s readout drive
    and fit a fresh readout on their channels (the features sliced, not recomputed)."""
    from synth.surrogate.twin_backbone import twin_shares

    body = model.backbone.body
    shares = twin_shares(model.readout, f_tr, body.channel_ranges)
    order = np.argsort(-shares, kind="stable")[: cfg.max_twins]
    keep = sorted(int(i) for i in order)
    ids = [body.ids[i] for i in keep]
    channels = torch.cat([torch.arange(*body.channel_ranges[i]) for i in keep])
    backbone = build_backbone(
        cfg.backbone, weights=cfg.weights, layer=layer, in_channels=in_channels, input_size=cfg.input_size,
        kwargs={**cfg.backbone_kwargs, "twins": ids}, seed=derive_seed(seed, "backbone", layer),
    ).to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        backbone.body.feature_scale.copy_(body.feature_scale[channels.to(body.feature_scale.device)])
    pruned = _new_model(cfg, backbone, layer, y_tr, site_ids=site_ids, image_size=image_size, in_channels=in_channels, device=device, seed=seed)
    idx = channels.to(f_tr.device)
    fit = _fit_readout_on_features(
        cfg, pruned, f_tr.index_select(1, idx), f_va.index_select(1, idx), y_tr, y_va, seed=seed, layer=layer, desc=f"fit {cfg.backbone}:{layer} ({len(ids)} twins)"
    )
    notes = {
        "twins": ids,
        "twins_of": len(body.ids),
        "twins_share": float(shares[keep].sum()),
        "channels": int(channels.numel()),
    }
    log.info(
        "max_twins: kept %d of %d twins (%.0f%% of the readout's drive, %d of %d channels)",
        len(ids), len(body.ids), 100 * notes["twins_share"], notes["channels"], body.n_channels,
    )
    return pruned, fit, notes


def _fit_layer(
    cfg: FitConfig,
    layer: str,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_va: torch.Tensor,
    y_va: torch.Tensor,
    *,
    site_ids: np.ndarray,
    device: torch.device,
    seed: int,
) -> _Run:
    t0 = time.perf_counter()
    in_channels, image_size = int(x_tr.shape[1]), int(x_tr.shape[-1])
    train_bb = cfg.trains_backbone
    backbone = build_backbone(
        cfg.backbone,
        weights=cfg.weights,
        layer=layer,
        in_channels=in_channels,
        input_size=cfg.input_size,
        kwargs=cfg.backbone_kwargs,
        seed=derive_seed(seed, "backbone", layer),
    ).to(device)
    dims = {"site_ids": site_ids, "image_size": image_size, "in_channels": in_channels, "device": device, "seed": seed}
    model = _new_model(cfg, backbone, layer, y_tr, **dims)
    readout = model.readout
    desc = f"fit {cfg.backbone}:{layer}"
    notes: dict[str, Any] = {}
    if train_bb:
        x_dev = x_tr.to(device)
        xv_dev = x_va.to(device)

        def forward_train(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            xb = x_dev[idx.to(device)]
            if cfg.augment_shift:
                xb = random_shift(xb, cfg.augment_shift, g)
            return readout(backbone(xb))

        def forward_val() -> torch.Tensor:
            return torch.cat([readout(backbone(xv_dev[i : i + 256])) for i in range(0, xv_dev.shape[0], 256)])

        scale = model.output_scale.to(y_tr.device)
        params = [
            {"params": [p for p in backbone.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay},
            {"params": list(readout.parameters()), "weight_decay": 0.0},
        ]
        history, epochs, best = _train(
            model=model, params=params, forward_train=forward_train, forward_val=forward_val,
            train_modules=[backbone, readout], y_tr=y_tr / scale, y_va=y_va / scale, cfg=cfg, seed=derive_seed(seed, "train", layer),
            desc=desc, extra_reg=backbone.regularizer,
        )
    else:
        for p in backbone.parameters():
            p.requires_grad_(False)
        if cfg.augment_shift:
            log.info("augment_shift is ignored for a frozen backbone (features are computed once)")
        f_tr = _compute_features(backbone, x_tr, device, 64)
        f_va = _compute_features(backbone, x_va, device, 64)
        fit_scale = getattr(backbone.body, "fit_feature_scale", None)
        if callable(fit_scale):  # features standardized per channel on the training images
            sd = fit_scale(f_tr).view(1, -1, 1, 1)
            f_tr, f_va = f_tr / sd, f_va / sd
        log.info("%s: features %s computed in %.1f s", desc, tuple(f_tr.shape[1:]), time.perf_counter() - t0)
        history, epochs, best = _fit_readout_on_features(cfg, model, f_tr, f_va, y_tr, y_va, seed=seed, layer=layer, desc=desc)
        if cfg.max_twins and cfg.max_twins < len(getattr(backbone.body, "ids", ())):
            with torch.no_grad():
                notes["val_median_r_all_twins"] = _num(_median(pearson_columns(model.readout(f_va).cpu().numpy(), (y_va / model.output_scale.cpu()).numpy())))
            model, (history, epochs, best), more = _prune_twins(cfg, model, layer, f_tr, f_va, y_tr, y_va, **dims)
            notes.update(more)
    model.eval()
    with torch.no_grad():
        pv = predict(model, x_va, device=device)
    val_r = pearson_columns(pv, y_va.numpy())
    return _Run(model, val_r, history, epochs, best, time.perf_counter() - t0, model.backbone.out_shape(image_size, in_channels), notes)


def fit_surrogate(
    cfg: FitConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    site_ids: Sequence[str] | np.ndarray,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Surrogate, dict[str, Any]]:
    """Fit a surrogate to natural images and repeat-averaged responses.

    Args:
        cfg: the fit config.
        train: (images ``(N, C, H, W)`` in [0, 1], responses ``(N, S)``).
        val: the same for the validation images (early stopping, layer choice).
        site_ids: (S,) site ids, in response column order.
        device: ``cpu``, ``cuda``... (``auto`` resolved here).
        seed: drives initialization, shuffling and augmentation (CPU fits repeat exactly).

    Returns:
        (model, report): the frozen, eval-mode Surrogate on ``device``, and a dict with
        ``chosen_layer``, ``val_median_r``, ``val_median_r_per_layer``, ``epochs_run``,
        ``best_epoch``, ``train_seconds``, ``per_site_val_r``, ``history``...

    Raises:
        DataError: bad shapes, NaN responses, images outside [0, 1].
        ConfigError: unknown layer/backbone/readout, frozen random backbone.
        UserError: weights could not be downloaded.
    """
    device = resolve_device(device)
    x_tr, y_tr = _check_pair(train, "train")
    x_va, y_va = _check_pair(val, "val")
    site_ids = np.asarray(site_ids).astype(str)
    if site_ids.shape != (y_tr.shape[1],):
        raise DataError(f"{site_ids.size} site ids for {y_tr.shape[1]} response columns")
    if y_va.shape[1] != y_tr.shape[1] or x_va.shape[1:] != x_tr.shape[1:]:
        raise DataError(f"val images/responses {tuple(x_va.shape)}/{tuple(y_va.shape)} do not match train {tuple(x_tr.shape)}/{tuple(y_tr.shape)}")
    if cfg.loss == "poisson" and (y_tr < 0).any():
        raise DataError("train: responses are negative but fit.loss is poisson; use loss: mse (or non-negative responses)")
    layers = tuple(cfg.layers) if cfg.layers else (default_layer(cfg.backbone),)
    t0 = time.perf_counter()
    runs: dict[str, _Run] = {}
    for layer in layers:
        runs[layer] = _fit_layer(cfg, layer, x_tr, y_tr, x_va, y_va, site_ids=site_ids, device=device, seed=seed)
        log.info(
            "layer %s: val median r %.3f after %d epochs (best %d), %.1f s",
            layer, _median(runs[layer].val_r), runs[layer].epochs, runs[layer].best_epoch, runs[layer].seconds,
        )
    per_layer = {k: _median(v.val_r) for k, v in runs.items()}
    chosen = max(layers, key=lambda k: (-math.inf if math.isnan(per_layer[k]) else per_layer[k]))
    best = runs[chosen]
    model = best.model.freeze()
    report: dict[str, Any] = {
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "train_backbone": cfg.trains_backbone,
        "readout": dict(cfg.readout),
        "loss": cfg.loss,
        "layers": list(layers),
        "chosen_layer": chosen,
        "val_median_r": _num(per_layer[chosen]),
        "val_median_r_per_layer": {k: _num(v) for k, v in per_layer.items()},
        "epochs_run": {k: v.epochs for k, v in runs.items()},
        "best_epoch": {k: v.best_epoch for k, v in runs.items()},
        "history": {k: [_num(h) for h in v.history] for k, v in runs.items()},
        "feature_shape": {k: list(v.feature_shape) for k, v in runs.items()},
        "train_seconds": round(time.perf_counter() - t0, 3),
        "n_train": int(x_tr.shape[0]),
        "n_val": int(x_va.shape[0]),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "per_site_val_r": {s: _num(r) for s, r in zip(site_ids, best.val_r)},
    }
    if best.notes:
        report["max_twins"] = dict(best.notes)
    return model, report


# --------------------------------------------------------------------------- shared core
def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train / validation indices of ``n`` items: a seeded ``val_fraction`` (at least 2) for validation."""
    perm = torch.randperm(n, generator=torch_generator(seed))
    n_val = max(2, int(round(val_fraction * n)))
    if n - n_val < 2:
        raise DataError(f"a session with {n} images is too small to split into train/val")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def fit_core(
    datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: FitConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    names: Sequence[str] | None = None,
    max_seconds: float | None = None,
    precision: str = "fp32",
    adversarial_eps: float = 0.0,
    jacobians: Mapping[str, JacobianTargets] | None = None,
    jacobian_from_epoch: int = 1,
    readouts: Mapping[str, Callable[[tuple[int, int, int], int], Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one small core shared by several recording sessions (one readout each).

    Each session's images are split (seeded) into train and val in the ratio
    ``cfg.split.train : cfg.split.val``; early stopping uses the mean over sessions of
    the val median r. The core can then be reused for a new session with
    ``backbone: pretrained_core, weights: <saved core>`` (frozen, or fine-tuned with
    ``train_backbone: true``).

    Args:
        datasets: per session (images ``(N, C, H, W)`` in [0, 1], responses ``(N, S)``);
            sites and image counts may differ, channels must agree.
        cfg: a fit config with ``backbone: small_cnn`` (or ``pretrained_core`` to go on
            training a saved core).
        device: where to train.
        seed: drives splits, initialization and shuffling.
        names: session names for the report (default ``"0"``, ``"1"``...).
        max_seconds: training time limit: no epoch is started that would end past it
            (judged by the slowest of the last five; the best epoch is kept), and a cosine
            schedule is fitted to the epochs that fit at the recent median epoch time
            (:func:`_plan_epochs`); None: no limit.
        precision: ``fp32``, or ``bf16`` to autocast the core and readouts to bfloat16
            in training and validation passes (the loss, weights and optimizer stay
            float32); ``auto``: bf16 where the device computes it natively
            (:func:`synth.runtime.resolve_precision`). Images are fed channels-last
            either way (faster convolutions).
        adversarial_eps: > 0: train on images moved by :func:`l2_adversarial` (L2 step
            of this length, [0, 1] pixel units at the core's input size) instead of the
            clean ones (about 1.6x the time per epoch); 0: clean images.
        readouts: session name -> ``builder(in_shape, n_sites)`` of that session's readout
            (e.g. a :class:`~synth.surrogate.readouts.CellReadout`); the others get
            ``cfg.readout``.
        jacobians: session name -> :class:`JacobianTargets` for that session's images:
            its batches add ``weight * (1 - cosine)`` between the readout's input gradient
            and the targets (:func:`jacobian_loss`; those batches are not shifted, so the
            gradients stay where the targets were taken). None: plain training.
        jacobian_from_epoch: the first epoch (1-based) with the Jacobian term; earlier
            epochs train as if there were no targets. When it is above 1, early stopping
            and the kept epoch are chosen among the matched epochs only (the plain
            epochs are a warm start; a core without the matching is not what was asked).

    Returns:
        (core, report): ``core`` is a plain dict for :func:`save_core` (architecture,
        preprocessing, state_dict); ``report`` holds per-session val median r, epochs,
        history and train time.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"expected auto, fp32 or bf16, got {precision!r}", key="precision")
    if not adversarial_eps >= 0:
        raise ConfigError(f"expected a number >= 0, got {adversarial_eps!r}", key="adversarial_eps")
    if cfg.backbone not in ("small_cnn", "pretrained_core"):
        raise ConfigError(f"fit_core trains a small_cnn (or pretrained_core) core, got backbone {cfg.backbone}", key="backbone")
    if not datasets:
        raise DataError("fit_core needs at least one session")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    log.info("core training precision: %s", precision)
    names = [str(i) for i in range(len(datasets))] if names is None else [str(n) for n in names]
    builders = dict(readouts or {})
    if set(builders) - set(names):
        raise ValueError(f"readouts for unknown sessions {sorted(set(builders) - set(names))} (sessions: {', '.join(names)})")
    pairs = [_check_pair(d, f"session {nm}") for d, nm in zip(datasets, names)]
    jacobians = dict(jacobians or {})
    images_of = {nm: x for nm, (x, _) in zip(names, pairs)}
    for nm, jt in jacobians.items():
        x_nm = images_of.get(nm)
        if x_nm is None:
            raise DataError(f"Jacobian targets for unknown session {nm!r} (sessions: {', '.join(names)})")
        if tuple(jt.grads.shape) != tuple(x_nm.shape):
            raise DataError(f"Jacobian targets of session {nm} have shape {tuple(jt.grads.shape)}, its images {tuple(x_nm.shape)}")
    chans = {int(x.shape[1]) for x, _ in pairs}
    if len(chans) != 1:
        raise DataError(f"sessions have images with different channel counts {sorted(chans)}")
    in_channels = chans.pop()
    if cfg.loss == "poisson" and any((y < 0).any() for _, y in pairs):
        raise DataError("responses are negative but fit.loss is poisson; use loss: mse")
    val_fraction = cfg.split.val / (cfg.split.train + cfg.split.val)
    if cfg.layers and tuple(cfg.layers) != ("out",):
        raise ConfigError("fit_core trains the whole core; leave layers unset (pick a layer when reusing it)", key="layers")
    layer = "out"
    backbone = build_backbone(
        cfg.backbone, weights=cfg.weights, layer=layer, in_channels=in_channels, input_size=cfg.input_size,
        kwargs=cfg.backbone_kwargs, seed=derive_seed(seed, "core"),
    ).to(device, memory_format=torch.channels_last)
    cl = torch.channels_last
    sessions = []
    for k, ((x, y), nm) in enumerate(zip(pairs, names)):
        tr, va = split_indices(x.shape[0], val_fraction, derive_seed(seed, "core-split", nm))
        scale = _site_scale(y[tr])
        in_shape = backbone.out_shape(int(x.shape[-1]), in_channels)
        with torch.random.fork_rng(devices=[]):  # each readout's init seeded on its own
            torch.manual_seed(derive_seed(seed, "core-readout", nm))
            ro = builders[nm](in_shape, int(y.shape[1])) if nm in builders else build_readout(cfg.readout, in_shape=in_shape, n_sites=y.shape[1])
        ro.init_bias(y[tr].mean(0) / scale)
        if hasattr(ro, "generator"):
            ro.generator = torch_generator(derive_seed(seed, "readout-noise", nm))
        jt = jacobians.get(nm)
        jt = dataclasses.replace(jt, sites=jt.sites[tr], grads=jt.grads[tr].to(device)) if jt is not None and jt.weight > 0 else None
        sessions.append(
            {
                "name": nm, "x_tr": x[tr].to(device, memory_format=cl), "y_tr": (y[tr] / scale).to(device),
                "x_va": x[va].to(device, memory_format=cl), "y_va": (y[va] / scale), "readout": ro.to(device),
                "jacobian": jt,
            }
        )
    readouts = nn.ModuleList([s["readout"] for s in sessions])
    loss_fn = _loss_fn(cfg.loss)
    opt = torch.optim.Adam(
        [{"params": list(backbone.parameters()), "weight_decay": cfg.weight_decay}, {"params": list(readouts.parameters()), "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    g_shuffle = torch_generator(derive_seed(seed, "core-shuffle"))
    g_aug = torch_generator(derive_seed(seed, "core-augment"))
    steps_per_epoch = sum(len(_batches(s["x_tr"].shape[0], cfg.batch_size, None)) for s in sessions)
    sched = _cosine(opt, cfg.epochs * steps_per_epoch) if cfg.lr_schedule == "cosine" else None
    t0 = time.perf_counter()
    best_score, best_state, best_epoch, bad, decays = -math.inf, None, 0, 0, 0
    stopped_by_time = False
    epoch_start, durations, planned_epochs = t0, [], cfg.epochs
    history: list[dict[str, float]] = []
    epoch = 0
    jac_history: list[float] = []
    for epoch in progress(range(cfg.epochs), desc="fit shared core", total=cfg.epochs):
        backbone.train()
        readouts.train()
        jac_sum, jac_n = 0.0, 0
        if jacobians and epoch + 1 == jacobian_from_epoch > 1:
            log.info("core epoch %d: Jacobian matching begins; the kept epoch is chosen from here on (best plain epoch %d, val r %.4f)",
                     epoch + 1, best_epoch, best_score)
            best_score, bad = -math.inf, 0
        steps = [(k, idx) for k, s in enumerate(sessions) for idx in _batches(s["x_tr"].shape[0], cfg.batch_size, g_shuffle)]
        order = torch.randperm(len(steps), generator=g_shuffle).tolist()
        for j in order:
            k, idx = steps[j]
            s = sessions[k]
            xb = s["x_tr"][idx.to(device)]
            yb = s["y_tr"][idx.to(device)]
            ro = s["readout"]
            jt = s["jacobian"] if epoch + 1 >= jacobian_from_epoch else None
            if jt is not None:  # unshifted: the gradients are compared where the targets were taken
                with autocast(precision, device):
                    pred, jl = jacobian_loss(lambda z: ro(backbone(z)), xb.contiguous(memory_format=cl), jt, idx)
                jac_sum, jac_n = jac_sum + float(jl.detach()), jac_n + 1
                extra = jt.weight * jl
            else:
                if cfg.augment_shift:
                    xb = random_shift(xb, cfg.augment_shift, g_aug)
                xb = xb.contiguous(memory_format=cl)
                if adversarial_eps > 0:
                    xb = l2_adversarial(lambda z: ro(backbone(z)), xb, yb, loss_fn, adversarial_eps, precision, device)
                with autocast(precision, device):
                    pred = ro(backbone(xb))
                extra = 0.0
            loss = loss_fn(pred.float(), yb) + extra + ro.regularizer() + backbone.regularizer()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        backbone.eval()
        readouts.eval()
        scores = {}
        with torch.no_grad(), autocast(precision, device):
            for s in sessions:
                pv = torch.cat([s["readout"](backbone(s["x_va"][i : i + 256])).float() for i in range(0, s["x_va"].shape[0], 256)])
                scores[s["name"]] = _median(pearson_columns(pv.cpu().numpy(), s["y_va"].numpy()))
        history.append(scores)
        score = float(np.nanmean(list(scores.values())))
        if jac_n:
            jac_history.append(jac_sum / jac_n)
            log.info("core epoch %d: mean Jacobian cosine %.3f on the teachers' batches", epoch + 1, 1.0 - jac_history[-1])
        log.info("core epoch %d: mean val median r %.4f (%.0f s)", epoch + 1, score, time.perf_counter() - t0)
        if score > best_score + 1e-4:
            best_score, best_epoch, bad = score, epoch + 1, 0
            best_state = (copy.deepcopy(backbone.state_dict()), copy.deepcopy(readouts.state_dict()))
        else:
            bad += 1
            if bad >= cfg.patience:
                if sched is not None or decays >= cfg.lr_decay_steps:
                    break
                decays, bad = decays + 1, 0
                backbone.load_state_dict(best_state[0])
                readouts.load_state_dict(best_state[1])
                for gr in opt.param_groups:
                    gr["lr"] *= 0.3
        now = time.perf_counter()
        durations.append(now - epoch_start)
        epoch_start = now
        if max_seconds is not None:
            planned_epochs, stop = _plan_epochs(durations, now - t0, max_seconds, cfg.epochs, planned_epochs)
            if sched is not None:
                sched.total_steps[0] = planned_epochs * steps_per_epoch
            if stop:
                stopped_by_time = True
                break
    if best_state is not None:
        backbone.load_state_dict(best_state[0])
        readouts.load_state_dict(best_state[1])
    core = core_checkpoint(backbone, in_channels)
    log.info("shared core: mean val median r %.3f after %d epochs (best %d), %.0f s", best_score, epoch + 1, best_epoch, time.perf_counter() - t0)
    report = {
        "sessions": names,
        "val_median_r": history[best_epoch - 1] if best_epoch else {},
        "mean_val_median_r": best_score,
        "epochs_run": epoch + 1,
        "best_epoch": best_epoch,
        "stopped_by_time_limit": stopped_by_time,
        "schedule_epochs": planned_epochs,
        "history": history,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "precision": precision,
        "adversarial_eps": float(adversarial_eps),
        "jacobian_cosine": [round(1.0 - v, 4) for v in jac_history],
        "n_train": {s["name"]: int(s["x_tr"].shape[0]) for s in sessions},
        "n_val": {s["name"]: int(s["x_va"].shape[0]) for s in sessions},
    }
    return core, report


def core_checkpoint(backbone: nn.Module, in_channels: int) -> dict[str, Any]:
    """A trained ``small_cnn`` backbone as a core file's contents (:data:`CORE_FORMAT`:
    architecture, preprocessing and weights; ``backbone: pretrained_core`` loads it)."""
    return {
        "format": CORE_FORMAT,
        "arch": dict(backbone.build_spec["kwargs"]),
        "in_channels": int(in_channels),
        "input_size": backbone.input_size or 0,
        "mean": backbone.preprocessing["mean"],
        "std": backbone.preprocessing["std"],
        "state_dict": {k: v.detach().cpu().contiguous().clone() for k, v in backbone.body.state_dict().items()},
    }


def save_core(core: Mapping[str, Any], path: str) -> None:
    """Write a core from :func:`fit_core` (load it with ``backbone: pretrained_core``)."""
    torch.save(dict(core), str(path))
